//! The fork pipeline: success, a failure at every stage (nothing of the
//! fork is left, the source runs on), target states and request checks.

use super::*;
use crate::error::CoreError;
use crate::handoff::HandoffError;
use crate::model::{ForkRequest, HandoffPath, InstanceState, Stage};
use crate::testkit::{Answer, HvOp, World};
use std::collections::HashSet;
use std::sync::Arc;

#[tokio::test]
async fn three_forks_from_running_each_get_their_own_lease() {
    let w = World::new().await;
    let src = w.running("src").await;
    let forks: Vec<Instance> = w
        .mgr
        .fork("src", from_running("copy", Some(3)))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let names: Vec<&str> = forks.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["copy-1", "copy-2", "copy-3"]);
    let mut ips: HashSet<_> = forks.iter().map(|f| f.network.ip.unwrap()).collect();
    let macs: HashSet<_> = forks.iter().map(|f| f.network.mac.unwrap()).collect();
    assert_eq!((ips.len(), macs.len()), (3, 3));
    assert!(
        ips.insert(src.network.ip.unwrap()),
        "a fork took the source's address"
    );
    for f in &forks {
        assert_eq!(f.state, InstanceState::Running);
        assert!(!f.pending_handoff);
        assert_eq!(f.forked_from.as_deref(), Some(src.id.as_str()));
        let h = f.handoff.as_ref().unwrap();
        assert_eq!(h.path, Some(HandoffPath::Rpc));
        assert_eq!(
            h.fallback_reason.as_deref(),
            Some("the snapshot has no armed mailbox")
        );
        for s in [
            Stage::Snapshot,
            Stage::Allocate,
            Stage::MemoryPrepare,
            Stage::AllocateTap,
            Stage::VmmStart,
            Stage::StateLoad,
            Stage::Resume,
            Stage::NetworkReady,
            Stage::Total,
        ] {
            assert!(h.get(s).is_some(), "{s:?} missing in {h:?}");
        }
        assert_eq!(w.agent.calls("ReconfigureNetwork", &f.id), 1);
        assert_eq!(
            w.agent.calls("SetClock", &f.id),
            1,
            "the RPC path steps the clock"
        );
    }
    source_intact(&w, "src").await;
    w.assert_only(&["src", "copy-1", "copy-2", "copy-3"]).await;
}

/// Runs a one-fork request from a running source after `setup`; the fork
/// must fail, leave nothing, and the source must run on.
async fn fails_cleanly(setup: impl FnOnce(&World)) -> CoreError {
    let w = World::new().await;
    w.running("src").await;
    setup(&w);
    let e = fork_one(&w, "src", from_running("f", None))
        .await
        .expect_err("fork should fail");
    w.hv.heal();
    w.net.fail_add(false);
    source_intact(&w, "src").await;
    w.assert_only(&["src"]).await;
    e
}

#[tokio::test]
async fn failing_tap_creation_leaves_nothing() {
    let e = fails_cleanly(|w| w.net.fail_add(true)).await;
    assert!(e.to_string().contains("creating TAP"), "{e}");
}

#[tokio::test]
async fn failing_vmm_start_leaves_nothing() {
    let e = fails_cleanly(|w| w.hv.fail(HvOp::Start)).await;
    assert!(matches!(e, CoreError::Vmm { .. }), "{e}");
    assert!(e.to_string().starts_with("starting QEMU"), "{e}");
}

#[tokio::test]
async fn forks_of_a_small_running_source_start_during_its_capture() {
    let w = World::new().await;
    w.running("src").await;
    let forks = w.mgr.fork("src", from_running("f", Some(2))).await.unwrap();
    for f in forks {
        let h = f.unwrap().handoff.unwrap();
        let (queued, snapshot) = (
            h.get(Stage::Queued).unwrap(),
            h.get(Stage::Snapshot).unwrap(),
        );
        assert!(
            queued < snapshot,
            "the fork started after the capture: {h:?}"
        );
    }
    // From a standby source there is nothing to capture: no wait either.
    w.mgr.standby("src").await.unwrap();
    let f = fork_one(
        &w,
        "src",
        ForkRequest {
            name: "g".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let h = f.handoff.unwrap();
    assert_eq!(h.get(Stage::BaseWait), None, "{h:?}");
}

#[tokio::test]
async fn a_capture_failing_while_its_forks_start_leaves_nothing() {
    let e = fails_cleanly(|w| w.hv.fail(HvOp::Save)).await;
    assert!(e.to_string().starts_with("saving device state"), "{e}");
}

#[tokio::test]
async fn failing_state_load_leaves_nothing() {
    let e = fails_cleanly(|w| w.hv.fail(HvOp::Load)).await;
    assert!(e.to_string().starts_with("loading the snapshot"), "{e}");
}

#[tokio::test]
async fn failing_handoff_rpc_leaves_nothing() {
    let e = fails_cleanly(|w| w.agent.reconfigure(Answer::Fail)).await;
    assert!(
        matches!(e, CoreError::Handoff(HandoffError::Agent(_))),
        "{e}"
    );
}

#[tokio::test]
async fn failing_exec_handoff_leaves_nothing() {
    let e = fails_cleanly(|w| {
        w.agent.reconfigure(Answer::Unimplemented);
        w.agent.exec(Answer::Ok, 2);
    })
    .await;
    assert!(
        matches!(
            e,
            CoreError::Handoff(HandoffError::ExecFailed { code: 2, .. })
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_guest_dying_mid_handoff_fails_the_fork_at_once() {
    let t = std::time::Instant::now();
    let e = fails_cleanly(|w| {
        w.agent.reconfigure(Answer::Silent);
        let hv = Arc::downgrade(&w.hv);
        w.hv.on_resume(Arc::new(move |vm| {
            if let Some(hv) = hv.upgrade() {
                hv.kill(&vm.id);
            }
        }));
    })
    .await;
    assert!(matches!(e, CoreError::VmExited(_)), "{e}");
    // The handoff deadline is 1.5 s in the world's config.
    assert!(
        t.elapsed() < std::time::Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn failing_resume_leaves_nothing_and_the_standby_source_intact() {
    let w = World::new().await;
    w.running("src").await;
    w.mgr.standby("src").await.unwrap();
    w.hv.fail(HvOp::Resume);
    let req = ForkRequest {
        name: "f".into(),
        ..Default::default()
    };
    let e = fork_one(&w, "src", req).await.expect_err("resume fails");
    assert!(e.to_string().starts_with("resuming"), "{e}");
    w.hv.heal();
    assert_eq!(
        w.mgr.get("src").await.unwrap().state,
        InstanceState::Standby
    );
    w.assert_only(&["src"]).await;
    assert_eq!(
        w.mgr.restore("src").await.unwrap().state,
        InstanceState::Running
    );
}

#[tokio::test]
async fn a_fork_of_a_missing_base_fails_cleanly() {
    let w = World::new().await;
    w.running("src").await;
    let snap = w
        .mgr
        .create_snapshot("src", Some("gold".into()))
        .await
        .unwrap();
    std::fs::remove_file(w.base_file(&snap.id)).unwrap();
    let req = ForkRequest {
        name: "f".into(),
        ..Default::default()
    };
    let mut r = w.mgr.fork_snapshot("gold", req).await.unwrap();
    let e = r.remove(0).expect_err("no base memory");
    assert!(e.to_string().starts_with("starting QEMU"), "{e}");
    assert_eq!(w.mgr.list().await.unwrap().len(), 1);
    assert!(w.hv.live().len() == 1 && w.net.ports().len() == 1);
}

#[tokio::test]
async fn one_failing_fork_of_a_batch_spares_the_others() {
    let w = World::new().await;
    w.running("src").await;
    w.hv.fail_next(HvOp::Start, 1);
    let results = w.mgr.fork("src", from_running("b", Some(3))).await.unwrap();
    let ok: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|i| i.name.clone()))
        .collect();
    assert_eq!(ok.len(), 2, "{results:?}");
    let mut keep = vec!["src"];
    keep.extend(ok.iter().map(String::as_str));
    w.assert_only(&keep).await;
}

#[tokio::test]
async fn stopped_target_keeps_the_identity_and_boots_fresh() {
    let w = World::new().await;
    w.running("src").await;
    let req = ForkRequest {
        target_state: Some(InstanceState::Stopped),
        ..from_running("cold", None)
    };
    let f = fork_one(&w, "src", req).await.unwrap();
    assert_eq!(f.state, InstanceState::Stopped);
    assert!(!f.pending_handoff && f.network.ip.is_some());
    assert!(!w.mem_file(&f.id).exists());
    assert!(!w.hv.live().contains_key(&f.id));
    let started = w.mgr.start("cold").await.unwrap();
    assert_eq!(started.state, InstanceState::Running);
    assert_eq!(started.network.ip, f.network.ip);
    assert_eq!(
        w.agent.calls("ReconfigureNetwork", &f.id),
        0,
        "a fresh boot"
    );
}

#[tokio::test]
async fn standby_target_hands_over_on_restore() {
    let w = World::new().await;
    w.running("src").await;
    let req = ForkRequest {
        target_state: Some(InstanceState::Standby),
        ..from_running("warm", None)
    };
    let f = fork_one(&w, "src", req).await.unwrap();
    assert_eq!(f.state, InstanceState::Standby);
    assert!(f.pending_handoff);
    let snap = w
        .mgr
        .get_snapshot(f.snapshot_id.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(snap.standby_of.as_deref(), Some(f.id.as_str()));
    w.assert_only(&["src", "warm"]).await;
    let r = w.mgr.restore("warm").await.unwrap();
    assert_eq!(r.state, InstanceState::Running);
    assert!(!r.pending_handoff && r.snapshot_id.is_none());
    assert_eq!(r.handoff.as_ref().unwrap().path, Some(HandoffPath::Rpc));
    assert_eq!(w.agent.calls("ReconfigureNetwork", &f.id), 1);
    w.assert_only(&["src", "warm"]).await;
}

#[tokio::test]
async fn no_wait_fork_completes_in_the_background() {
    let w = World::new().await;
    w.running("src").await;
    let req = ForkRequest {
        wait_for_network: Some(false),
        ..from_running("bg", None)
    };
    let f = fork_one(&w, "src", req).await.unwrap();
    assert_eq!(f.state, InstanceState::Initializing);
    let done = wait_state(&w, "bg", InstanceState::Running).await;
    let h = done.handoff.unwrap();
    assert_eq!(h.path, Some(HandoffPath::Rpc));
    assert!(h.get(Stage::NetworkReady).is_some());
}

#[tokio::test]
async fn a_failed_background_handoff_stops_the_fork_and_frees_its_lease() {
    let w = World::new().await;
    w.running("src").await;
    w.agent.reconfigure(Answer::Fail);
    let req = ForkRequest {
        wait_for_network: Some(false),
        ..from_running("bg", None)
    };
    fork_one(&w, "src", req).await.unwrap();
    let f = wait_state(&w, "bg", InstanceState::Stopped).await;
    assert!(f.state_error.unwrap().starts_with("network handoff failed"));
    assert!(f.network.ip.is_none() && f.network.mac.is_none());
    assert!(f.handoff.unwrap().error.is_some());
    assert!(!w.hv.live().contains_key(&f.id));
    let owned = w.mgr.services().store.allocations_of(&f.id).unwrap();
    assert!(owned.is_empty(), "{owned:?}");
}

#[tokio::test]
async fn requests_that_cannot_work_create_nothing() {
    let w = World::with(|c| c.memory_budget_mb = Some(600)).await;
    w.running("src").await;
    w.running("taken").await;
    let not_running = ForkRequest {
        name: "x".into(),
        ..Default::default()
    };
    type Expect = fn(&CoreError) -> bool;
    let cases: Vec<(ForkRequest, Expect)> = vec![
        (from_running("taken", None), is_conflict),
        (not_running, is_conflict),
        (from_running("x", Some(0)), |e| {
            matches!(e, CoreError::Invalid(_))
        }),
        (from_running("x", Some(65)), |e| {
            matches!(e, CoreError::Invalid(_))
        }),
        (from_running("Bad_Name", None), |e| {
            matches!(e, CoreError::Invalid(_))
        }),
        (from_running("x", Some(2)), |e| {
            matches!(e, CoreError::Exhausted(_))
        }),
        (
            ForkRequest {
                target_state: Some(InstanceState::Paused),
                ..from_running("x", None)
            },
            |e| matches!(e, CoreError::Invalid(_)),
        ),
    ];
    for (req, want) in cases {
        let e = w.mgr.fork("src", req.clone()).await.expect_err("refused");
        assert!(want(&e), "{req:?}: {e}");
    }
    assert_eq!(w.hv.starts(), 2, "no VMM was started");
    w.assert_only(&["src", "taken"]).await;
}

#[tokio::test]
async fn forks_of_forks_and_of_snapshots() {
    let w = World::new().await;
    w.running("src").await;
    let a = fork_one(&w, "src", from_running("a", None)).await.unwrap();
    let b = fork_one(&w, "a", from_running("b", None)).await.unwrap();
    assert_eq!(b.forked_from.as_deref(), Some(a.id.as_str()));
    let snap = w
        .mgr
        .create_snapshot("b", Some("gold".into()))
        .await
        .unwrap();
    let req = ForkRequest {
        name: "c".into(),
        count: Some(2),
        ..Default::default()
    };
    for r in w.mgr.fork_snapshot("gold", req).await.unwrap() {
        let c = r.unwrap();
        assert_eq!(c.state, InstanceState::Running);
        assert_eq!(c.forked_from.as_deref(), Some(snap.id.as_str()));
    }
    w.mgr.delete_snapshot("gold").await.unwrap();
    w.assert_only(&["src", "a", "b", "c-1", "c-2"]).await;
}
