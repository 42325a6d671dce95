//! Crash consistency: the daemon is SIGKILLed at each stage of a fork, of a
//! standby and of a restore (a test hook makes it kill itself there); after
//! a restart the state has converged — a fork is a working Running instance
//! or gone with all its resources, the source is Running, a standby or
//! restore comes back with its files and processes, and nothing is orphaned.

use anyhow::{Result, ensure};
use forkvm_e2e::{TestEnv, s};
use serde_json::json;
use std::collections::HashSet;

async fn crash_during_fork_at(point: &str) -> Result<()> {
    let mut env = TestEnv::start_env(&[("FORKVM_TEST_CRASH_AT", point)]).await?;
    let (st, src) = env
        .request("POST", "/instances", Some(json!({"name": "src"})))
        .await?;
    ensure!(st == 201, "{src}\n{}", env.daemon_log());
    let src_ip = s(&src["network"], "ip");
    let r = env
        .request(
            "POST",
            &format!("/instances/{}/fork", s(&src, "id")),
            Some(json!({"name": "victim", "from_running": true})),
        )
        .await;
    ensure!(
        !matches!(r, Ok((201, _))),
        "fork survived crash point {point}: {r:?}"
    );
    restart_clean(&mut env, point).await?;

    let (_, list) = env.request("GET", "/instances", None).await?;
    let list = list.as_array().cloned().unwrap_or_default();
    let src2 = list
        .iter()
        .find(|i| s(i, "name") == "src")
        .cloned()
        .unwrap_or_default();
    ensure!(
        s(&src2, "state") == "Running",
        "source after restart: {src2}"
    );
    ensure!(
        env.ping(&src_ip),
        "source does not answer after restart ({point})"
    );
    env.exec_ok("src", &["true"]).await?;
    let victim = list.iter().find(|i| s(i, "name") == "victim");
    if let Some(v) = victim {
        ensure!(
            s(v, "state") == "Running",
            "fork neither Running nor gone: {v}"
        );
        ensure!(
            env.ping(&s(&v["network"], "ip")),
            "recovered fork does not answer"
        );
    }
    println!(
        "{point}: fork {}",
        if victim.is_some() {
            "finished"
        } else {
            "removed"
        }
    );

    // Nothing orphaned: processes, ports, memory files, snapshot files.
    ensure!(
        env.qemu_pids().len() == list.len(),
        "QEMU {} vs instances {}",
        env.qemu_pids().len(),
        list.len()
    );
    let taps: HashSet<String> = list.iter().map(|i| s(&i["network"], "tap")).collect();
    let ports: HashSet<String> = env
        .links()?
        .into_iter()
        .filter(|l| l.starts_with("fvm"))
        .collect();
    ensure!(ports == taps, "ports {ports:?} vs TAPs {taps:?}");
    // Own memory files for instances with their own memory, one base per
    // base a fork maps, nothing else.
    let mems = std::fs::read_dir(&env.mem_dir)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".mem"))
        .count();
    let own = list.iter().filter(|i| i.get("base").is_none()).count();
    ensure!(
        mems == own,
        "memory files {mems} vs instances with their own {own}"
    );
    let mapped: HashSet<String> = list
        .iter()
        .map(|i| s(i, "base"))
        .filter(|b| !b.is_empty())
        .collect();
    let bases: HashSet<String> = std::fs::read_dir(env.mem_dir.join("bases"))
        .map(|d| {
            d.flatten()
                .map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .trim_end_matches(".mem")
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        bases == mapped,
        "base files {bases:?} vs bases forks map {mapped:?}"
    );
    let snap_dirs = std::fs::read_dir(env.data_dir.join("snapshots"))
        .map(|d| d.count())
        .unwrap_or(0);
    ensure!(snap_dirs == 0, "{snap_dirs} snapshot dirs left");
    // The address pool agrees: the next instance gets a free, working address.
    let (st, n) = env
        .request("POST", "/instances", Some(json!({"name": "after"})))
        .await?;
    ensure!(st == 201, "{n}");
    ensure!(
        !list
            .iter()
            .any(|i| s(&i["network"], "ip") == s(&n["network"], "ip")),
        "address handed out twice"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_allocation() -> Result<()> {
    crash_during_fork_at("fork:allocated").await
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_snapshot() -> Result<()> {
    crash_during_fork_at("fork:snapshot").await
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_vmm_start() -> Result<()> {
    crash_during_fork_at("fork:vmm_started").await
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_during_handoff() -> Result<()> {
    crash_during_fork_at("fork:handoff").await
}

/// Restart the daemon, the crash hook off.
async fn restart_clean(env: &mut TestEnv, point: &str) -> Result<()> {
    env.kill_daemon()?; // reap the dead daemon
    ensure!(
        env.daemon_log().contains("test crash point reached"),
        "crash point {point} not reached:\n{}",
        env.daemon_log()
    );
    env.daemon_env.retain(|(k, _)| k != "FORKVM_TEST_CRASH_AT");
    env.spawn_daemon()?;
    env.wait_ready().await
}

/// An instance with state worth keeping: a file and a process that counts.
async fn keeper(env: &TestEnv) -> Result<String> {
    let a = env.create(json!({"name": "keeper"})).await?;
    let id = s(&a, "id");
    env.exec_ok(
        &id,
        &["sh", "-c", "echo kept > /root/file; (i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.2; done) >/dev/null 2>&1 &"],
    )
    .await?;
    Ok(id)
}

/// The instance is Running with its file and its counting process, on its
/// address, and exactly one QEMU runs.
async fn check_kept(env: &TestEnv, id: &str) -> Result<()> {
    let (_, v) = env
        .request("GET", &format!("/instances/{id}"), None)
        .await?;
    ensure!(s(&v, "state") == "Running", "{v}");
    ensure!(env.exec_ok(id, &["cat", "/root/file"]).await?.trim() == "kept");
    let n = |t: String| t.trim().parse::<u64>().unwrap_or(0);
    let a = n(env.exec_ok(id, &["cat", "/tmp/n"]).await?);
    forkvm_e2e::wait_for(
        "the counter to advance",
        std::time::Duration::from_secs(10),
        async || {
            let b = n(env.exec_ok(id, &["cat", "/tmp/n"]).await.ok()?);
            (b > a).then_some(())
        },
    )
    .await?;
    ensure!(
        env.ping(&s(&v["network"], "ip")),
        "no answer on its address"
    );
    ensure!(
        env.qemu_pids().len() == 1,
        "QEMU processes: {:?}",
        env.qemu_pids()
    );
    let (_, snaps) = env.request("GET", "/snapshots", None).await?;
    ensure!(
        snaps.as_array().is_some_and(Vec::is_empty),
        "snapshots left: {snaps}"
    );
    Ok(())
}

async fn state_of(env: &TestEnv, id: &str) -> Result<String> {
    let (_, v) = env
        .request("GET", &format!("/instances/{id}"), None)
        .await?;
    Ok(s(&v, "state"))
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_during_standby_after_it_is_recorded() -> Result<()> {
    let point = "standby:committed";
    let mut env = TestEnv::start_env(&[("FORKVM_TEST_CRASH_AT", point)]).await?;
    let id = keeper(&env).await?;
    let r = env
        .request("POST", &format!("/instances/{id}/standby"), None)
        .await;
    ensure!(
        !matches!(r, Ok((200, _))),
        "standby survived the crash: {r:?}"
    );
    restart_clean(&mut env, point).await?;
    // Adoption finished the standby: no VMM, memory in the snapshot.
    ensure!(state_of(&env, &id).await? == "Standby");
    ensure!(env.qemu_pids().is_empty(), "paused VMM left running");
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/restore"), None)
        .await?;
    ensure!(st == 200, "{st}: {v}");
    check_kept(&env, &id).await
}

/// A keeper in Standby, then a restore the daemon dies in at `point`; the
/// daemon is restarted without the hook. Returns the env and the keeper.
async fn crash_during_restore_at(point: &str) -> Result<(TestEnv, String)> {
    let mut env = TestEnv::start().await?;
    let id = keeper(&env).await?;
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/standby"), None)
        .await?;
    ensure!(st == 200, "{v}");
    env.kill_daemon()?;
    env.daemon_env
        .push(("FORKVM_TEST_CRASH_AT".into(), point.into()));
    env.spawn_daemon()?;
    env.wait_ready().await?;
    let r = env
        .request("POST", &format!("/instances/{id}/restore"), None)
        .await;
    ensure!(
        !matches!(r, Ok((200, _))),
        "restore survived the crash: {r:?}"
    );
    restart_clean(&mut env, point).await?;
    Ok((env, id))
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_during_restore_before_resume() -> Result<()> {
    let (env, id) = crash_during_restore_at("fork:vmm_started").await?;
    // Back to Standby with nothing lost; the next restore works.
    ensure!(state_of(&env, &id).await? == "Standby");
    ensure!(
        env.qemu_pids().is_empty(),
        "VMM of the interrupted restore left"
    );
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/restore"), None)
        .await?;
    ensure!(st == 200, "{st}: {v}");
    check_kept(&env, &id).await
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_during_restore_after_resume() -> Result<()> {
    let (env, id) = crash_during_restore_at("resume:resumed").await?;
    // The guest ran on: adoption finished the restore.
    check_kept(&env, &id).await
}
