//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

/// What can go wrong finding the daemon's cgroups or managing a VM's.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/cgroup` or `/proc/self/mountinfo` could not be read.
    #[error("reading {what}: {source}")]
    Proc {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// No usable hierarchy for a controller: neither delegated on cgroup v2
    /// nor mounted as a v1 hierarchy the daemon is in.
    #[error(
        "no cgroup hierarchy for the {controller} controller (v2 does not delegate it and no v1 hierarchy has it mounted)"
    )]
    NoController { controller: &'static str },
    /// The v2 controllers could not be enabled for the daemon's children.
    #[error(
        "cgroup v2: enabling {controllers} in {path}/cgroup.subtree_control failed ({source}); start the daemon in a delegated cgroup of its own"
    )]
    Delegation {
        controllers: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A per-VM cgroup name that is not one plain path component with our
    /// prefix.
    #[error("bad cgroup name {0:?}")]
    BadName(String),
    /// The cgroup still has processes in it.
    #[error("cgroup {0} still has processes")]
    Busy(PathBuf),
    /// A file-system operation on a cgroup file or directory failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CgroupError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| CgroupError::Io { op, path, source }
    }
}
