//! Writable disks of OCI image instances: every capture freezes the disk at
//! the instant of the memory, forks get empty tops over the frozen layer,
//! and nothing is left behind by failures, deletes or crashes.

use super::*;
use crate::model::{Instance, Layer};
use crate::testkit::{HvOp, World};
use forkvm_vmm::{DiskRole, Hypervisor};
use std::path::PathBuf;

const IMAGE: &str = "registry.test/py:1";

async fn world_with(tweak: impl FnOnce(&mut crate::Config)) -> World {
    let w = World::with(tweak).await;
    w.add_oci_image(IMAGE).await;
    w
}

fn layer(w: &World, id: &str) -> Layer {
    crate::layers::get(w.mgr.services(), id).unwrap()
}

fn top_file(w: &World, i: &Instance) -> PathBuf {
    crate::layers::path(w.mgr.services(), i.disk_top.as_deref().unwrap())
}

/// What the instance's VMM (by its recorded pid: an old generation may
/// still be retiring) writes to, as the hypervisor sees it.
fn vm_disk(w: &World, i: &Instance) -> Option<PathBuf> {
    w.hv.vm_of(i.pid?).and_then(|v| v.disk_top)
}

#[tokio::test]
async fn forks_start_on_their_own_layer_over_the_frozen_one() {
    let w = world_with(|_| {}).await;
    let src = w.running_image("src", IMAGE).await;
    let first_top = src.disk_top.clone().expect("an image instance has a disk");
    assert_eq!(layer(&w, &first_top).parent, None, "on the template");
    let spec = &w.hv.live()[&src.id].spec;
    let roles: Vec<DiskRole> = spec.disks.iter().map(|d| d.role).collect();
    assert_eq!(roles, vec![DiskRole::Image, DiskRole::Rw]);
    assert!(src.workload.is_some() && src.entrypoint == ["python3", "-m", "http.server"]);

    let forks = w.mgr.fork("src", from_running("f", Some(2))).await.unwrap();
    let src = w.mgr.get("src").await.unwrap();
    let new_top = src.disk_top.clone().unwrap();
    assert_ne!(new_top, first_top, "the source writes a new top");
    assert_eq!(
        layer(&w, &new_top).parent.as_deref(),
        Some(first_top.as_str())
    );
    assert_eq!(vm_disk(&w, &src), Some(top_file(&w, &src)));
    for f in forks {
        let f = f.unwrap();
        let top = f.disk_top.clone().unwrap();
        assert_ne!(top, new_top);
        assert_eq!(layer(&w, &top).parent.as_deref(), Some(first_top.as_str()));
        assert_eq!(vm_disk(&w, &f), Some(top_file(&w, &f)));
        assert_eq!(
            f.workload, src.workload,
            "a fork runs its source's workload"
        );
        let rec = f.handoff.unwrap();
        assert!(
            rec.get(crate::model::Stage::DiskPrepare).is_some(),
            "{rec:?}"
        );
    }
    w.assert_only(&["src", "f-1", "f-2"]).await;

    // A copy-on-write fork captured in turn: frozen at the migration.
    let f1 = w.mgr.get("f-1").await.unwrap();
    let g = fork_one(&w, "f-1", from_running("g", None)).await.unwrap();
    let f1_after = w.mgr.get("f-1").await.unwrap();
    assert_eq!(
        layer(&w, g.disk_top.as_deref().unwrap()).parent,
        f1.disk_top,
        "the fork of a fork sits on its parent's frozen top"
    );
    assert_eq!(vm_disk(&w, &f1_after), Some(top_file(&w, &f1_after)));
    w.assert_only(&["src", "f-1", "f-2", "g"]).await;

    for n in ["g", "f-1", "f-2", "src"] {
        w.mgr.delete(n).await.unwrap();
    }
    w.assert_only(&[]).await;
    assert!(w.mgr.services().store.list_layers().unwrap().is_empty());
}

#[tokio::test]
async fn a_handover_freezes_the_old_top_without_a_freeze_command() {
    let w = world_with(|c| c.handover_min_mib = 0).await;
    let src = w.running_image("src", IMAGE).await;
    let old_top = src.disk_top.clone().unwrap();
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    let src = w.mgr.get("src").await.unwrap();
    assert_eq!((src.vmm_gen, src.handover_disk.as_deref()), (1, None));
    let top = src.disk_top.clone().unwrap();
    assert_eq!(layer(&w, &top).parent.as_deref(), Some(old_top.as_str()));
    assert_eq!(
        vm_disk(&w, &src),
        Some(top_file(&w, &src)),
        "the new VMM writes the new top"
    );
    assert_eq!(
        layer(&w, f.disk_top.as_deref().unwrap()).parent.as_deref(),
        Some(old_top.as_str())
    );
    w.assert_only(&["src", "f"]).await;
}

#[tokio::test]
async fn standby_and_restore_keep_writing_above_the_frozen_layer() {
    let w = world_with(|_| {}).await;
    let src = w.running_image("src", IMAGE).await;
    let first = src.disk_top.clone().unwrap();
    let s = w.mgr.standby("src").await.unwrap();
    let snap = w
        .mgr
        .get_snapshot(s.snapshot_id.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(snap.disk_layer.as_deref(), Some(first.as_str()));
    assert_ne!(s.disk_top.as_deref(), Some(first.as_str()));
    let r = w.mgr.restore("src").await.unwrap();
    assert_eq!(r.disk_top, s.disk_top);
    assert_eq!(vm_disk(&w, &r), Some(top_file(&w, &r)));
    w.assert_only(&["src"]).await;
}

#[tokio::test]
async fn a_failed_freeze_leaves_the_source_and_its_disk_as_they_were() {
    let w = world_with(|_| {}).await;
    let src = w.running_image("src", IMAGE).await;
    w.hv.fail_next(HvOp::FreezeDisk, 1);
    let e = w
        .mgr
        .fork("src", from_running("f", None))
        .await
        .expect_err("freeze fails");
    assert!(e.to_string().contains("freezing the writable disk"), "{e}");
    let after = w.mgr.get("src").await.unwrap();
    assert_eq!(after.disk_top, src.disk_top);
    assert_eq!(vm_disk(&w, &after), Some(top_file(&w, &after)));
    source_intact(&w, "src").await;
    w.assert_only(&["src"]).await;
}

#[tokio::test]
async fn deep_chains_are_flattened_in_the_background() {
    let w = world_with(|c| c.disk_max_depth = 2).await;
    w.running_image("src", IMAGE).await;
    for i in 0..3 {
        fork_one(&w, "src", from_running(&format!("f{i}"), None))
            .await
            .unwrap();
    }
    // Three captures stack three layers under the source's top; the
    // background flatten keeps every chain within the limit.
    let deadline = Instant::now() + Duration::from_secs(5);
    let svc = w.mgr.services();
    loop {
        let src = w.mgr.get("src").await.unwrap();
        let depth = crate::layers::depth(svc, src.disk_top.as_deref().unwrap()).unwrap();
        if w.hv.flattens() >= 1 && depth <= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never flattened: depth {depth}, {src:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The forks still use the layers the source no longer needs.
    w.assert_only(&["src", "f0", "f1", "f2"]).await;
}

#[tokio::test]
async fn a_restart_after_an_unrecorded_freeze_follows_the_vmm() {
    let mut w = world_with(|_| {}).await;
    let src = w.running_image("src", IMAGE).await;
    // A crash between QEMU's switch to a new top and its record.
    let svc = w.mgr.services().clone();
    let (next, _pin) = crate::layers::plan_freeze(&svc, src.disk_top.as_deref().unwrap()).unwrap();
    let vm = svc.handle(&src, src.pid.unwrap());
    w.hv.freeze_disk(&vm, &crate::layers::path(&svc, &next.id))
        .await
        .unwrap();
    drop(svc);
    w.restart().await;
    let after = w.mgr.get("src").await.unwrap();
    assert_eq!(after.disk_top.as_deref(), Some(next.id.as_str()));
    w.assert_only(&["src"]).await;
}

#[tokio::test]
async fn an_image_that_is_not_ready_is_refused_and_nothing_is_made() {
    let w = world_with(|_| {}).await;
    let e = w
        .mgr
        .create(crate::model::CreateRequest {
            name: "x".into(),
            image: Some("registry.test/none:1".into()),
            ..Default::default()
        })
        .await
        .expect_err("unknown image");
    assert!(matches!(e, CoreError::NotFound(_)), "{e}");
    w.assert_only(&[]).await;
}
