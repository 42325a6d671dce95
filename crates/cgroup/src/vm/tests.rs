//! Per-VM cgroups against a fake cgroup root (a tempdir laid out like the
//! hosts' mounts).

use super::*;
use crate::detect::tests::{MOUNTINFO, SELF_CGROUP};

const LIMITS: Limits = Limits {
    memory_bytes: 512 << 20,
    cpu_quota_us: 200_000,
    cpu_period_us: 100_000,
    pids_max: 129,
};

fn fake_root() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for d in [
        "sys/fs/cgroup/memory/process_api/4546",
        "sys/fs/cgroup/cpu",
        "sys/fs/cgroup/pids",
        "sys/fs/cgroup/unified",
    ] {
        std::fs::create_dir_all(t.path().join(d)).unwrap();
    }
    t
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[test]
fn v1_vm_cgroups_go_beneath_the_daemons_with_their_limits() {
    let t = fake_root();
    let root = CgroupRoot::from_proc(t.path(), SELF_CGROUP, MOUNTINFO).unwrap();
    assert!(matches!(root.layout(), Layout::V1 { .. }));
    let cg = root.create("forkvm-abc", &LIMITS).unwrap();
    let cgroups = t.path().join("sys/fs/cgroup");
    let mem = cgroups.join("memory/process_api/4546/forkvm-abc");
    assert_eq!(
        cg.dirs(),
        [
            mem.clone(),
            cgroups.join("cpu/forkvm-abc"),
            cgroups.join("pids/forkvm-abc")
        ]
    );
    assert_eq!(
        read(&mem.join("memory.limit_in_bytes")),
        (512u64 << 20).to_string()
    );
    assert_eq!(
        read(&cgroups.join("cpu/forkvm-abc/cpu.cfs_quota_us")),
        "200000"
    );
    assert_eq!(
        read(&cgroups.join("cpu/forkvm-abc/cpu.cfs_period_us")),
        "100000"
    );
    assert_eq!(read(&cgroups.join("pids/forkvm-abc/pids.max")), "129");

    for d in cg.dirs() {
        std::fs::write(d.join("cgroup.procs"), "").unwrap();
    }
    let j = cg.joiner().unwrap();
    j.fds().join_self().unwrap();
    assert_eq!(read(&mem.join("cgroup.procs")), "0");

    cg.remove().unwrap();
    assert!(cg.dirs().iter().all(|d| !d.exists()));
    cg.remove().unwrap();
    // The daemon's own cgroups stay.
    assert!(cgroups.join("memory/process_api/4546").is_dir());
}

#[test]
fn a_leftover_of_the_same_name_is_replaced() {
    let t = fake_root();
    let root = CgroupRoot::from_proc(t.path(), SELF_CGROUP, MOUNTINFO).unwrap();
    let old = root.create("forkvm-x", &LIMITS).unwrap();
    std::fs::write(old.dirs()[2].join("stale"), "1").unwrap();
    let new = root.create("forkvm-x", &LIMITS).unwrap();
    assert_eq!(new, old);
    assert!(!new.dirs()[2].join("stale").exists());
}

#[test]
fn v2_is_used_where_every_controller_is_delegated() {
    let t = fake_root();
    let unified = t.path().join("sys/fs/cgroup/unified");
    std::fs::write(
        unified.join("cgroup.controllers"),
        "cpuset cpu io memory pids\n",
    )
    .unwrap();
    std::fs::write(unified.join("cgroup.subtree_control"), "cpu\n").unwrap();
    let root = CgroupRoot::from_proc(t.path(), SELF_CGROUP, MOUNTINFO).unwrap();
    assert_eq!(
        root.layout(),
        &Layout::V2 {
            dir: unified.clone()
        }
    );
    assert_eq!(
        read(&unified.join("cgroup.subtree_control")),
        "+memory +pids"
    );
    let cg = root.create("forkvm-v2", &LIMITS).unwrap();
    assert_eq!(cg.dirs(), [unified.join("forkvm-v2")]);
    assert_eq!(
        read(&unified.join("forkvm-v2/memory.max")),
        (512u64 << 20).to_string()
    );
    assert_eq!(read(&unified.join("forkvm-v2/cpu.max")), "200000 100000");
    assert_eq!(read(&unified.join("forkvm-v2/pids.max")), "129");
    cg.remove().unwrap();
    assert!(!unified.join("forkvm-v2").exists());

    // Not every controller offered: v1.
    std::fs::write(unified.join("cgroup.controllers"), "cpu memory\n").unwrap();
    let root = CgroupRoot::from_proc(t.path(), SELF_CGROUP, MOUNTINFO).unwrap();
    assert!(matches!(root.layout(), Layout::V1 { .. }));
}

#[test]
fn names_are_one_prefixed_component() {
    let t = fake_root();
    let root = CgroupRoot::from_proc(t.path(), SELF_CGROUP, MOUNTINFO).unwrap();
    for bad in [
        "",
        "forkvm-",
        "x",
        "forkvm-../x",
        "forkvm-a/b",
        "../forkvm-a",
    ] {
        assert!(
            matches!(root.create(bad, &LIMITS), Err(CgroupError::BadName(_))),
            "{bad:?} accepted"
        );
        assert!(VmCgroup::from_dirs(vec![PathBuf::from("/c").join(bad)]).is_err());
    }
    assert!(VmCgroup::from_dirs(vec![PathBuf::from("/c/forkvm-a")]).is_ok());
}

#[test]
fn a_failed_create_leaves_nothing() {
    let t = fake_root();
    let root = CgroupRoot::from_proc(t.path(), SELF_CGROUP, MOUNTINFO).unwrap();
    // The pids hierarchy is gone: its directory can't be made.
    std::fs::remove_dir(t.path().join("sys/fs/cgroup/pids")).unwrap();
    assert!(matches!(
        root.create("forkvm-f", &LIMITS),
        Err(CgroupError::Io { .. })
    ));
    assert!(!t.path().join("sys/fs/cgroup/cpu/forkvm-f").exists());
    assert!(
        !t.path()
            .join("sys/fs/cgroup/memory/process_api/4546/forkvm-f")
            .exists()
    );
}

#[test]
fn a_v1_cpu_quota_never_exceeds_the_daemons() {
    let t = fake_root();
    let cpu = t.path().join("sys/fs/cgroup/cpu");
    // The daemon may use 1.5 CPUs (per 200 ms); the VM asks for 2.
    std::fs::write(cpu.join("cpu.cfs_quota_us"), "300000\n").unwrap();
    std::fs::write(cpu.join("cpu.cfs_period_us"), "200000\n").unwrap();
    let root = CgroupRoot::from_proc(t.path(), SELF_CGROUP, MOUNTINFO).unwrap();
    root.create("forkvm-q", &LIMITS).unwrap();
    assert_eq!(read(&cpu.join("forkvm-q/cpu.cfs_quota_us")), "150000");
    // Unlimited (-1): the VM's own quota.
    std::fs::write(cpu.join("cpu.cfs_quota_us"), "-1\n").unwrap();
    root.create("forkvm-r", &LIMITS).unwrap();
    assert_eq!(read(&cpu.join("forkvm-r/cpu.cfs_quota_us")), "200000");
}
