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
    let live = w.hv.live();
    assert_eq!(live[&src.id].state, RunState::Running);
    assert_eq!(live.len(), 2, "old VMM gone: {live:?}");
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
