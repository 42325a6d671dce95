//! The one error type of this crate.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while driving a hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The spec can't be turned into a valid QEMU command line.
    #[error("invalid vm spec: {0}")]
    InvalidSpec(String),

    /// The QEMU binary could not be executed at all.
    #[error("failed to spawn {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: io::Error,
    },

    /// QEMU exited before the VM was up; `stderr_tail` is the end of its stderr.
    #[error("qemu exited ({status}): {stderr_tail}")]
    QemuExited { status: String, stderr_tail: String },

    /// A bounded wait ran out.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },

    /// A file-system or socket operation on a known path failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The pidfile is missing, unreadable or names a process that isn't our QEMU.
    #[error("pidfile {path}: {reason}")]
    Pidfile { path: PathBuf, reason: String },

    /// A live QEMU for this VM id already owns the spec's pidfile.
    #[error("vm {id} is already running as pid {pid}")]
    AlreadyRunning { id: String, pid: u32 },

    /// The QEMU process for this VM is gone (or the pid now belongs to someone else).
    #[error("vm {id} (pid {pid}) is not running")]
    NotRunning { id: String, pid: u32 },

    /// The QMP peer broke the protocol (bad JSON, unexpected greeting, EOF).
    #[error("qmp protocol error on {socket}: {reason}")]
    QmpProtocol { socket: PathBuf, reason: String },

    /// A QMP command returned an error object.
    #[error("qmp command {command} failed: {class}: {desc}")]
    QmpCommand {
        command: String,
        class: String,
        desc: String,
    },

    /// Saving or loading device state failed.
    #[error("migration failed: {0}")]
    Migration(String),

    /// Creating, joining or removing a VM's cgroup failed.
    #[error("vm cgroup: {0}")]
    Cgroup(#[from] forkvm_cgroup::CgroupError),

    /// The process survived QMP quit, SIGTERM and SIGKILL.
    #[error("vm {id} (pid {pid}) did not exit")]
    StopFailed { id: String, pid: u32 },
}

impl VmmError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        VmmError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
