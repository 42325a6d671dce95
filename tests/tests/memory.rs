//! Copy-on-write memory: forks map their source's memory as an immutable
//! base; what one VM writes no other sees; the base never changes and goes
//! away with the last VM or snapshot that uses it.

use anyhow::{Context, Result, bail, ensure};
use forkvm_e2e::{TestEnv, s};
use serde_json::{Value, json};
use std::path::PathBuf;

/// The base files of this env (`<mem_dir>/bases/*.mem`).
fn base_files(env: &TestEnv) -> Vec<PathBuf> {
    std::fs::read_dir(env.mem_dir.join("bases"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn sha256(p: &PathBuf) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// md5 of the guest's /root/pattern.
async fn pattern(env: &TestEnv, id: &str) -> Result<String> {
    let out = env.exec_ok(id, &["md5sum", "/root/pattern"]).await?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Overwrites the pattern's first MiB with the guest's own random bytes.
async fn scribble(env: &TestEnv, id: &str) -> Result<String> {
    env.exec_ok(
        id,
        &[
            "sh",
            "-c",
            "dd if=/dev/urandom of=/root/pattern bs=1M count=1 conv=notrunc 2>/dev/null",
        ],
    )
    .await?;
    pattern(env, id).await
}

async fn fork(env: &TestEnv, id: &str, body: Value) -> Result<Vec<Value>> {
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/fork"), Some(body))
        .await?;
    ensure!(st == 201, "fork -> {st}: {v}\n{}", env.daemon_log());
    let forks = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    for f in &forks {
        ensure!(s(f, "state") == "Running", "{f}");
    }
    Ok(forks)
}

#[tokio::test(flavor = "multi_thread")]
async fn forks_share_the_base_copy_on_write_and_stay_isolated() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env.create(json!({"name": "src"})).await?;
    let src_id = s(&src, "id");
    // 48 MiB of random data in guest RAM (the guest's root is in RAM).
    env.exec_ok(
        &src_id,
        &[
            "sh",
            "-c",
            "dd if=/dev/urandom of=/root/pattern bs=1M count=48 2>/dev/null",
        ],
    )
    .await?;
    let original = pattern(&env, &src_id).await?;

    let forks = fork(
        &env,
        &src_id,
        json!({"name": "f", "from_running": true, "count": 3}),
    )
    .await?;
    let bases = base_files(&env);
    ensure!(bases.len() == 1, "one base for the three forks: {bases:?}");
    let base_sum = sha256(&bases[0])?;

    // Every fork reads the source's pattern, then writes its own.
    let mut own = vec![];
    for f in &forks {
        let id = s(f, "id");
        ensure!(
            pattern(&env, &id).await? == original,
            "fork {id} lost the pattern"
        );
        let mine = scribble(&env, &id).await?;
        ensure!(mine != original, "fork {id} could not write");
        own.push((id, mine));
    }
    // Isolation both ways: the source and each fork read only their own.
    env.exec_ok(&src_id, &["sh", "-c", "echo src > /root/src-only"])
        .await?;
    ensure!(
        pattern(&env, &src_id).await? == original,
        "the source saw a fork's write"
    );
    for (id, mine) in &own {
        ensure!(
            &pattern(&env, id).await? == mine,
            "fork {id} saw another VM's write"
        );
        env.exec_ok(id, &["sh", "-c", "test ! -e /root/src-only"])
            .await
            .context("a fork saw the source's new file")?;
    }
    ensure!(
        sha256(&bases[0])? == base_sum,
        "the base changed while forks ran"
    );

    // A fork of a fork (copy-on-write source) reads its parent's pattern.
    let (f1, f1_sum) = &own[0];
    let grand = fork(&env, f1, json!({"name": "g", "from_running": true})).await?;
    ensure!(&pattern(&env, &s(&grand[0], "id")).await? == f1_sum);
    // Standby and restore of a fork keep what it wrote.
    let (f2, f2_sum) = &own[1];
    let (st, v) = env
        .request("POST", &format!("/instances/{f2}/standby"), None)
        .await?;
    ensure!(st == 200 && s(&v, "state") == "Standby", "{v}");
    let (st, v) = env
        .request("POST", &format!("/instances/{f2}/restore"), None)
        .await?;
    ensure!(st == 200 && s(&v, "state") == "Running", "{v}");
    ensure!(
        &pattern(&env, f2).await? == f2_sum,
        "restore lost the fork's data"
    );
    ensure!(sha256(&bases[0])? == base_sum, "the base changed");

    // The first base goes with the last VM that maps it.
    for (id, _) in &own {
        let (st, _) = env
            .request("DELETE", &format!("/instances/{id}"), None)
            .await?;
        ensure!(st == 204, "delete {id} -> {st}");
    }
    ensure!(!bases[0].exists(), "a base nobody maps was kept");
    ensure!(pattern(&env, &src_id).await? == original);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_outlives_a_daemon_crash_while_forks_map_it() -> Result<()> {
    let mut env = TestEnv::start().await?;
    let src = env.create(json!({"name": "src"})).await?;
    let src_id = s(&src, "id");
    let forks = fork(
        &env,
        &src_id,
        json!({"name": "f", "from_running": true, "count": 2}),
    )
    .await?;
    let bases = base_files(&env);
    ensure!(bases.len() == 1, "{bases:?}");
    let sum = sha256(&bases[0])?;

    env.kill_daemon()?;
    env.spawn_daemon()?;
    env.wait_ready().await?;
    // Adopted as they were: running on the same base, which was kept.
    for f in &forks {
        let (st, v) = env
            .request("GET", &format!("/instances/{}", s(f, "id")), None)
            .await?;
        ensure!(st == 200 && s(&v, "state") == "Running", "{v}");
        ensure!(s(&v, "base") == s(f, "base"), "{v}");
        env.exec_ok(&s(f, "id"), &["true"]).await?;
    }
    ensure!(
        bases[0].exists() && sha256(&bases[0])? == sum,
        "base lost or changed"
    );

    // Deleted after its last user.
    let (st, _) = env
        .request(
            "DELETE",
            &format!("/instances/{}", s(&forks[0], "id")),
            None,
        )
        .await?;
    ensure!(st == 204);
    ensure!(bases[0].exists(), "base removed while a fork maps it");
    let (st, _) = env
        .request(
            "DELETE",
            &format!("/instances/{}", s(&forks[1], "id")),
            None,
        )
        .await?;
    ensure!(st == 204);
    ensure!(!bases[0].exists(), "base kept after its last user");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_handed_over_keeps_running_on_its_address() -> Result<()> {
    // Every capture of an own-memory source is a handover here.
    let env = TestEnv::start_env(&[("FORKVM_HANDOVER_MIN_MIB", "0")]).await?;
    let src = env.create(json!({"name": "src"})).await?;
    let src_id = s(&src, "id");
    env.exec_ok(
        &src_id,
        &["sh", "-c", "mkdir -p /var/www && echo still-me > /var/www/index.html && httpd -p 80 -h /var/www && echo 7 > /root/n"],
    )
    .await?;
    let url = format!("http://{}/", forkvm_e2e::ip(&src));
    let f = fork(&env, &src_id, json!({"name": "f", "from_running": true})).await?;
    let stages = &f[0]["handoff"]["stages_ms"];
    println!(
        "handover: source_pause {} ms, snapshot {} ms",
        stages["source_pause"], stages["snapshot"]
    );
    ensure!(stages["source_pause"].as_f64().is_some(), "{f:?}");

    // A new QEMU that took over its TAP runs the source: same address,
    // processes and files; then, in the background, it gets its own memory
    // back (promotion) while the fork keeps mapping the base.
    let now = forkvm_e2e::wait_for(
        "the source to be promoted",
        std::time::Duration::from_secs(60),
        async || {
            let (_, v) = env
                .request("GET", &format!("/instances/{src_id}"), None)
                .await
                .ok()?;
            (s(&v, "base").is_empty() && v["pid"] != src["pid"]).then_some(v)
        },
    )
    .await?;
    if !env.http_get(&url).is_some_and(|b| b.contains("still-me")) {
        bail!(
            "the source's web server no longer answers on its address\n{}",
            env.network_diagnosis(&src_id, &forkvm_e2e::ip(&src)).await
        );
    }
    ensure!(
        env.exec_ok(&src_id, &["cat", "/root/n"]).await?.trim() == "7",
        "{now}"
    );
    ensure!(
        env.qemu_pids().len() == 2,
        "QEMU processes: {:?}",
        env.qemu_pids()
    );
    ensure!(
        env.mem_dir.join(format!("{src_id}.mem")).exists(),
        "no own file after promotion"
    );

    // Its next fork is a handover again; both forks answer.
    let g = fork(&env, &src_id, json!({"name": "g", "from_running": true})).await?;
    ensure!(
        s(&g[0], "base") != s(&f[0], "base"),
        "a new base for the new state"
    );
    for v in [&f[0], &g[0]] {
        let u = format!("http://{}/", forkvm_e2e::ip(v));
        ensure!(
            env.http_get(&u).is_some_and(|b| b.contains("still-me")),
            "{v}"
        );
    }
    ensure!(env.http_get(&url).is_some_and(|b| b.contains("still-me")));
    Ok(())
}
