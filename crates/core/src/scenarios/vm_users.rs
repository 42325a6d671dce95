//! One VM uid per instance: claimed at its first VMM, the same for its
//! next VMM and after a daemon restart, freed with the instance.

use super::*;
use crate::vm_users::VmUsers;

fn uid_of(w: &World, i: &Instance) -> Option<u32> {
    let pid = i.pid.expect("a VMM");
    let vm = w.hv.vm_of(pid).expect("a fake VM");
    vm.spec.user.map(|u| {
        assert_eq!(u.gid, 900_000, "the VM group");
        u.uid
    })
}

#[tokio::test]
async fn each_instance_gets_a_uid_of_its_own_kept_across_restarts_and_freed_with_it() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: VM users need root (chgrp of the data directory)");
        return;
    }
    let mut w = World::with(|c| c.vm_users = Some(VmUsers::new(900_000, 2).unwrap())).await;
    let a = w.running("a").await;
    let b = w.running("b").await;
    assert_eq!(uid_of(&w, &a), Some(900_001));
    assert_eq!(uid_of(&w, &b), Some(900_002));
    // The range is full: a third VM is refused, not run as root.
    let c = w
        .mgr
        .create(crate::model::CreateRequest {
            name: "c".into(),
            ..Default::default()
        })
        .await;
    assert!(matches!(c, Err(CoreError::Exhausted(_))), "{c:?}");
    let _ = w.mgr.delete("c").await;
    // Adopted after a restart, and its next VMM: the same uid.
    w.restart().await;
    w.mgr.stop("b").await.unwrap();
    let b = w.mgr.start("b").await.unwrap();
    assert_eq!(uid_of(&w, &b), Some(900_002));
    // Freed with the instance.
    w.mgr.delete("a").await.unwrap();
    let d = w.running("d").await;
    assert_eq!(uid_of(&w, &d), Some(900_001));
}
