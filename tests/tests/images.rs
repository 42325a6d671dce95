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

/// GET a file the image's httpd serves from `/srv/www`.
fn served(env: &TestEnv, ip: &str, file: &str) -> Option<String> {
    env.http_get(&format!("http://{ip}:8080/{file}"))
        .map(|b| b.trim().to_string())
}

async fn write_www(env: &TestEnv, id: &str, file: &str, text: &str) -> Result<()> {
    // Exec in an OCI image's instance runs in the image's root.
    let cmd = format!("echo {text} > /srv/www/{file}");
    env.exec_ok(id, &["sh", "-c", &cmd]).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_from_a_registry_boots_forks_with_its_disk_and_is_cleaned_up() -> Result<()> {
    let env = TestEnv::start().await?;
    let reg = Registry::start(&env)?;
    let name = reg.push_fixture(&env, "forkvm/web", "1")?;

    let (img, took) = pull_ready(&env, &name).await?;
    println!("pull + convert: {} ms", took.as_millis());
    ensure!(s(&img, "digest").starts_with("sha256:"), "{img}");
    ensure!(img["entrypoint"] == json!(["httpd"]), "{img}");
    ensure!(img["env"]["GREETING"] == "hello", "{img}");
    ensure!(s(&img, "working_dir") == "/srv", "{img}");
    ensure!(img["size_bytes"].as_u64().is_some_and(|n| n > 0), "{img}");

    let t = Instant::now();
    let src = env.create(json!({"name": "web", "image": name})).await?;
    println!("create from image: {} ms", t.elapsed().as_millis());
    let (src_id, src_ip) = (s(&src, "id"), ip(&src));
    let page = wait_for("httpd on the source", Duration::from_secs(30), async || {
        served(&env, &src_ip, "index.html")
    })
    .await?;
    ensure!(page == "forkvm oci fixture", "{page}");
    // Exec sees the image's files and not the agent's /run/forkvm.
    let out = env
        .exec_ok(&src_id, &["cat", "/srv/www/index.html"])
        .await?;
    ensure!(out == "forkvm oci fixture\n", "{out:?}");
    let out = env
        .exec_ok(
            &src_id,
            &[
                "sh",
                "-c",
                "test -e /run/forkvm && echo agent-root || echo image-root",
            ],
        )
        .await?;
    ensure!(out == "image-root\n", "{out:?}");
    write_www(&env, &src_id, "state.txt", "source").await?;
    ensure!(served(&env, &src_ip, "state.txt").as_deref() == Some("source"));

    let t = Instant::now();
    let (st, forks) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "f", "from_running": true, "count": 2})),
        )
        .await?;
    ensure!(st == 201, "{forks}\n{}", env.daemon_log());
    println!("fork x2 from running: {} ms", t.elapsed().as_millis());
    let forks = forks.as_array().cloned().unwrap_or_default();
    ensure!(forks.len() == 2, "{forks:?}");
    for (i, f) in forks.iter().enumerate() {
        ensure!(s(f, "state") == "Running", "fork {i}: {f}");
        let (fid, fip) = (s(f, "id"), ip(f));
        // The fork's disk is the source's at the instant of the fork...
        ensure!(
            served(&env, &fip, "state.txt").as_deref() == Some("source"),
            "fork {fip} does not serve the source's disk"
        );
        // ...and its own from then on.
        write_www(&env, &fid, "state.txt", &format!("fork-{i}")).await?;
        ensure!(served(&env, &fip, "state.txt") == Some(format!("fork-{i}")));
    }
    ensure!(
        served(&env, &src_ip, "state.txt").as_deref() == Some("source"),
        "a fork's write reached the source"
    );

    // A stopped fork keeps its disk and runs the image's process again.
    let f0 = s(&forks[0], "id");
    let (st, _) = env
        .request("POST", &format!("/instances/{f0}/stop"), None)
        .await?;
    ensure!(st == 200);
    let (st, v) = env
        .request("POST", &format!("/instances/{f0}/start"), Some(json!({})))
        .await?;
    ensure!(st == 200, "{v}\n{}", env.daemon_log());
    let got = wait_for(
        "httpd after a restart",
        Duration::from_secs(30),
        async || served(&env, &ip(&v), "state.txt"),
    )
    .await?;
    ensure!(got == "fork-0", "{got}");

    let (st, v) = env.request("DELETE", &image_path(&name), None).await?;
    ensure!(st == 409, "deleting an image in use -> {st}: {v}");
    for f in &forks {
        let (st, _) = env
            .request("DELETE", &format!("/instances/{}", s(f, "id")), None)
            .await?;
        ensure!(st == 204);
    }
    let (st, _) = env
        .request("DELETE", &format!("/instances/{src_id}"), None)
        .await?;
    ensure!(st == 204);
    let (st, v) = env.request("DELETE", &image_path(&name), None).await?;
    ensure!(st == 204, "{v}");
    let (st, _) = env.request("GET", &image_path(&name), None).await?;
    ensure!(st == 404);
    for dir in ["oci/rootfs", "layers"] {
        let left: Vec<_> = std::fs::read_dir(env.data_dir.join(dir))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let left: Vec<_> = left
            .into_iter()
            .filter(|n| !n.to_string_lossy().starts_with("templates"))
            .collect();
        ensure!(left.is_empty(), "{dir} keeps {left:?}");
    }
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
