//! Handover: a running VM with its own memory becomes copy-on-write of that
//! memory (now a base) under a new VMM; failures and crashes leave it as
//! it was.

use super::*;
use crate::model::Memory;
use crate::testkit::{HvOp, World};
use forkvm_vmm::RunState;

/// Every capture of an own-memory VM is a handover.
async fn world() -> World {
    World::with(|c| c.handover_min_mib = 0).await
}

#[tokio::test]
async fn a_fork_from_running_hands_the_source_over() {
    let w = world().await;
    let before = w.running("src").await;
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    let src = w.mgr.get("src").await.unwrap();
    let Memory::Cow { base } = &src.memory else {
        panic!("source still has its own memory: {src:?}");
    };
    assert_eq!(f.memory, src.memory, "fork and source map the same base");
    assert_eq!((src.vmm_gen, src.handover.as_deref()), (1, None));
    assert_ne!(src.pid, before.pid, "a new VMM runs the source");
    assert!(
        !w.mem_file(&src.id).exists(),
        "the own file became the base"
    );
    assert!(
        w.cfg
            .mem_dir
            .join("bases")
            .join(format!("{base}.mem"))
            .exists()
    );
    // The old VMM quits in the background.
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.hv.live_pids().len() != 2 {
        assert!(
            Instant::now() < deadline,
            "old VMM left: {:?}",
            w.hv.live_pids()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w.hv.live()[&src.id].state, RunState::Running);
    source_intact(&w, "src").await;
    w.assert_only(&["src", "f"]).await;
    // The next capture of the now copy-on-write source moves its memory.
    fork_one(&w, "src", from_running("g", None)).await.unwrap();
    w.assert_only(&["src", "f", "g"]).await;
}

#[tokio::test]
async fn a_failed_handover_leaves_the_source_as_it_was() {
    let w = world().await;
    let before = w.running("src").await;
    w.hv.fail_next(HvOp::Load, 1);
    let e = w
        .mgr
        .fork("src", from_running("f", None))
        .await
        .expect_err("the capture fails");
    assert!(e.to_string().contains("loading device state"), "{e}");
    let src = w.mgr.get("src").await.unwrap();
    assert_eq!(
        (&src.memory, src.vmm_gen, src.pid, src.handover.as_deref()),
        (&Memory::Own, 0, before.pid, None)
    );
    assert!(w.mem_file(&src.id).exists(), "the memory file is back");
    source_intact(&w, "src").await;
    w.assert_only(&["src"]).await;
}

#[tokio::test]
async fn a_handover_cut_short_by_a_crash_is_undone() {
    let mut w = world().await;
    let src = w.running("src").await;
    // Recorded, the file renamed, no new VMM yet: then the daemon died.
    let bid = "00000000000000ab";
    let base = w.cfg.mem_dir.join("bases").join(format!("{bid}.mem"));
    std::fs::create_dir_all(base.parent().unwrap()).unwrap();
    std::fs::rename(w.mem_file(&src.id), &base).unwrap();
    w.hv.set_state(&src.id, RunState::Paused);
    let store = &w.mgr.services().store;
    let mut rec = store.find_instance("src").unwrap().unwrap();
    rec.handover = Some(bid.into());
    store.update_instance(&rec).unwrap();
    w.restart().await;
    let back = w.mgr.get("src").await.unwrap();
    assert_eq!(
        (&back.memory, back.handover.as_deref()),
        (&Memory::Own, None)
    );
    assert!(w.mem_file(&src.id).exists() && !base.exists());
    source_intact(&w, "src").await;
    w.assert_only(&["src"]).await;
}

#[tokio::test]
async fn a_handed_over_source_is_promoted_back_to_its_own_memory() {
    let w = World::with(|c| {
        c.handover_min_mib = 0;
        c.promote_after_handover = true;
    })
    .await;
    w.running("src").await;
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let src = loop {
        let s = w.mgr.get("src").await.unwrap();
        if s.memory == Memory::Own && s.vmm_gen == 2 {
            break s;
        }
        assert!(Instant::now() < deadline, "never promoted: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!src.promoting);
    assert!(w.mem_file(&src.id).exists(), "its own file is back");
    source_intact(&w, "src").await;
    // The fork still maps the base the handover made.
    assert_eq!(w.mgr.get("f").await.unwrap().memory, f.memory);
    w.assert_only(&["src", "f"]).await;
    // Its next capture is a handover again.
    fork_one(&w, "src", from_running("g", None)).await.unwrap();
    let again = w.mgr.get("src").await.unwrap();
    assert!(
        matches!(again.memory, Memory::Cow { .. }) || again.vmm_gen >= 3,
        "{again:?}"
    );
}

#[tokio::test]
async fn a_failed_promotion_leaves_the_vm_copy_on_write() {
    let w = World::with(|c| c.handover_min_mib = 0).await;
    w.running("src").await;
    fork_one(&w, "src", from_running("f", None)).await.unwrap();
    let src = w.mgr.get("src").await.unwrap();
    w.hv.fail(HvOp::Migrate);
    let e = crate::promote::promote(w.mgr.services(), &src)
        .await
        .expect_err("migration fails");
    assert!(e.to_string().contains("migrating"), "{e}");
    let back = w.mgr.get("src").await.unwrap();
    assert_eq!(
        (&back.memory, back.vmm_gen, back.pid),
        (&src.memory, 1, src.pid)
    );
    assert!(!back.promoting && !w.mem_file(&src.id).exists());
    source_intact(&w, "src").await;
    w.hv.heal();
    w.assert_only(&["src", "f"]).await;
}
