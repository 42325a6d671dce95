//! Adoption after a daemon restart: each action of the table carried out on
//! records left as a crash leaves them, and orphans removed.

use super::*;
use crate::model::HandoffPath;
use crate::testkit::{HvOp, World};
use forkvm_vmm::RunState;

/// Rewrites an instance's record as a crash at some point would leave it.
fn edit(w: &World, name: &str, f: impl FnOnce(&mut Instance)) {
    let store = &w.mgr.services().store;
    let mut i = store.find_instance(name).unwrap().unwrap();
    f(&mut i);
    store.update_instance(&i).unwrap();
}

#[tokio::test]
async fn a_vm_that_died_while_the_daemon_was_down_is_stopped() {
    let mut w = World::new().await;
    let i = w.running("web").await;
    w.hv.kill(&i.id);
    w.restart().await;
    let gone = w.mgr.get("web").await.unwrap();
    assert_eq!(gone.state, InstanceState::Stopped);
    assert!(gone.state_error.unwrap().contains("daemon was not running"));
    assert!(gone.network.ip.is_none());
    w.assert_only(&["web"]).await;
}

#[tokio::test]
async fn a_source_left_paused_by_a_capture_is_resumed() {
    let mut w = World::new().await;
    let i = w.running("web").await;
    w.hv.set_state(&i.id, RunState::PostMigrate);
    w.restart().await;
    source_intact(&w, "web").await;
}

#[tokio::test]
async fn a_running_vm_is_kept_as_it_is() {
    let mut w = World::new().await;
    let i = w.running("web").await;
    let starts = w.hv.starts();
    w.restart().await;
    let again = w.mgr.get("web").await.unwrap();
    assert_eq!((again.state, again.pid), (InstanceState::Running, i.pid));
    assert_eq!(w.hv.starts(), starts);
}

#[tokio::test]
async fn an_interrupted_boot_finishes_when_the_agent_answers() {
    let mut w = World::new().await;
    w.running("web").await;
    edit(&w, "web", |i| i.state = InstanceState::Initializing);
    w.restart().await;
    assert_eq!(
        w.mgr.get("web").await.unwrap().state,
        InstanceState::Running
    );
}

#[tokio::test]
async fn an_interrupted_fork_whose_vm_runs_is_finished_over_rpc() {
    let mut w = World::new().await;
    w.running("src").await;
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    // As if the daemon died during the handoff (crash point "fork:handoff").
    edit(&w, "f", |i| {
        i.state = InstanceState::Initializing;
        i.pending_handoff = true;
    });
    w.restart().await;
    let done = w.mgr.get("f").await.unwrap();
    assert_eq!(done.state, InstanceState::Running);
    let h = done.handoff.unwrap();
    assert_eq!(h.path, Some(HandoffPath::Rpc));
    assert_eq!(
        h.fallback_reason.as_deref(),
        Some("daemon restarted during the handoff")
    );
    assert_eq!(w.agent.calls("ReconfigureNetwork", &f.id), 2);
    w.assert_only(&["src", "f"]).await;
}

#[tokio::test]
async fn an_interrupted_fork_without_its_vm_is_removed() {
    let mut w = World::new().await;
    w.running("src").await;
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    edit(&w, "f", |i| {
        i.state = InstanceState::Initializing;
        i.pending_handoff = true;
    });
    w.hv.kill(&f.id);
    w.restart().await;
    w.assert_only(&["src"]).await;
}

#[tokio::test]
async fn a_restore_interrupted_before_resume_returns_to_standby() {
    let mut w = World::new().await;
    w.running("web").await;
    let sb = w.mgr.standby("web").await.unwrap();
    let sid = sb.snapshot_id.clone().unwrap();
    // The restore had moved the memory out of the snapshot and recorded
    // the new VMM's state, then the daemon died before any VMM ran.
    std::fs::rename(w.base_file(&sid), w.mem_file(&sb.id)).unwrap();
    edit(&w, "web", |i| i.state = InstanceState::Initializing);
    w.restart().await;
    let back = w.mgr.get("web").await.unwrap();
    assert_eq!(back.state, InstanceState::Standby);
    assert!(back.state_error.unwrap().contains("interrupted"));
    w.assert_only(&["web"]).await;
    assert_eq!(
        w.mgr.restore("web").await.unwrap().state,
        InstanceState::Running
    );
}

#[tokio::test]
async fn a_restore_interrupted_after_resume_finishes() {
    let mut w = World::new().await;
    let i = w.running("web").await;
    w.mgr.standby("web").await.unwrap();
    let sid = w.mgr.get("web").await.unwrap().snapshot_id.unwrap();
    // The restored VM runs; the record still points at the snapshot.
    let r = w.mgr.restore("web").await.unwrap();
    edit(&w, "web", |rec| {
        rec.state = InstanceState::Initializing;
        rec.snapshot_id = Some(sid.clone());
    });
    w.restart().await;
    let done = w.mgr.get("web").await.unwrap();
    assert_eq!(done.state, InstanceState::Running);
    assert!(done.snapshot_id.is_none());
    assert_eq!((done.pid, done.network.ip), (r.pid, i.network.ip));
    w.assert_only(&["web"]).await;
}

#[tokio::test]
async fn a_standby_cut_short_after_its_commit_is_finished() {
    let mut w = World::new().await;
    w.running("web").await;
    let sb = w.mgr.standby("web").await.unwrap();
    let sid = sb.snapshot_id.clone().unwrap();
    // The commit was recorded but the memory not yet moved.
    std::fs::rename(w.base_file(&sid), w.mem_file(&sb.id)).unwrap();
    w.restart().await;
    assert!(!w.mem_file(&sb.id).exists());
    w.assert_only(&["web"]).await;
    assert_eq!(
        w.mgr.restore("web").await.unwrap().state,
        InstanceState::Running
    );
}

#[tokio::test]
async fn orphans_are_removed() {
    let mut w = World::new().await;
    w.running("web").await;
    w.net.add_stray("fvm-deadbeef");
    let stray_dir = w.cfg.data_dir.join("instances").join("00000000deadbeef");
    std::fs::create_dir_all(&stray_dir).unwrap();
    let stray_snap = w.cfg.data_dir.join("snapshots").join("0000000000000bad");
    std::fs::create_dir_all(&stray_snap).unwrap();
    w.restart().await;
    assert!(!stray_dir.exists() && !stray_snap.exists());
    assert!(!w.net.ports().contains("fvm-deadbeef"));
    w.assert_only(&["web"]).await;
}

#[tokio::test]
async fn a_qemu_that_survives_its_stop_is_found_again_and_stopped_at_restart() {
    let mut w = World::new().await;
    let i = w.running("web").await;
    let pid = i.pid.unwrap();
    w.hv.fail(HvOp::Stop);
    let stopped = w.mgr.stop("web").await.unwrap();
    assert_eq!(stopped.state, InstanceState::Stopped);
    assert!(w.hv.vm_of(pid).is_some(), "the fake QEMU survived");
    let paths = w.mgr.services().paths(&stopped);
    assert_eq!(paths.read_pid(), Some(pid), "its pidfile was kept");
    w.hv.heal();
    w.restart().await;
    assert!(w.hv.vm_of(pid).is_none(), "stopped at restart");
    let after = w.mgr.get("web").await.unwrap();
    assert_eq!((after.state, after.pid), (InstanceState::Stopped, None));
}

#[tokio::test]
async fn a_deleted_instance_whose_qemu_survived_is_swept_at_restart() {
    let mut w = World::new().await;
    let i = w.running("web").await;
    let pid = i.pid.unwrap();
    let dir = w.mgr.services().paths(&i).dir;
    w.hv.fail(HvOp::Stop);
    w.mgr.delete("web").await.unwrap();
    assert!(
        dir.exists() && w.hv.vm_of(pid).is_some(),
        "kept for the sweep"
    );
    w.hv.heal();
    w.restart().await;
    assert!(w.hv.vm_of(pid).is_none() && !dir.exists());
}
