//! Guest and VMM faults around a resume: a guest kernel that panics right
//! after a fork resumes, and QEMU dying while a fork or a restore loads its
//! snapshot. Each must end in a truthful instance list, nothing leaked and
//! nothing lost.

use anyhow::{Result, ensure};
use forkvm_e2e::{TestEnv, ip, s, wait_for};
use serde_json::{Value, json};
use std::time::Duration;

async fn instance(env: &TestEnv, id: &str) -> Result<(u16, Value)> {
    env.request("GET", &format!("/instances/{id}"), None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_kernel_panic_after_resume_is_reported_and_cleaned_up() -> Result<()> {
    let env = TestEnv::start_env(&[("FORKVM_HANDOFF_TIMEOUT_MS", "15000")]).await?;
    let src = env.create(json!({"name": "src"})).await?;
    let src_id = s(&src, "id");
    // A process in the source that panics the kernel as soon as the guest
    // it runs in gets another hostname: that only happens in a fork, when
    // the new identity is applied.
    env.exec_ok(
        &src_id,
        &[
            "sh",
            "-c",
            "h=$(hostname); (while [ \"$(hostname)\" = \"$h\" ]; do sleep 0.2; done; \
             echo c > /proc/sysrq-trigger) >/dev/null 2>&1 &",
        ],
    )
    .await?;
    let links_before = env.links()?;

    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "doomed", "from_running": true})),
        )
        .await?;
    // The panic races the ack: either the fork fails (and is gone), or it
    // became Running and must then be seen Stopped with the reason.
    if st == 201 {
        let fid = s(&v, "id");
        let stopped = wait_for(
            "the panicked fork to be Stopped",
            Duration::from_secs(30),
            async || {
                let (_, f) = instance(&env, &fid).await.ok()?;
                (s(&f, "state") == "Stopped").then_some(f)
            },
        )
        .await?;
        let why = s(&stopped, "state_error");
        ensure!(
            why.contains("exited unexpectedly") && why.contains("Kernel panic"),
            "state_error: {why}"
        );
        let (_, logs) = env
            .request("GET", &format!("/instances/{fid}/logs"), None)
            .await?;
        let logs = logs
            .as_str()
            .map(str::to_string)
            .unwrap_or(logs.to_string());
        ensure!(
            logs.contains("Kernel panic"),
            "console has no panic: {logs}"
        );
        ensure!(
            stopped["network"]["ip"].is_null(),
            "address kept: {stopped}"
        );
        let (st, _) = env
            .request("DELETE", &format!("/instances/{fid}"), None)
            .await?;
        ensure!(st == 204);
    } else {
        ensure!(st >= 500, "{st}: {v}");
        ensure!(!s(&v, "message").is_empty(), "{v}");
    }
    // Nothing of the fork remains; the source is untouched.
    env.check_only_source_left(&links_before, &["doomed"])
        .await?;
    let (_, src2) = instance(&env, &src_id).await?;
    assert_eq!(s(&src2, "state"), "Running");
    let host = env.exec_ok(&src_id, &["hostname"]).await?;
    assert_eq!(host.trim(), "src");
    assert!(env.ping(&ip(&src2)), "source stopped answering");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_killed_while_a_fork_loads_fails_it_cleanly() -> Result<()> {
    let env = TestEnv::start_env(&[("FORKVM_TEST_KILL_VMM_AT", "resume:state_loaded")]).await?;
    let src = env.create(json!({"name": "src"})).await?;
    let src_id = s(&src, "id");
    let links_before = env.links()?;
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "lost", "count": 2, "from_running": true})),
        )
        .await?;
    // Every fork of the batch reports its own error.
    assert_eq!(st, 201, "{v}");
    let items = v.as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2, "{v}");
    for it in &items {
        assert!(
            it.get("error").is_some_and(|e| !e.to_string().is_empty()),
            "fork did not fail: {it}"
        );
    }
    env.check_only_source_left(&links_before, &["lost-1", "lost-2"])
        .await?;
    let (_, snaps) = env.request("GET", "/snapshots", None).await?;
    assert_eq!(snaps.as_array().map(Vec::len), Some(0), "{snaps}");
    env.exec_ok(&src_id, &["true"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_killed_mid_restore_keeps_the_standby_and_loses_nothing() -> Result<()> {
    let mut env = TestEnv::start().await?;
    let a = env.create(json!({"name": "keeper"})).await?;
    let id = s(&a, "id");
    env.exec_ok(&id, &["sh", "-c", "echo 41 > /tmp/state; sleep 100000 &"])
        .await?;
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/standby"), None)
        .await?;
    assert_eq!(st, 200, "{v}");

    // Restart the daemon with QEMU set to die right after loading the state.
    env.kill_daemon()?;
    env.daemon_env.push((
        "FORKVM_TEST_KILL_VMM_AT".into(),
        "resume:state_loaded".into(),
    ));
    env.spawn_daemon()?;
    env.wait_ready().await?;
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/restore"), None)
        .await?;
    assert!(st >= 500, "{st}: {v}");
    assert!(!s(&v, "message").is_empty(), "{v}");
    let (_, back) = instance(&env, &id).await?;
    assert_eq!(s(&back, "state"), "Standby", "{back}");
    assert!(!s(&back, "state_error").is_empty(), "{back}");
    assert!(env.qemu_pids().is_empty(), "QEMU left behind");

    // Without the fault the same standby restores, with its processes and files.
    env.kill_daemon()?;
    env.daemon_env.clear();
    env.spawn_daemon()?;
    env.wait_ready().await?;
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/restore"), None)
        .await?;
    assert_eq!(st, 200, "{v}");
    assert_eq!(s(&v, "state"), "Running");
    assert_eq!(env.exec_ok(&id, &["cat", "/tmp/state"]).await?.trim(), "41");
    let ps = env.exec_ok(&id, &["ps"]).await?;
    assert!(ps.contains("sleep 100000"), "process lost: {ps}");
    assert!(env.ping(&ip(&v)), "restored VM does not answer");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_failing_after_resume_stops_the_instance_instead_of_keeping_a_spent_standby()
-> Result<()> {
    let env = TestEnv::start_env(&[("FORKVM_HANDOFF_TIMEOUT_MS", "5000")]).await?;
    // Test hook: from now on this guest's agent accepts RPCs but never answers.
    let a = env
        .create_with_hook("mute", "/run/forkvm-test-hang")
        .await?;
    let id = s(&a, "id");
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/standby"), None)
        .await?;
    assert_eq!(st, 200, "{v}");
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/restore"), None)
        .await?;
    assert!(st >= 500, "{st}: {v}");
    let (_, back) = instance(&env, &id).await?;
    assert_eq!(s(&back, "state"), "Stopped", "{back}");
    assert!(s(&back, "state_error").contains("spent"), "{back}");
    let (_, snaps) = env.request("GET", "/snapshots", None).await?;
    assert_eq!(snaps.as_array().map(Vec::len), Some(0), "{snaps}");
    assert!(env.qemu_pids().is_empty(), "QEMU left behind");
    assert!(env.mem_files().is_empty(), "memory files left");
    // A clean boot brings it back (the hang file lived in the old memory).
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/start"), None)
        .await?;
    assert_eq!(st, 200, "{v}");
    env.exec_ok(&id, &["true"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_dying_mid_handoff_fails_the_fork_within_its_deadline() -> Result<()> {
    let env = TestEnv::start_env(&[("FORKVM_HANDOFF_TIMEOUT_MS", "8000")]).await?;
    // Test hook: the guest kernel panics as soon as its agent sees a
    // mailbox payload, before applying or acking anything. Only forks see
    // one; the source keeps running.
    let src = env
        .create_with_hook("src", "/run/forkvm-test-crash-on-payload")
        .await?;
    let src_id = s(&src, "id");
    let links_before = env.links()?;
    let t = std::time::Instant::now();
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "dies", "from_running": true})),
        )
        .await?;
    let took = t.elapsed();
    assert!(st >= 500, "{st}: {v}");
    let msg = s(&v, "message");
    assert!(
        msg.contains("exited during the network handoff") && msg.contains("Kernel panic"),
        "{v}"
    );
    // Seen when QEMU exits, well before the ack (5 s) and handoff (8 s)
    // deadlines would have run out.
    assert!(took < Duration::from_secs(10), "fork took {took:?}");
    env.check_only_source_left(&links_before, &["dies"]).await?;
    let (_, src2) = instance(&env, &src_id).await?;
    assert_eq!(s(&src2, "state"), "Running");
    assert!(env.ping(&ip(&src2)), "source stopped answering");
    Ok(())
}
