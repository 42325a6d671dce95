//! forkvm-cgroup: a cgroup per VM, with memory, CPU and pids limits,
//! created **beneath the cgroup the daemon was started in** — never above
//! or beside it, so a VM stays inside whatever limits the daemon runs
//! under.
//!
//! Two layouts:
//! - cgroup v2 where the host delegates `memory`, `cpu` and `pids` to the
//!   daemon's cgroup (`cgroup.controllers`); they are enabled for its
//!   children in `cgroup.subtree_control`. v2 forbids processes in a cgroup
//!   that hands controllers to children: if the daemon sits in its cgroup
//!   alone, it moves itself into a leaf (`forkvm-daemon`) first.
//! - cgroup v1 otherwise: the daemon's cgroup in each controller's own
//!   hierarchy (`/sys/fs/cgroup/{memory,cpu,pids}` here).
//!
//! A VM's QEMU joins its cgroup between fork and exec ([`Joiner`]), so it
//! never runs outside it; the cgroup is removed once QEMU is gone.

mod detect;
mod error;
mod remount;
mod vm;

use std::path::{Path, PathBuf};

pub use error::CgroupError;
pub use vm::{JoinFds, Joiner, Limits, VM_PREFIX, VmCgroup};

/// The controllers every VM's cgroup limits, in [`Layout::V1`]'s order.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Where per-VM cgroups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2: the daemon's cgroup, controllers delegated.
    V2 { dir: PathBuf },
    /// cgroup v1: the daemon's cgroup in the hierarchies of
    /// [`CONTROLLERS`], in that order.
    V1 { dirs: Vec<PathBuf> },
}

/// The daemon's cgroups, beneath which VMs get theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoot {
    layout: Layout,
}

impl CgroupRoot {
    /// The cgroups of this process, from `/proc/self`. In a mount
    /// namespace of its own that shows no cgroup file system (`ip netns
    /// exec`), the host's hierarchies are mounted first ([`remount`]).
    pub fn detect() -> Result<Self, CgroupError> {
        let read = |what: &'static str| {
            std::fs::read_to_string(what).map_err(|source| CgroupError::Proc { what, source })
        };
        let mut mountinfo = read("/proc/self/mountinfo")?;
        if remount::mount_if_hidden(&mountinfo)? {
            mountinfo = read("/proc/self/mountinfo")?;
        }
        let root = Self::from_proc(Path::new("/"), &read("/proc/self/cgroup")?, &mountinfo)?;
        tracing::info!(layout = ?root.layout, "per-VM cgroups go beneath the daemon's");
        Ok(root)
    }

    /// The cgroups of a process whose `/proc/<pid>/cgroup` is `self_cgroup`
    /// and `mountinfo` its mounts, with every mount point under `prefix`
    /// (a fake root in tests). v2 when it delegates every controller,
    /// else v1.
    pub fn from_proc(
        prefix: &Path,
        self_cgroup: &str,
        mountinfo: &str,
    ) -> Result<Self, CgroupError> {
        if let Some(dir) = detect::v2_dir(prefix, self_cgroup, mountinfo)
            && v2_delegates_all(&dir)
        {
            vm::enable_v2_controllers(&dir)?;
            return Ok(CgroupRoot {
                layout: Layout::V2 { dir },
            });
        }
        Ok(CgroupRoot {
            layout: detect::v1_layout(prefix, self_cgroup, mountinfo)?,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The directories a VM cgroup `name` has in this layout.
    fn dirs_for(&self, name: &str) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2 { dir } => vec![dir.join(name)],
            Layout::V1 { dirs } => dirs.iter().map(|d| d.join(name)).collect(),
        }
    }
}

/// The v2 cgroup `dir` is offered all of [`CONTROLLERS`].
fn v2_delegates_all(dir: &Path) -> bool {
    let Ok(have) = std::fs::read_to_string(dir.join("cgroup.controllers")) else {
        return false;
    };
    let have: Vec<&str> = have.split_whitespace().collect();
    CONTROLLERS.iter().all(|c| have.contains(c))
}
