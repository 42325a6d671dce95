//! The guest-initiated handoff end to end: the host writes each fork's
//! identity into the fork's memory before resume, the guest applies it and
//! acks from its new address. Fallbacks and forged payloads included.

use anyhow::{Result, ensure};
use forkvm_e2e::{TestEnv, ip, s};
use serde_json::{Value, json};
use std::collections::HashSet;

async fn agent(env: &TestEnv, id: &str) -> Result<Value> {
    let (st, v) = env
        .request("GET", &format!("/instances/{id}/agent"), None)
        .await?;
    ensure!(st == 200, "agent health -> {st}: {v}");
    Ok(v)
}

async fn fork(env: &TestEnv, src: &str, body: Value) -> Result<Value> {
    let (st, v) = env
        .request("POST", &format!("/instances/{src}/fork"), Some(body))
        .await?;
    ensure!(st == 201, "fork -> {st}: {v}\n{}", env.daemon_log());
    Ok(v)
}

/// A fork is really on its new address: guest view and host view agree.
async fn check_readdressed(env: &TestEnv, f: &Value, old_ip: &str) -> Result<()> {
    let (fid, fip) = (s(f, "id"), ip(f));
    let addr = env
        .exec_ok(&fid, &["ip", "-4", "addr", "show", "eth0"])
        .await?;
    ensure!(addr.contains(&format!("{fip}/")), "fork {fid}: {addr}");
    ensure!(
        !addr.contains(&format!("{old_ip}/")),
        "fork {fid} kept {old_ip}: {addr}"
    );
    let link = env.exec_ok(&fid, &["ip", "link", "show", "eth0"]).await?;
    ensure!(
        link.contains(&s(&f["network"], "mac")),
        "fork {fid} MAC: {link}"
    );
    ensure!(env.ping(&fip), "fork {fip} does not answer ping");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn three_forks_take_the_mailbox_path_without_any_reconfigure_rpc() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env.create(json!({"name": "src"})).await?;
    let src_id = s(&src, "id");
    let src_agent = agent(&env, &src_id).await?;
    ensure!(
        !s(&src_agent, "mailbox_marker").is_empty(),
        "source has no mailbox: {src_agent}"
    );

    let forks = fork(
        &env,
        &src_id,
        json!({"name": "m", "count": 3, "from_running": true}),
    )
    .await?;
    let forks = forks.as_array().cloned().unwrap_or_default();
    assert_eq!(forks.len(), 3);
    let mut ips = HashSet::from([ip(&src)]);
    for f in &forks {
        assert!(f.get("error").is_none(), "{f}");
        assert_eq!(s(f, "state"), "Running");
        assert_eq!(
            s(&f["handoff"], "path"),
            "mailbox",
            "{f}\n{}",
            env.daemon_log()
        );
        assert!(f["handoff"]["fallback_reason"].is_null(), "{f}");
        println!(
            "mailbox fork {} {} stages {}",
            s(f, "name"),
            ip(f),
            f["handoff"]["stages_ms"]
        );
        assert!(ips.insert(ip(f)), "duplicate IP");
        // Proof that no host→guest RPC re-addressed it.
        let a = agent(&env, &s(f, "id")).await?;
        assert_eq!(
            a["rpc_counts"]["ReconfigureNetwork"].as_u64().unwrap_or(0),
            0,
            "{a}"
        );
        // No SetClock either: the guest stepped its clock by the payload's
        // `clock_behind_ns` (checked below).
        assert_eq!(
            a["rpc_counts"]["SetClock"].as_u64().unwrap_or(0),
            src_agent["rpc_counts"]["SetClock"].as_u64().unwrap_or(0),
            "{a}"
        );
        assert_eq!(
            a["mailbox_applied"].as_u64(),
            src_agent["mailbox_applied"].as_u64().map(|n| n + 1),
            "{a}"
        );
        check_readdressed(&env, f, &ip(&src)).await?;
        // The guest's clock is the host's.
        let guest_now: i64 = env
            .exec_ok(&s(f, "id"), &["date", "+%s"])
            .await?
            .trim()
            .parse()?;
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        assert!(
            (guest_now - host_now).abs() <= 5,
            "guest clock {guest_now} vs {host_now}"
        );
    }
    // The source is untouched: a restore the host did not patch is a no-op.
    let a = agent(&env, &src_id).await?;
    assert_eq!(a["mailbox_applied"], src_agent["mailbox_applied"], "{a}");
    assert!(env.ping(&ip(&src)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_of_a_fork_at_once_uses_the_rearmed_mailbox() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env.create(json!({"name": "gen0"})).await?;
    let f1 = fork(
        &env,
        &s(&src, "id"),
        json!({"name": "gen1", "from_running": true}),
    )
    .await?;
    assert_eq!(s(&f1["handoff"], "path"), "mailbox", "{f1}");
    let f1_id = s(&f1, "id");
    // Forked again the moment its fork call returned: the agent re-armed
    // before its ack reached the host, so the mailbox is ready — a fork
    // tree (fork, run a step, fork again) never drops to the slow path.
    let f2 = fork(&env, &f1_id, json!({"name": "gen2", "from_running": true})).await?;
    assert_eq!(
        s(&f2["handoff"], "path"),
        "mailbox",
        "{f2}\n{}",
        env.daemon_log()
    );
    check_readdressed(&env, &f2, &ip(&f1)).await?;
    assert!(env.ping(&ip(&f1)), "gen1 lost its address");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn overwritten_marker_falls_back_to_rpc() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env.create(json!({"name": "src"})).await?;
    let src_id = s(&src, "id");
    let gpa = agent(&env, &src_id).await?["mailbox_gpa"]
        .as_u64()
        .unwrap_or_default();
    let (st, snap) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/snapshots"),
            Some(json!({"kind": "Standby"})),
        )
        .await?;
    assert_eq!(st, 201, "{snap}");
    // Overwrite the marker in the snapshot's memory (as stale or hostile
    // memory would): the host must not write anywhere.
    let mem = env
        .mem_dir
        .join("bases")
        .join(format!("{}.mem", s(&snap, "base_id")));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&mem)?;
        f.write_all_at(&[0xAA; 16], gpa + 8)?;
    }
    // While that fork falls back, other API requests stay fast: the host
    // reads one page and never searches the guest's memory.
    let done = std::sync::atomic::AtomicBool::new(false);
    let fork = async {
        let r = env
            .request(
                "POST",
                &format!("/snapshots/{}/fork", s(&snap, "id")),
                Some(json!({"name": "nomark"})),
            )
            .await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    };
    let probe = async {
        let mut ms = Vec::new();
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let t = std::time::Instant::now();
            let (st, _) = env.request("GET", "/instances", None).await?;
            assert_eq!(st, 200);
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        anyhow::Ok(ms)
    };
    let (f, ms) = tokio::join!(fork, probe);
    let ((st, f), mut ms) = (f?, ms?);
    assert_eq!(st, 201, "{f}\n{}", env.daemon_log());
    ms.sort_by(f64::total_cmp);
    let median = ms.get(ms.len() / 2).copied().unwrap_or_default();
    println!(
        "GET /instances during the fork: {} requests, median {median:.1} ms, max {:.1} ms",
        ms.len(),
        ms.last().copied().unwrap_or_default()
    );
    assert!(!ms.is_empty() && median < 100.0, "{ms:?}");
    assert_eq!(s(&f["handoff"], "path"), "rpc", "{f}");
    assert!(
        s(&f["handoff"], "fallback_reason").contains("marker"),
        "{f}"
    );
    check_readdressed(&env, &f, &ip(&src)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unbindable_ack_listener_falls_back_to_rpc() -> Result<()> {
    // 192.0.2.1 (TEST-NET-1) is on no interface: the bind fails, nothing is sent.
    let env = TestEnv::start_env(&[("FORKVM_TEST_ACK_BIND_ADDR", "192.0.2.1")]).await?;
    let src = env.create(json!({"name": "src"})).await?;
    let f = fork(
        &env,
        &s(&src, "id"),
        json!({"name": "nobind", "from_running": true}),
    )
    .await?;
    assert_eq!(s(&f["handoff"], "path"), "rpc", "{f}");
    assert!(s(&f["handoff"], "fallback_reason").contains("bind"), "{f}");
    check_readdressed(&env, &f, &ip(&src)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_guest_falls_back_to_rpc_after_the_ack_deadline() -> Result<()> {
    let env = TestEnv::start_env(&[("FORKVM_MAILBOX_ACK_TIMEOUT_MS", "1500")]).await?;
    let src = env
        .create(json!({"name": "src", "env": {"FORKVM_AGENT_DISABLE_MAILBOX": "1"}}))
        .await?;
    let f = fork(
        &env,
        &s(&src, "id"),
        json!({"name": "silent", "from_running": true}),
    )
    .await?;
    assert_eq!(s(&f["handoff"], "path"), "rpc", "{f}");
    let why = s(&f["handoff"], "fallback_reason");
    assert!(
        why.contains("did not pick up") || why.contains("no valid mailbox ack"),
        "{f}"
    );
    check_readdressed(&env, &f, &ip(&src)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_payloads_are_rejected_by_the_guest() -> Result<()> {
    let env =
        TestEnv::start_env(&[("FORKVM_TEST_MAILBOX_FORGE", "crc,version,mac,prefix")]).await?;
    let src = env.create(json!({"name": "src"})).await?;
    let forks = fork(
        &env,
        &s(&src, "id"),
        json!({"name": "forged", "count": 4, "from_running": true}),
    )
    .await?;
    for f in forks.as_array().cloned().unwrap_or_default() {
        assert!(f.get("error").is_none(), "{f}");
        // The guest refused the payload and said so; the host fell back at once.
        assert_eq!(s(&f["handoff"], "path"), "rpc", "{f}");
        assert!(
            s(&f["handoff"], "fallback_reason").contains("rejected"),
            "{f}"
        );
        let a = agent(&env, &s(&f, "id")).await?;
        assert_eq!(a["mailbox_rejected"].as_u64(), Some(1), "{a}");
        assert_eq!(a["mailbox_applied"].as_u64(), Some(0), "{a}");
        check_readdressed(&env, &f, &ip(&src)).await?;
    }
    Ok(())
}
