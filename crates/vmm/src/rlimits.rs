//! Resource limits a VM's QEMU runs under (set between fork and exec, so
//! they hold from QEMU's first instruction).
//!
//! - `RLIMIT_FSIZE`: the largest file QEMU may write. What a VM legitimately
//!   writes is bounded by its memory (the memory file, and a state file,
//!   which holds all guest RAM when the RAM is mapped `share=off`) and by its
//!   writable disk's virtual size (its qcow2 top, which QEMU also creates at
//!   a freeze, plus qcow2 metadata); the console is rotated by the daemon far
//!   below either. The limit is the larger of the two plus an allowance.
//!   QEMU ignores `SIGXFSZ`, so a write past the limit fails with `EFBIG`
//!   (an I/O error in the guest) instead of killing the VM.
//! - `RLIMIT_NOFILE`: a fixed bound, generous for KVM's per-vCPU and
//!   per-queue eventfds.
//! - `RLIMIT_CORE` 0: a QEMU core dump would hold the tenant's memory.

use std::io::Read;
use std::path::Path;

use crate::error::VmmError;
use crate::{DiskRole, VmSpec};

/// Open files a QEMU may have.
pub const QEMU_NOFILE: u64 = 4096;
/// Slack over the largest legitimate file: device state, qcow2 headers and
/// refcount tables, logs.
const FSIZE_SLACK: u64 = 64 << 20;

/// The limits of one VM's QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rlimits {
    pub fsize: u64,
    pub nofile: u64,
}

impl Rlimits {
    /// The limits for `spec`: reads the virtual size of its writable disk
    /// (a qcow2 header).
    pub(crate) fn for_spec(spec: &VmSpec) -> Result<Self, VmmError> {
        let disk = match spec.disks.iter().find(|d| d.role == DiskRole::Rw) {
            Some(d) => qcow2_virtual_size(&d.path)?,
            None => 0,
        };
        Ok(Self::of(u64::from(spec.memory_mb) << 20, disk))
    }

    /// The limits for `memory` bytes of guest RAM and a writable disk of
    /// `disk` bytes: the larger, plus 1/8 of it (qcow2 metadata: an L2
    /// entry and a refcount per 64 KiB cluster, leaked clusters after a
    /// crash), plus [`FSIZE_SLACK`].
    pub(crate) fn of(memory: u64, disk: u64) -> Self {
        let big = memory.max(disk);
        Rlimits {
            fsize: big.saturating_add(big / 8).saturating_add(FSIZE_SLACK),
            nofile: QEMU_NOFILE,
        }
    }

    /// Applies the limits to the calling process and ignores `SIGXFSZ`.
    /// Only async-signal-safe calls: this runs in the child after fork.
    pub(crate) fn apply(&self) -> std::io::Result<()> {
        for (res, v) in [
            (libc::RLIMIT_FSIZE, self.fsize),
            (libc::RLIMIT_NOFILE, self.nofile),
            (libc::RLIMIT_CORE, 0),
        ] {
            let lim = libc::rlimit {
                rlim_cur: v,
                rlim_max: v,
            };
            // SAFETY: a plain syscall wrapper reading a valid rlimit struct
            // on the stack; it changes only this process.
            if unsafe { libc::setrlimit(res, &lim) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: setting a signal's disposition to SIG_IGN is
        // async-signal-safe; an ignored disposition survives exec, so QEMU
        // sees EFBIG at the limit instead of dying of SIGXFSZ.
        if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The virtual size of a qcow2 image: big-endian u64 at byte 24 of its
/// header, after the magic `QFI\xfb`.
pub(crate) fn qcow2_virtual_size(p: &Path) -> Result<u64, VmmError> {
    let mut h = [0u8; 32];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut h))
        .map_err(|e| VmmError::io("read qcow2 header of", p, e))?;
    if &h[..4] != b"QFI\xfb" {
        return Err(VmmError::InvalidSpec(format!(
            "writable disk {} is not a qcow2 image",
            p.display()
        )));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&h[24..32]);
    Ok(u64::from_be_bytes(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_follows_the_larger_of_memory_and_disk() {
        let m = 256u64 << 20;
        let r = Rlimits::of(m, 0);
        assert_eq!(r.fsize, m + m / 8 + FSIZE_SLACK);
        let d = 4096u64 << 20;
        assert_eq!(Rlimits::of(m, d).fsize, d + d / 8 + FSIZE_SLACK);
        assert_eq!(Rlimits::of(u64::MAX, 0).fsize, u64::MAX);
        assert_eq!(r.nofile, QEMU_NOFILE);
    }

    #[test]
    fn reads_a_qcow2_virtual_size_and_refuses_other_files() {
        let t = tempfile::tempdir().unwrap();
        let q = t.path().join("d.qcow2");
        let mut h = b"QFI\xfb".to_vec();
        h.resize(24, 0);
        h.extend_from_slice(&(5u64 << 30).to_be_bytes());
        std::fs::write(&q, &h).unwrap();
        assert_eq!(qcow2_virtual_size(&q).unwrap(), 5 << 30);
        let raw = t.path().join("d.raw");
        std::fs::write(&raw, [0u8; 64]).unwrap();
        assert!(matches!(
            qcow2_virtual_size(&raw),
            Err(VmmError::InvalidSpec(_))
        ));
        assert!(matches!(
            qcow2_virtual_size(&t.path().join("none")),
            Err(VmmError::Io { .. })
        ));
    }
}
