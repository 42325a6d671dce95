//! Standby, restore and snapshots: the happy path and both restore failure
//! modes (before the guest ran: nothing lost; after: the snapshot is spent).

use super::*;
use crate::testkit::{Answer, HvOp, World};

#[tokio::test]
async fn standby_then_restore_keeps_the_identity() {
    let w = World::new().await;
    let before = w.running("web").await;
    let sb = w.mgr.standby("web").await.unwrap();
    assert_eq!(sb.state, InstanceState::Standby);
    assert!(sb.pid.is_none() && !w.hv.live().contains_key(&sb.id));
    assert!(
        !w.mem_file(&sb.id).exists(),
        "memory moved into the snapshot"
    );
    w.assert_only(&["web"]).await;
    let r = w.mgr.restore("web").await.unwrap();
    assert_eq!(r.state, InstanceState::Running);
    assert_eq!(
        (r.network.ip, r.network.mac),
        (before.network.ip, before.network.mac)
    );
    assert!(r.snapshot_id.is_none());
    assert_eq!(w.agent.calls("SetClock", &r.id), 1);
    assert!(w.mgr.list_snapshots().await.unwrap().is_empty(), "consumed");
    w.assert_only(&["web"]).await;
}

#[tokio::test]
async fn a_failed_standby_capture_keeps_the_vm_running() {
    let w = World::new().await;
    w.running("web").await;
    w.hv.fail(HvOp::Save);
    let e = w.mgr.standby("web").await.expect_err("save fails");
    assert!(e.to_string().starts_with("saving device state"), "{e}");
    source_intact(&w, "web").await;
    w.assert_only(&["web"]).await;
}

#[tokio::test]
async fn a_restore_failing_before_resume_returns_to_standby() {
    let w = World::new().await;
    w.running("web").await;
    let sb = w.mgr.standby("web").await.unwrap();
    w.hv.fail(HvOp::Load);
    let e = w.mgr.restore("web").await.expect_err("load fails");
    let back = w.mgr.get("web").await.unwrap();
    assert_eq!(back.state, InstanceState::Standby);
    assert_eq!(back.snapshot_id, sb.snapshot_id);
    assert_eq!(back.state_error.as_deref(), Some(e.to_string().as_str()));
    assert!(!w.hv.live().contains_key(&back.id));
    w.assert_only(&["web"]).await;
    w.hv.heal();
    assert_eq!(
        w.mgr.restore("web").await.unwrap().state,
        InstanceState::Running
    );
}

#[tokio::test]
async fn a_restore_failing_after_resume_spends_the_snapshot() {
    let w = World::new().await;
    w.running("web").await;
    w.mgr.standby("web").await.unwrap();
    w.agent.health(Answer::Fail);
    w.mgr.restore("web").await.expect_err("agent fails");
    let back = w.mgr.get("web").await.unwrap();
    assert_eq!(back.state, InstanceState::Stopped);
    assert!(back.snapshot_id.is_none());
    assert!(back.state_error.unwrap().contains("spent"));
    assert!(w.mgr.list_snapshots().await.unwrap().is_empty());
    w.assert_only(&["web"]).await;
}

#[tokio::test]
async fn snapshots_of_running_and_standby_instances() {
    let w = World::new().await;
    w.running("web").await;
    let s1 = w
        .mgr
        .create_snapshot("web", Some("one".into()))
        .await
        .unwrap();
    assert!(s1.standby_of.is_none());
    assert_eq!(w.hv.live().len(), 1);
    source_intact(&w, "web").await;
    let e = w
        .mgr
        .create_snapshot("web", Some("one".into()))
        .await
        .expect_err("name taken");
    assert!(is_conflict(&e), "{e}");
    let sb = w.mgr.standby("web").await.unwrap();
    let own = sb.snapshot_id.clone().unwrap();
    assert!(is_conflict(&w.mgr.delete_snapshot(&own).await.unwrap_err()));
    let s2 = w.mgr.create_snapshot("web", None).await.unwrap();
    assert_ne!(s2.id, own);
    w.mgr.delete_snapshot(&s1.id).await.unwrap();
    w.mgr.delete_snapshot(&s2.id).await.unwrap();
    w.assert_only(&["web"]).await;
    // Deleting the instance takes its standby snapshot with it.
    w.mgr.delete("web").await.unwrap();
    w.assert_only(&[]).await;
}

#[tokio::test]
async fn a_running_instance_whose_vm_dies_is_reaped() {
    let w = World::new().await;
    let i = w.running("web").await;
    std::fs::write(
        w.cfg
            .data_dir
            .join("instances")
            .join(&i.id)
            .join("console.log"),
        "[ 1.0] boot\n[ 2.0] Kernel panic - not syncing: test\n",
    )
    .unwrap();
    w.hv.kill(&i.id);
    w.mgr.reap_dead_vms().await;
    let gone = w.mgr.get("web").await.unwrap();
    assert_eq!(gone.state, InstanceState::Stopped);
    assert!(gone.state_error.unwrap().contains("Kernel panic"));
    assert!(gone.network.ip.is_none() && gone.network.mac.is_some());
    w.assert_only(&["web"]).await;
    assert_eq!(
        w.mgr.start("web").await.unwrap().state,
        InstanceState::Running
    );
}

#[tokio::test]
async fn an_instance_goes_back_to_its_own_snapshot_in_place_and_keeps_it() {
    let w = World::new().await;
    let before = w.running("vm").await;
    w.running("other").await;
    let snap = w.mgr.create_snapshot("vm", Some("s".into())).await.unwrap();
    // Another instance's snapshot is refused; nothing changes.
    let e = w
        .mgr
        .restore_snapshot("other", "s", None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Conflict, "{e}");
    let e = w
        .mgr
        .restore_snapshot("vm", "s", Some(InstanceState::Stopped))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Invalid, "{e}");
    for _ in 0..2 {
        let after = w.mgr.restore_snapshot("vm", "s", None).await.unwrap();
        assert_eq!(after.state, InstanceState::Running);
        assert_eq!(
            (after.id.as_str(), after.network.ip),
            (before.id.as_str(), before.network.ip)
        );
        assert_ne!(after.pid, before.pid, "a new VM");
        assert_eq!(
            after.memory,
            crate::model::Memory::Cow {
                base: snap.base().to_string()
            }
        );
        assert!(w.mgr.get_snapshot("s").await.is_ok(), "the snapshot stays");
    }
}
