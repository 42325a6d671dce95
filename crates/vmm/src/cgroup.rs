//! A VM's QEMU in a cgroup of its own ([`forkvm_cgroup`]), beneath the
//! daemon's, with limits derived from the VM:
//!
//! - memory: guest RAM plus [`QEMU_MEMORY_OVERHEAD`] (QEMU's heap, TCG's
//!   translation cache of 64 MiB, thread stacks; a booted TCG guest's QEMU
//!   had ~80 MiB anonymous memory). A `share=on` VM's RAM pages on tmpfs are
//!   charged to the cgroup that first touches them; a `share=off` fork's
//!   private copies always are.
//! - CPU: `vcpus + 1` CPUs' worth per period (one for QEMU's main loop and
//!   I/O next to the vCPU threads).
//! - pids: [`QEMU_PIDS_BASE`] plus one per vCPU (QEMU's thread pool is at
//!   most 64 workers; it never forks: `spawn=deny`).
//!
//! Its directories are recorded in `<pidfile>.cgroup` before QEMU starts,
//! so whoever stops the VM later — this daemon or the next one, started
//! in another cgroup — removes exactly them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use forkvm_cgroup::{CgroupError, CgroupRoot, Limits, VmCgroup};

use crate::VmSpec;
use crate::error::VmmError;

/// Memory a QEMU may use beyond guest RAM.
pub const QEMU_MEMORY_OVERHEAD: u64 = 256 << 20;
/// Threads a QEMU may have beyond one per vCPU.
pub const QEMU_PIDS_BASE: u64 = 128;
/// CFS period; the quota is a multiple of it.
const CPU_PERIOD_US: u64 = 100_000;
/// How long a removal waits for a just-exited QEMU to leave its cgroup.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// The limits of `spec`'s cgroup.
pub fn limits_for(spec: &VmSpec) -> Limits {
    Limits {
        memory_bytes: (u64::from(spec.memory_mb) << 20) + QEMU_MEMORY_OVERHEAD,
        cpu_quota_us: (u64::from(spec.vcpus) + 1) * CPU_PERIOD_US,
        cpu_period_us: CPU_PERIOD_US,
        pids_max: QEMU_PIDS_BASE + u64::from(spec.vcpus),
    }
}

/// `forkvm-<id>-<pidfile stem>`: unique per QEMU process of a VM (a
/// handover's two generations and a capture helper differ in pidfile).
fn name_for(spec: &VmSpec) -> String {
    let stem = spec
        .pidfile
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("qemu");
    format!("{}{}-{stem}", forkvm_cgroup::VM_PREFIX, spec.id)
}

/// `<pidfile>.cgroup`: the VM cgroup's directories, one per line.
pub(crate) fn record_path(pidfile: &Path) -> PathBuf {
    let mut s = pidfile.as_os_str().to_owned();
    s.push(".cgroup");
    s.into()
}

fn cg_err(e: CgroupError) -> VmmError {
    VmmError::Cgroup(e)
}

/// Creates `spec`'s cgroup under `root` and records it.
pub(crate) fn create(root: &CgroupRoot, spec: &VmSpec) -> Result<VmCgroup, VmmError> {
    let limits = limits_for(spec);
    let cg = root.create(&name_for(spec), &limits).map_err(cg_err)?;
    let rec = record_path(&spec.pidfile);
    let lines: Vec<String> = cg.dirs().iter().map(|d| d.display().to_string()).collect();
    if let Err(e) = std::fs::write(&rec, lines.join("\n")) {
        let _ = cg.remove();
        return Err(VmmError::io("write", rec, e));
    }
    tracing::debug!(id = %spec.id, dirs = ?cg.dirs(), ?limits, "vm cgroup created");
    Ok(cg)
}

/// Removes the cgroup recorded beside `pidfile` (if any) and the record,
/// waiting briefly for an exiting QEMU to leave it. [`Hypervisor::stop`]
/// does this; call it only for a QEMU killed otherwise.
///
/// [`Hypervisor::stop`]: crate::Hypervisor::stop
pub async fn release(pidfile: &Path) -> Result<(), VmmError> {
    let rec = record_path(pidfile);
    let text = match std::fs::read_to_string(&rec) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(VmmError::io("read", rec, e)),
    };
    let dirs = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect();
    let cg = VmCgroup::from_dirs(dirs).map_err(cg_err)?;
    let deadline = tokio::time::Instant::now() + REMOVE_WAIT;
    loop {
        match cg.remove() {
            Ok(()) => break,
            // The process has exited (its pidfd said so) but the kernel may
            // not have detached it yet; nothing to wait on but the cgroup.
            Err(CgroupError::Busy(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(cg_err(e)),
        }
    }
    tracing::debug!(dirs = ?cg.dirs(), "vm cgroup removed");
    crate::qemu::remove_if_exists(&rec)
}
