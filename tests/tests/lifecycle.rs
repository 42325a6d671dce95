//! Instance lifecycle against a real daemon, real QEMU and the real agent.

use anyhow::Result;
use forkvm_e2e::{TestEnv, s, wait_for};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn exec(env: &TestEnv, id: &str, cmd: &[&str]) -> Result<Value> {
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{id}/exec"),
            Some(json!({ "command": cmd, "timeout_s": 30 })),
        )
        .await?;
    anyhow::ensure!(st == 200, "exec {cmd:?} -> {st}: {v}");
    Ok(v)
}

#[tokio::test(flavor = "multi_thread")]
async fn create_ping_exec_stop_start_delete_leaves_nothing() -> Result<()> {
    let env = TestEnv::start().await?;
    let t0 = Instant::now();
    let (st, inst) = env
        .request(
            "POST",
            "/instances",
            Some(json!({"name": "web", "image": "default"})),
        )
        .await?;
    assert_eq!(st, 201, "create: {inst}\n{}", env.daemon_log());
    let boot_ms = t0.elapsed().as_millis();
    assert_eq!(s(&inst, "state"), "Running");
    let id = s(&inst, "id");
    let ip = s(&inst["network"], "ip");
    let mac = s(&inst["network"], "mac");
    let tap = s(&inst["network"], "tap");
    assert!(
        !ip.is_empty() && !mac.is_empty() && !tap.is_empty(),
        "{inst}"
    );
    assert!(
        ip.starts_with("10.77.0."),
        "ip {ip} outside the test subnet"
    );

    assert!(env.ping(&ip), "guest {ip} does not answer ping");
    let t1 = Instant::now();
    let addr = exec(&env, &id, &["ip", "-4", "addr", "show", "eth0"]).await?;
    let exec_ms = t1.elapsed().as_millis();
    assert_eq!(addr["exit_code"], 0, "{addr}");
    assert!(s(&addr, "stdout").contains(&format!("{ip}/24")), "{addr}");
    let link = exec(&env, &id, &["ip", "link", "show", "eth0"]).await?;
    assert!(s(&link, "stdout").contains(&mac), "{link}");
    println!("boot-to-Running {boot_ms} ms, exec round trip {exec_ms} ms");

    // Stop keeps the identity; start brings the same one back.
    let (st, stopped) = env
        .request("POST", &format!("/instances/{id}/stop"), None)
        .await?;
    assert_eq!(st, 200, "{stopped}");
    assert_eq!(s(&stopped, "state"), "Stopped");
    assert!(env.qemu_pids().is_empty(), "QEMU still running after stop");
    assert!(!env.links()?.contains(&tap), "TAP left after stop");
    assert!(!env.ping(&ip), "stopped guest still answers");
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{id}/exec"),
            Some(json!({"command": ["true"]})),
        )
        .await?;
    assert_eq!(st, 409, "exec on stopped: {v}");
    assert!(!s(&v, "message").is_empty());

    let (st, started) = env
        .request("POST", &format!("/instances/{id}/start"), None)
        .await?;
    assert_eq!(st, 200, "{started}");
    assert_eq!(s(&started, "state"), "Running");
    assert_eq!(s(&started["network"], "ip"), ip);
    assert_eq!(s(&started["network"], "mac"), mac);
    assert!(env.ping(&ip));
    let addr = exec(&env, &id, &["ip", "-4", "addr", "show", "eth0"]).await?;
    assert!(s(&addr, "stdout").contains(&format!("{ip}/24")), "{addr}");

    // By name works too; delete leaves nothing behind.
    let (st, _) = env.request("GET", "/instances/web", None).await?;
    assert_eq!(st, 200);
    let (st, _) = env
        .request("DELETE", &format!("/instances/{id}"), None)
        .await?;
    assert_eq!(st, 204);
    let (st, _) = env
        .request("GET", &format!("/instances/{id}"), None)
        .await?;
    assert_eq!(st, 404);
    assert!(env.qemu_pids().is_empty(), "QEMU left after delete");
    assert!(!env.links()?.contains(&tap), "TAP left after delete");
    assert!(
        !env.data_dir.join("instances").join(&id).exists(),
        "instance dir left"
    );
    assert_eq!(
        std::fs::read_dir(&env.mem_dir)?.count(),
        0,
        "memory file left"
    );
    // The address is free again: the next instance gets it.
    let (st, again) = env
        .request("POST", "/instances", Some(json!({"name": "web2"})))
        .await?;
    assert_eq!(st, 201, "{again}");
    assert_eq!(s(&again["network"], "ip"), ip, "released IP not reused");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn daemon_sigkill_adopts_live_vms_and_releases_dead_ones() -> Result<()> {
    let mut env = TestEnv::start().await?;
    let (st, a) = env
        .request("POST", "/instances", Some(json!({"name": "alive"})))
        .await?;
    assert_eq!(st, 201, "{a}\n{}", env.daemon_log());
    let (st, b) = env
        .request("POST", "/instances", Some(json!({"name": "doomed"})))
        .await?;
    assert_eq!(st, 201, "{b}");
    let b_ip = s(&b["network"], "ip");
    let b_pid = b["pid"].as_i64().expect("pid") as i32;
    // Its cgroup in the pids hierarchy (v1 on these hosts), to see it go.
    let b_cgroup = std::fs::read_to_string(format!("/proc/{b_pid}/cgroup"))?
        .lines()
        .find_map(|l| l.split_once(":pids:").map(|(_, p)| p.to_string()))
        .map(|p| std::path::Path::new("/sys/fs/cgroup/pids").join(p.trim_start_matches('/')));
    if let Some(d) = &b_cgroup {
        assert!(
            d.ends_with(format!("forkvm-{}-qemu", s(&b, "id"))),
            "{}",
            d.display()
        );
        assert!(d.is_dir());
    }

    env.kill_daemon()?;
    // While the daemon is down, one VM dies.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b_pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for("doomed QEMU to exit", Duration::from_secs(10), async || {
        (!std::path::Path::new(&format!("/proc/{b_pid}")).exists()).then_some(())
    })
    .await?;
    env.spawn_daemon()?;
    env.wait_ready().await?;

    let (_, a2) = env.request("GET", "/instances/alive", None).await?;
    assert_eq!(s(&a2, "state"), "Running", "{a2}");
    let out = exec(&env, "alive", &["echo", "still-here"]).await?;
    assert_eq!(s(&out, "stdout").trim(), "still-here");
    let (_, b2) = env.request("GET", "/instances/doomed", None).await?;
    assert_eq!(s(&b2, "state"), "Stopped", "{b2}");
    assert!(
        b2["network"]["ip"].is_null(),
        "released IP still shown: {b2}"
    );
    assert!(
        !s(&b2, "state_error").is_empty(),
        "no reason recorded: {b2}"
    );
    // The restarted daemon removed the dead VM's cgroup.
    if let Some(d) = &b_cgroup {
        assert!(!d.exists(), "{} outlived its VM", d.display());
    }
    // Its IP is free again: a new instance may take it.
    let (st, c) = env
        .request("POST", "/instances", Some(json!({"name": "newcomer"})))
        .await?;
    assert_eq!(st, 201, "{c}");
    assert_eq!(
        s(&c["network"], "ip"),
        b_ip,
        "dead VM's IP was not released"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_and_changes_nothing() -> Result<()> {
    let env = TestEnv::start().await?;
    let (st, ok) = env
        .request("POST", "/instances", Some(json!({"name": "taken"})))
        .await?;
    assert_eq!(st, 201, "{ok}\n{}", env.daemon_log());
    let before = env.request("GET", "/instances", None).await?.1;

    for bad in [
        "",
        "-x",
        "x-",
        "UPPER",
        "under_score",
        "dot.ted",
        "../etc",
        &"a".repeat(64),
    ] {
        let (st, v) = env
            .request("POST", "/instances", Some(json!({"name": bad})))
            .await?;
        assert_eq!(st, 400, "name {bad:?}: {v}");
        assert!(!s(&v, "message").is_empty(), "{v}");
    }
    let (st, v) = env
        .request("POST", "/instances", Some(json!({"name": "taken"})))
        .await?;
    assert_eq!(st, 409, "{v}");
    assert!(s(&v, "message").contains("taken"), "{v}");
    let (st, v) = env
        .request_raw("POST", "/instances", Some("{not json".into()))
        .await?;
    assert_eq!(st, 400, "{v}");
    assert!(!s(&v, "message").is_empty(), "{v}");
    let (st, v) = env
        .request("POST", "/instances", Some(json!({"name": 5})))
        .await?;
    assert_eq!(st, 400, "{v}");
    for (m, p) in [
        ("GET", "/instances/nope"),
        ("DELETE", "/instances/nope"),
        ("POST", "/instances/nope/stop"),
        ("POST", "/instances/nope/start"),
        ("POST", "/instances/nope/exec"),
        ("GET", "/instances/nope/logs"),
    ] {
        let body = (p.ends_with("exec")).then(|| json!({"command": ["true"]}));
        let (st, v) = env.request(m, p, body).await?;
        assert_eq!(st, 404, "{m} {p}: {v}");
        assert!(!s(&v, "message").is_empty(), "{v}");
    }
    let (st, v) = env
        .request(
            "POST",
            "/instances/taken/exec",
            Some(json!({"command": []})),
        )
        .await?;
    assert_eq!(st, 400, "empty command: {v}");

    let after = env.request("GET", "/instances", None).await?.1;
    assert_eq!(before, after, "rejected requests changed state");
    assert_eq!(env.qemu_pids().len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_returns_large_output_whole_up_to_the_documented_cap() -> Result<()> {
    let env = TestEnv::start().await?;
    let a = env.create(json!({"name": "chatty"})).await?;
    let id = s(&a, "id");
    // 6 MB: over tonic's default 4 MiB reply limit, under the cap.
    let v = exec(
        &env,
        &id,
        &["sh", "-c", "head -c 6000000 /dev/zero | tr '\\0' a"],
    )
    .await?;
    let out = v["stdout"].as_str().unwrap_or_default();
    assert_eq!(out.len(), 6_000_000, "exit {}", v["exit_code"]);
    assert!(out.bytes().all(|b| b == b'a'));
    // Past the cap: exactly the cap comes back, and the command still ends.
    let v = exec(
        &env,
        &id,
        &[
            "sh",
            "-c",
            "head -c 17000000 /dev/zero | tr '\\0' b; echo done >&2",
        ],
    )
    .await?;
    assert_eq!(v["exit_code"], 0, "{}", v["stderr"]);
    assert_eq!(
        v["stdout"].as_str().map(str::len),
        Some(forkvm_proto::EXEC_OUTPUT_CAP)
    );
    assert_eq!(v["stderr"].as_str().map(str::trim), Some("done"));
    Ok(())
}
