//! OCI images end to end: the test image (mmdebstrap + umoci, see
//! scripts/oci-fixture.sh) pushed with skopeo into a real docker-registry in
//! the test's namespace, pulled and converted by the daemon, booted with its
//! read-only root disk and a writable disk, forked from running with the
//! disk forked at the same instant as the memory, and cleaned up.

use anyhow::{Result, ensure};
use forkvm_e2e::registry::Registry;
use forkvm_e2e::{TestEnv, ip, s, wait_for};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// `/images/{name}` with the name's slashes encoded.
fn image_path(name: &str) -> String {
    format!("/images/{}", name.replace('/', "%2F"))
}

async fn pull_ready(env: &TestEnv, name: &str) -> Result<(Value, Duration)> {
    let t = Instant::now();
    let (st, v) = env
        .request("POST", "/images", Some(json!({"name": name})))
        .await?;
    ensure!(st == 202 || st == 200, "pull -> {st}: {v}");
    let path = image_path(name);
    let img = wait_for(
        "the image to settle",
        Duration::from_secs(180),
        async || {
            let (_, v) = env.request("GET", &path, None).await.ok()?;
            matches!(v["status"].as_str(), Some("ready" | "failed")).then_some(v)
        },
    )
    .await?;
    ensure!(s(&img, "status") == "ready", "{img}\n{}", env.daemon_log());
    Ok((img, t.elapsed()))
}

/// Where the image's web root is, as exec (in the image's root) sees it.
const WWW: &str = "/srv/www";

/// A file the image's `python3 -m http.server` serves from `/srv/www`;
/// `None` when it answers 404 (or not at all).
fn served(env: &TestEnv, ip: &str, file: &str) -> Option<String> {
    let url = format!("http://{ip}:8080/{file}");
    let out = env
        .in_netns(&["curl", "-sf", "--max-time", "5", &url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn write_www(env: &TestEnv, id: &str, file: &str, text: &str) -> Result<()> {
    let cmd = format!("echo {text} > {WWW}/{file}");
    env.exec_ok(id, &["sh", "-c", &cmd]).await.map(|_| ())
}

async fn fork(env: &TestEnv, id: &str, name: &str, count: u32) -> Result<(Vec<Value>, Duration)> {
    let t = Instant::now();
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{id}/fork"),
            Some(json!({"name": name, "from_running": true, "count": count})),
        )
        .await?;
    let took = t.elapsed();
    ensure!(st == 201, "fork -> {st}: {v}\n{}", env.daemon_log());
    let forks = v.as_array().cloned().unwrap_or_default();
    for f in &forks {
        ensure!(s(f, "state") == "Running", "{f}");
    }
    Ok((forks, took))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Bytes the layer files take on the host (allocated, not apparent).
fn layers_bytes(env: &TestEnv) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(env.data_dir.join("layers"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Forks of forks, writes in each, standby/restore and a daemon restart:
/// every VM sees exactly the files written before its capture and its own.
async fn check_disk_isolation(env: &mut TestEnv, src: &Value) -> Result<()> {
    let (src_id, src_ip) = (s(src, "id"), ip(src));
    write_www(env, &src_id, "before.txt", "before-fork").await?;
    let (forks, _) = fork(env, &src_id, "f", 3).await?;
    write_www(env, &src_id, "after.txt", "source-after-fork").await?;
    write_www(env, &s(&forks[0], "id"), "f1.txt", "from-fork-1").await?;
    for (i, f) in forks.iter().enumerate() {
        let fip = ip(f);
        ensure!(
            served(env, &fip, "index.html").is_some(),
            "fork {i} serves nothing"
        );
        ensure!(
            served(env, &fip, "before.txt").as_deref() == Some("before-fork"),
            "fork {i}"
        );
        ensure!(
            served(env, &fip, "after.txt").is_none(),
            "fork {i} sees a later source write"
        );
        ensure!(
            (i == 0) == served(env, &fip, "f1.txt").is_some(),
            "fork {i}: f1.txt"
        );
    }
    ensure!(
        served(env, &src_ip, "f1.txt").is_none(),
        "fork 1's file reached the source"
    );
    ensure!(served(env, &src_ip, "after.txt").is_some());

    // A fork of a fork sees its parent's file.
    let (g, _) = fork(env, &s(&forks[0], "id"), "g", 1).await?;
    ensure!(served(env, &ip(&g[0]), "f1.txt").as_deref() == Some("from-fork-1"));

    // Standby/restore keeps what was written before it.
    let f2 = s(&forks[1], "id");
    write_www(env, &f2, "pre-standby.txt", "kept").await?;
    for op in ["standby", "restore"] {
        let (st, v) = env
            .request("POST", &format!("/instances/{f2}/{op}"), Some(json!({})))
            .await?;
        ensure!(st == 200, "{op} -> {st}: {v}");
    }
    ensure!(served(env, &ip(&forks[1]), "pre-standby.txt").as_deref() == Some("kept"));

    // A kill -9 of the daemon: images and disks are still there after it.
    env.kill_daemon()?;
    env.spawn_daemon()?;
    env.wait_ready().await?;
    let (g2, _) = fork(env, &s(&g[0], "id"), "h", 1).await?;
    ensure!(served(env, &ip(&g2[0]), "f1.txt").as_deref() == Some("from-fork-1"));
    Ok(())
}

/// Boot and fork figures of the image against the `default` image, in the
/// same run; disk space a fork takes after writing 1 MiB.
async fn figures(env: &TestEnv, name: &str) -> Result<()> {
    let t = Instant::now();
    let plain = env.create(json!({"name": "plain"})).await?;
    let boot_plain = t.elapsed();
    let t = Instant::now();
    let web = env.create(json!({"name": "web2", "image": name})).await?;
    let boot_image = t.elapsed();
    wait_for("http.server", Duration::from_secs(60), async || {
        served(env, &ip(&web), "index.html")
    })
    .await?;
    let (mut with_disk, mut without) = (vec![], vec![]);
    for i in 0..3 {
        without.push(fork(env, &s(&plain, "id"), &format!("p{i}"), 1).await?.1);
        with_disk.push(fork(env, &s(&web, "id"), &format!("w{i}"), 1).await?.1);
    }
    let before = layers_bytes(env);
    let (one, _) = fork(env, &s(&web, "id"), "one", 1).await?;
    let empty = layers_bytes(env) - before;
    let cmd = format!("head -c 1048576 /dev/urandom > {WWW}/blob && sync");
    env.exec_ok(&s(&one[0], "id"), &["sh", "-c", &cmd]).await?;
    let written = layers_bytes(env) - before;
    println!(
        "FIGURES boot: default {} ms, image {} ms; fork request->ready (median of 3): default {} ms, image with disk {} ms; fork disk: {} KiB at fork, {} KiB after writing 1 MiB",
        boot_plain.as_millis(),
        boot_image.as_millis(),
        median(without).as_millis(),
        median(with_disk).as_millis(),
        empty / 1024,
        written / 1024
    );
    ensure!(
        written >= 1 << 20,
        "the write did not reach the fork's layer"
    );
    // qcow2 allocates a whole 64 KiB cluster (copied from the backing
    // layer) for every block ext4 touches — the data, and with the sync its
    // journal, bitmaps and inode table — so 1 MiB written costs 1–4 MiB
    // (4.0 MiB seen once); a copy of the disk would cost all of it.
    ensure!(written < 8 << 20, "a 1 MiB write took {written} bytes");
    Ok(())
}

async fn delete_all(env: &TestEnv) -> Result<()> {
    let (_, list) = env.request("GET", "/instances", None).await?;
    for i in list.as_array().cloned().unwrap_or_default() {
        let (st, _) = env
            .request("DELETE", &format!("/instances/{}", s(&i, "id")), None)
            .await?;
        ensure!(st == 204);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_from_a_registry_boots_forks_with_its_disk_and_is_cleaned_up() -> Result<()> {
    // A name server of this test's own (nothing answers it): it must reach
    // the image's /etc/resolv.conf.
    let mut env = TestEnv::start_env(&[("FORKVM_DNS", "10.77.0.53")]).await?;
    let reg = Registry::start(&env)?;
    let name = reg.push_fixture(&env, "forkvm/py", "1")?;

    let (img, took) = pull_ready(&env, &name).await?;
    println!(
        "FIGURES pull + convert: {} ms, {} bytes",
        took.as_millis(),
        img["size_bytes"]
    );
    ensure!(s(&img, "digest").starts_with("sha256:"), "{img}");
    ensure!(
        img["entrypoint"] == json!(["python3", "-m", "http.server"]),
        "{img}"
    );
    ensure!(img["cmd"] == json!(["8080"]), "{img}");
    ensure!(img["env"]["GREETING"] == "hello", "{img}");
    ensure!(s(&img, "working_dir") == "/srv/www", "{img}");
    ensure!(img["size_bytes"].as_u64().is_some_and(|n| n > 0), "{img}");

    let src = env.create(json!({"name": "web", "image": name})).await?;
    let page = wait_for(
        "http.server on the source",
        Duration::from_secs(60),
        async || served(&env, &ip(&src), "index.html"),
    )
    .await?;
    ensure!(page == "forkvm oci fixture", "{page}");
    // Exec runs in the image's root: its files, not the agent's.
    let seen = env
        .exec_ok(
            &s(&src, "id"),
            &[
                "sh",
                "-c",
                "cat /srv/www/index.html; ls /run/forkvm 2>&1 || true; cat /etc/resolv.conf",
            ],
        )
        .await?;
    ensure!(seen.starts_with("forkvm oci fixture"), "{seen}");
    ensure!(
        seen.contains("nameserver 10.77.0.53"),
        "the image's resolv.conf is not the daemon's: {seen}"
    );
    ensure!(
        !seen.contains("root"),
        "exec sees the agent's /run/forkvm: {seen}"
    );
    // The workload's output goes to the instance's log.
    let (_, logs) = env
        .request("GET", &format!("/instances/{}/logs", s(&src, "id")), None)
        .await?;
    ensure!(logs.to_string().contains("GET /index.html"), "logs: {logs}");

    check_disk_isolation(&mut env, &src).await?;
    figures(&env, &name).await?;

    let (st, v) = env.request("DELETE", &image_path(&name), None).await?;
    ensure!(st == 409, "deleting an image in use -> {st}: {v}");
    delete_all(&env).await?;
    let (st, v) = env.request("DELETE", &image_path(&name), None).await?;
    ensure!(st == 204, "{v}");
    let (st, _) = env.request("GET", &image_path(&name), None).await?;
    ensure!(st == 404);
    ensure!(layers_bytes(&env) == 0, "layers left");
    let rootfs = std::fs::read_dir(env.data_dir.join("oci/rootfs"))?.count();
    ensure!(rootfs == 0, "root disks left");
    ensure!(env.qemu_pids().is_empty(), "QEMU left running");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_pulls_fail_with_a_code_and_leave_nothing() -> Result<()> {
    let env = TestEnv::start().await?;
    let _reg = Registry::start(&env)?;
    let (st, v) = env
        .request("POST", "/images", Some(json!({"name": "Not A Reference"})))
        .await?;
    ensure!(st == 400, "{st}: {v}");
    let missing = format!("{}/forkvm/missing:1", forkvm_e2e::registry::REGISTRY);
    let (st, _) = env
        .request("POST", "/images", Some(json!({"name": missing})))
        .await?;
    ensure!(st == 202, "{st}");
    let img = wait_for("the pull to fail", Duration::from_secs(60), async || {
        let (_, v) = env.request("GET", &image_path(&missing), None).await.ok()?;
        (s(&v, "status") == "failed").then_some(v)
    })
    .await?;
    ensure!(s(&img, "error_code") == "not_found", "{img}");
    let (st, v) = env
        .request(
            "POST",
            "/instances",
            Some(json!({"name": "x", "image": missing})),
        )
        .await?;
    ensure!(st == 409, "booting a failed image -> {st}: {v}");
    let (st, _) = env.request("DELETE", &image_path(&missing), None).await?;
    ensure!(st == 204);
    let rootfs: Vec<_> = std::fs::read_dir(env.data_dir.join("oci/rootfs"))
        .map(|rd| rd.flatten().collect())
        .unwrap_or_default();
    ensure!(rootfs.is_empty());
    Ok(())
}
