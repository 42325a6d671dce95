//! Standby, restore and fork against real VMs: every fork must answer on its
//! own new address from the host side of the bridge.

use anyhow::{Result, ensure};
use forkvm_e2e::{TestEnv, ip, s, wait_for};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::Duration;

/// Start busybox httpd serving a page that names the instance.
async fn serve_http(env: &TestEnv, id: &str, page: &str) -> Result<()> {
    env.exec_ok(
        id,
        &[
            "sh",
            "-c",
            &format!(
                "mkdir -p /var/www && echo {page} > /var/www/index.html && httpd -p 80 -h /var/www"
            ),
        ],
    )
    .await?;
    Ok(())
}

fn stages(v: &Value) -> String {
    v["handoff"]["stages_ms"].to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_running_source_into_three_each_on_its_own_address() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env.create(json!({"name": "src"})).await?;
    let src_id = s(&src, "id");
    serve_http(&env, &src_id, "hello-from-source").await?;
    env.exec_ok(&src_id, &["sh", "-c", "echo precious > /root/file"])
        .await?;
    ensure!(
        env.http_get(&format!("http://{}/", ip(&src)))
            .is_some_and(|b| b.contains("hello-from-source"))
    );

    let (st, forks) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "f", "from_running": true, "count": 3})),
        )
        .await?;
    assert_eq!(st, 201, "{forks}\n{}", env.daemon_log());
    let forks = forks.as_array().cloned().unwrap_or_default();
    assert_eq!(forks.len(), 3, "{forks:?}");

    let mut ips = HashSet::from([ip(&src)]);
    let mut macs = HashSet::from([s(&src["network"], "mac")]);
    let mut taps = HashSet::from([s(&src["network"], "tap")]);
    for (i, f) in forks.iter().enumerate() {
        assert!(f.get("error").is_none(), "fork {i} failed: {f}");
        assert_eq!(s(f, "name"), format!("f-{}", i + 1));
        assert_eq!(s(f, "state"), "Running", "{f}");
        let path = s(&f["handoff"], "path");
        assert!(
            path == "rpc" || path == "mailbox",
            "handoff path {path}: {f}"
        );
        println!(
            "fork {} ip {} path {path} stages {}",
            s(f, "name"),
            ip(f),
            stages(f)
        );
        let (fid, fip, fmac) = (s(f, "id"), ip(f), s(&f["network"], "mac"));
        assert!(ips.insert(fip.clone()), "duplicate IP {fip}");
        assert!(macs.insert(fmac.clone()), "duplicate MAC {fmac}");
        assert!(taps.insert(s(&f["network"], "tap")), "duplicate TAP");
        // The guest itself carries the new identity...
        let addr = env
            .exec_ok(&fid, &["ip", "-4", "addr", "show", "eth0"])
            .await?;
        assert!(addr.contains(&format!("{fip}/")), "fork {fid} addr: {addr}");
        assert!(
            !addr.contains(&format!("{}/", ip(&src))),
            "fork kept the source IP: {addr}"
        );
        let link = env.exec_ok(&fid, &["ip", "link", "show", "eth0"]).await?;
        assert!(link.contains(&fmac), "fork {fid} link: {link}");
        // ...kept the source's state...
        assert_eq!(
            env.exec_ok(&fid, &["cat", "/root/file"]).await?.trim(),
            "precious"
        );
        // ...and answers from the host on its own address.
        let body = env.http_get(&format!("http://{fip}/"));
        assert!(
            body.as_deref()
                .is_some_and(|b| b.contains("hello-from-source")),
            "HTTP on {fip}: {body:?}"
        );
    }
    // The source still answers on its own address.
    let (_, src2) = env
        .request("GET", &format!("/instances/{src_id}"), None)
        .await?;
    assert_eq!(s(&src2, "state"), "Running");
    assert_eq!(ip(&src2), ip(&src));
    assert!(
        env.http_get(&format!("http://{}/", ip(&src))).is_some(),
        "source stopped answering"
    );
    // A fork's address belongs to it alone: ping each once more.
    for f in &forks {
        assert!(env.ping(&ip(f)), "fork {} does not answer ping", ip(f));
    }
    assert_eq!(env.qemu_pids().len(), 4);

    // Deleting the source leaves the forks intact.
    let (st, _) = env
        .request("DELETE", &format!("/instances/{src_id}"), None)
        .await?;
    assert_eq!(st, 204);
    for f in &forks {
        assert!(
            env.http_get(&format!("http://{}/", ip(f))).is_some(),
            "fork died with its source"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn standby_restore_keeps_address_and_processes() -> Result<()> {
    let env = TestEnv::start().await?;
    let a = env.create(json!({"name": "counter"})).await?;
    let id = s(&a, "id");
    env.exec_ok(
        &id,
        &["sh", "-c", "(i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done) >/dev/null 2>&1 &"],
    )
    .await?;
    let read = async || -> Result<u64> {
        Ok(env
            .exec_ok(&id, &["cat", "/tmp/count"])
            .await?
            .trim()
            .parse()?)
    };
    wait_for("counter to start", Duration::from_secs(10), async || {
        read().await.ok().filter(|n| *n > 2)
    })
    .await?;
    let before = read().await?;

    let (st, sb) = env
        .request("POST", &format!("/instances/{id}/standby"), None)
        .await?;
    assert_eq!(st, 200, "{sb}\n{}", env.daemon_log());
    assert_eq!(s(&sb, "state"), "Standby");
    assert_eq!(sb["has_snapshot"], true, "{sb}");
    assert!(env.qemu_pids().is_empty(), "QEMU still running in standby");
    assert!(!env.ping(&ip(&a)));
    let (st, snaps) = env.request("GET", "/snapshots", None).await?;
    assert_eq!(st, 200);
    assert_eq!(snaps.as_array().map(|v| v.len()), Some(1), "{snaps}");
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{id}/exec"),
            Some(json!({"command": ["true"]})),
        )
        .await?;
    assert_eq!(st, 409, "exec in standby: {v}");

    let (st, back) = env
        .request("POST", &format!("/instances/{id}/restore"), None)
        .await?;
    assert_eq!(st, 200, "{back}\n{}", env.daemon_log());
    assert_eq!(s(&back, "state"), "Running");
    assert_eq!(ip(&back), ip(&a), "restore changed the address");
    assert_eq!(s(&back["network"], "mac"), s(&a["network"], "mac"));
    assert!(env.ping(&ip(&a)), "restored guest does not answer ping");
    let after = read().await?;
    assert!(after >= before, "counter went back: {before} -> {after}");
    // It keeps counting (the process survived, it was not restarted).
    wait_for("counter to advance", Duration::from_secs(10), async || {
        read().await.ok().filter(|n| *n > after)
    })
    .await?;
    assert!(
        after < before + 1000,
        "counter restarted? {before} -> {after}"
    );
    // The guest clock was stepped to the host's.
    let guest_now: i64 = env.exec_ok(&id, &["date", "+%s"]).await?.trim().parse()?;
    let host_now = chrono_now();
    assert!(
        (guest_now - host_now).abs() <= 5,
        "guest clock {guest_now} vs host {host_now}"
    );
    let (_, snaps) = env.request("GET", "/snapshots", None).await?;
    assert_eq!(
        snaps.as_array().map(|v| v.len()),
        Some(0),
        "standby snapshot left: {snaps}"
    );
    Ok(())
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_from_standby_and_snapshot_with_every_target_state() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env.create(json!({"name": "base"})).await?;
    let src_id = s(&src, "id");
    serve_http(&env, &src_id, "from-base").await?;
    let (st, _) = env
        .request("POST", &format!("/instances/{src_id}/standby"), None)
        .await?;
    assert_eq!(st, 200);

    // Fork of a Standby source: Running by default.
    let (st, f1) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "sb-fork"})),
        )
        .await?;
    assert_eq!(st, 201, "{f1}\n{}", env.daemon_log());
    assert_eq!(s(&f1, "state"), "Running");
    assert_ne!(ip(&f1), ip(&src));
    assert!(
        env.http_get(&format!("http://{}/", ip(&f1)))
            .is_some_and(|b| b.contains("from-base"))
    );

    // target_state Standby, then restore: answers on its own address.
    let (st, f2) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "parked", "target_state": "Standby"})),
        )
        .await?;
    assert_eq!(st, 201, "{f2}");
    assert_eq!(s(&f2, "state"), "Standby");
    let (st, f2r) = env
        .request(
            "POST",
            &format!("/instances/{}/restore", s(&f2, "id")),
            None,
        )
        .await?;
    assert_eq!(st, 200, "{f2r}\n{}", env.daemon_log());
    assert_eq!(s(&f2r, "state"), "Running");
    assert_eq!(ip(&f2r), ip(&f2));
    assert!(
        env.http_get(&format!("http://{}/", ip(&f2r)))
            .is_some_and(|b| b.contains("from-base"))
    );

    // target_state Stopped, then start: a fresh boot with the fork's identity.
    let (st, f3) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "cold", "target_state": "Stopped"})),
        )
        .await?;
    assert_eq!(st, 201, "{f3}");
    assert_eq!(s(&f3, "state"), "Stopped");
    let (st, f3s) = env
        .request("POST", &format!("/instances/{}/start", s(&f3, "id")), None)
        .await?;
    assert_eq!(st, 200, "{f3s}");
    assert_eq!(ip(&f3s), ip(&f3));
    assert!(env.ping(&ip(&f3s)));

    // A stored snapshot of the (restored) source, forked.
    let (st, _) = env
        .request("POST", &format!("/instances/{src_id}/restore"), None)
        .await?;
    assert_eq!(st, 200);
    let (st, snap) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/snapshots"),
            Some(json!({"kind": "Standby", "name": "golden"})),
        )
        .await?;
    assert_eq!(st, 201, "{snap}\n{}", env.daemon_log());
    let (st, f4) = env
        .request(
            "POST",
            &format!("/snapshots/{}/fork", s(&snap, "id")),
            Some(json!({"name": "from-snap"})),
        )
        .await?;
    assert_eq!(st, 201, "{f4}\n{}", env.daemon_log());
    assert_eq!(s(&f4, "state"), "Running");
    assert!(
        env.http_get(&format!("http://{}/", ip(&f4)))
            .is_some_and(|b| b.contains("from-base"))
    );
    let all: HashSet<String> = [&src, &f1, &f2, &f3, &f4].iter().map(|v| ip(v)).collect();
    assert_eq!(all.len(), 5, "addresses collide: {all:?}");
    let (st, _) = env
        .request("DELETE", &format!("/snapshots/{}", s(&snap, "id")), None)
        .await?;
    assert_eq!(st, 204);
    // The fork outlives the snapshot it came from.
    assert!(env.ping(&ip(&f4)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_failures_leave_nothing_behind() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env.create(json!({"name": "src"})).await?;
    let src_id = s(&src, "id");
    let before = env.request("GET", "/instances", None).await?.1;
    let links_before = env.links()?;

    // Running source without from_running: 409.
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "x"})),
        )
        .await?;
    assert_eq!(st, 409, "{v}");
    // Name clash: 409, nothing created (also for one clashing name of a batch).
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "src", "from_running": true})),
        )
        .await?;
    assert_eq!(st, 409, "{v}");
    let _ = env.create(json!({"name": "dup-2"})).await?;
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "dup", "count": 3, "from_running": true})),
        )
        .await?;
    assert_eq!(st, 409, "{v}");
    let (st, _) = env.request("DELETE", "/instances/dup-2", None).await?;
    assert_eq!(st, 204);
    // Bad names / counts / states: 400.
    for body in [
        json!({"name": "Bad", "from_running": true}),
        json!({"name": "ok", "count": 0, "from_running": true}),
        json!({"name": "ok", "target_state": "Paused", "from_running": true}),
    ] {
        let (st, v) = env
            .request(
                "POST",
                &format!("/instances/{src_id}/fork"),
                Some(body.clone()),
            )
            .await?;
        assert_eq!(st, 400, "{body} -> {v}");
    }
    // Stopped source without a snapshot: 409.
    let (st, _) = env
        .request("POST", &format!("/instances/{src_id}/stop"), None)
        .await?;
    assert_eq!(st, 200);
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "y"})),
        )
        .await?;
    assert_eq!(st, 409, "{v}");
    assert!(!s(&v, "message").is_empty());
    let (st, _) = env
        .request("POST", &format!("/instances/{src_id}/start"), None)
        .await?;
    assert_eq!(st, 200);

    let after = env.request("GET", "/instances", None).await?.1;
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|i| s(i, "name")).collect())
            .unwrap_or_default()
    };
    assert_eq!(names(&before), names(&after));
    assert_eq!(env.links()?, links_before, "TAPs changed");
    assert_eq!(env.qemu_pids().len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_fallback_when_agent_declines_reconfigure() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env
        .create(json!({"name": "old-agent", "env": {"FORKVM_AGENT_DECLINE_RECONFIGURE": "1"}}))
        .await?;
    let (st, f) = env
        .request(
            "POST",
            &format!("/instances/{}/fork", s(&src, "id")),
            Some(json!({"name": "fb", "from_running": true, "handoff": "rpc"})),
        )
        .await?;
    assert_eq!(st, 201, "{f}\n{}", env.daemon_log());
    assert_eq!(s(&f["handoff"], "path"), "exec", "{f}");
    // Host-initiated from the start (the mailbox would otherwise win), then
    // the agent declined the RPC.
    assert!(
        s(&f["handoff"], "fallback_reason").contains("does not implement"),
        "{f}"
    );
    let addr = env
        .exec_ok(&s(&f, "id"), &["ip", "-4", "addr", "show", "eth0"])
        .await?;
    assert!(addr.contains(&format!("{}/", ip(&f))), "{addr}");
    assert!(env.ping(&ip(&f)));
    println!("exec-path fork stages {}", stages(&f));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_agent_fails_the_fork_and_cleans_up() -> Result<()> {
    let env = TestEnv::start_env(&[("FORKVM_HANDOFF_TIMEOUT_MS", "6000")]).await?;
    // Test hook: from now on this guest's agent accepts RPCs but never answers.
    let src = env
        .create_with_hook("mute", "/run/forkvm-test-hang")
        .await?;
    let src_id = s(&src, "id");
    let links_before = env.links()?;
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "never", "from_running": true})),
        )
        .await?;
    assert!(st >= 500, "{st}: {v}");
    assert!(s(&v, "message").contains("did not answer"), "{v}");
    env.check_only_source_left(&links_before, &["never"])
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_for_network_false_returns_initializing_then_running() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env.create(json!({"name": "src"})).await?;
    let (st, f) = env
        .request(
            "POST",
            &format!("/instances/{}/fork", s(&src, "id")),
            Some(json!({"name": "async", "from_running": true, "wait_for_network": false})),
        )
        .await?;
    assert_eq!(st, 201, "{f}\n{}", env.daemon_log());
    assert_eq!(s(&f, "state"), "Initializing", "{f}");
    let fid = s(&f, "id");
    let done = wait_for(
        "async fork to be Running",
        Duration::from_secs(60),
        async || {
            let (_, v) = env
                .request("GET", &format!("/instances/{fid}"), None)
                .await
                .ok()?;
            (s(&v, "state") == "Running").then_some(v)
        },
    )
    .await?;
    // The background owner completed the guest-initiated handoff.
    assert_eq!(s(&done["handoff"], "path"), "mailbox", "{done}");
    assert!(env.ping(&ip(&done)));
    Ok(())
}
