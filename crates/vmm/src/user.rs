//! The unprivileged user a VM's QEMU runs as, and the file ownership that
//! lets it run.
//!
//! QEMU drops root between fork and exec ([`Credentials::apply`]:
//! `setgroups`, `setgid`, `setuid`, `no_new_privs`), after joining its
//! cgroup and lowering its rlimits, so it never runs a single instruction
//! as root and can't raise the limits again. QEMU's own `-runas` can't be
//! used: it switches after the seccomp filter, which denies `setuid`.
//!
//! What QEMU opens is handed over as fds it reopens through
//! `/proc/self/fd/N` (`crate::fds`), which skips the search permission of
//! the daemon's 0700 directories; the file's own mode still counts, so:
//! - what the VM writes (its memory file, console, writable top) is owned
//!   by its uid, mode 0600 ([`own`]);
//! - what it only reads (kernel, initrd, image disk) is world-readable or
//!   readable by the VM group ([`share_read`]);
//! - a base memory file mapped `share=off` is root's, mode 0660 with the VM
//!   group: QEMU 7.2 opens it read-write (a read-only file backend maps it
//!   read-only) and only reaches it through the fd;
//! - the frozen layers of a writable disk's qcow2 chain are root's, mode
//!   0640 with the VM group ([`lock_layer`]): QEMU opens them by the path
//!   in each overlay's header, so their directory must be traversable by
//!   the group (the daemon makes it 0710).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::VmmError;

/// Supplementary groups a QEMU may get (the VM group and `/dev/kvm`'s).
const MAX_GROUPS: usize = 4;
/// Longest qcow2 backing chain walked.
const MAX_CHAIN: usize = 512;

/// Who a VM's QEMU runs as: one uid per instance, the group shared by
/// every VM (it may read shared inputs), and for KVM `/dev/kvm`'s group
/// (added at launch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmUser {
    pub uid: u32,
    pub gid: u32,
}

/// Plain data for the child between fork and exec.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Credentials {
    uid: u32,
    gid: u32,
    groups: [libc::gid_t; MAX_GROUPS],
    ngroups: usize,
}

impl Credentials {
    /// The credentials of `user`; with `kvm`, `/dev/kvm`'s group is added
    /// (read here, before the fork).
    pub(crate) fn of(user: &VmUser, kvm: bool) -> Result<Self, VmmError> {
        if user.uid == 0 || user.gid == 0 {
            return Err(VmmError::InvalidSpec(
                "the VM user must not be root (uid or gid 0)".into(),
            ));
        }
        let mut c = Credentials {
            uid: user.uid,
            gid: user.gid,
            groups: [0; MAX_GROUPS],
            ngroups: 1,
        };
        c.groups[0] = user.gid;
        if kvm
            && let Ok(m) = std::fs::metadata("/dev/kvm")
            && m.gid() != 0
            && m.gid() != user.gid
        {
            c.groups[1] = m.gid();
            c.ngroups = 2;
        }
        Ok(c)
    }

    /// Drops root for good. Only async-signal-safe calls: this runs in the
    /// child after fork.
    pub(crate) fn apply(&self) -> std::io::Result<()> {
        let check = |r: libc::c_int| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain syscall wrappers; setgroups reads `ngroups` gids
        // from an array on this (copied) struct; they change only this
        // process's credentials.
        unsafe {
            check(libc::setgroups(self.ngroups, self.groups.as_ptr()))?;
            check(libc::setgid(self.gid))?;
            check(libc::setuid(self.uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

/// Makes the open file `f` (at `p`) the VM's: owner `user`, mode 0600.
pub(crate) fn own(f: &std::fs::File, p: &Path, user: &VmUser) -> Result<(), VmmError> {
    fchown(f, Some(user.uid), Some(user.gid)).map_err(|e| VmmError::io("chown", p, e))?;
    fchmod(f, 0o600).map_err(|e| VmmError::io("chmod", p, e))
}

/// Lets the VM read the open file `f` (at `p`): nothing to do when anyone
/// may, else it gets the VM group and group read.
pub(crate) fn share_read(f: &std::fs::File, p: &Path, user: &VmUser) -> Result<(), VmmError> {
    let m = f.metadata().map_err(|e| VmmError::io("stat", p, e))?;
    if m.mode() & 0o004 != 0 || (m.gid() == user.gid && m.mode() & 0o040 != 0) {
        return Ok(());
    }
    fchown(f, None, Some(user.gid)).map_err(|e| VmmError::io("chgrp", p, e))?;
    fchmod(f, (m.mode() & 0o7777) | 0o040).map_err(|e| VmmError::io("chmod", p, e))
}

/// A base memory file a `share=off` VM maps: root's, the VM group may
/// open it read-write (QEMU 7.2 does), nobody else.
pub(crate) fn share_base(f: &std::fs::File, p: &Path, user: &VmUser) -> Result<(), VmmError> {
    fchown(f, Some(0), Some(user.gid)).map_err(|e| VmmError::io("chown", p, e))?;
    fchmod(f, 0o660).map_err(|e| VmmError::io("chmod", p, e))
}

/// A frozen disk layer: root's, readable by the VM group (any VM's chain
/// may hold it), written by no VM again.
pub(crate) fn lock_layer(p: &Path, gid: u32) -> Result<(), VmmError> {
    std::os::unix::fs::chown(p, Some(0), Some(gid)).map_err(|e| VmmError::io("chown", p, e))?;
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o640))
        .map_err(|e| VmmError::io("chmod", p, e))
}

/// Gives the writable disk `top` to `user` and locks every layer below it
/// (its qcow2 backing chain, read from the headers).
pub(crate) fn prepare_disk_chain(top: &Path, user: &VmUser) -> Result<(), VmmError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(top)
        .map_err(|e| VmmError::io("open", top, e))?;
    own(&f, top, user)?;
    let mut cur = top.to_path_buf();
    for _ in 0..MAX_CHAIN {
        let Some(next) = backing_file(&cur)? else {
            return Ok(());
        };
        lock_layer(&next, user.gid)?;
        cur = next;
    }
    Err(VmmError::InvalidSpec(format!(
        "the backing chain of {} is deeper than {MAX_CHAIN}",
        top.display()
    )))
}

/// The backing file of a qcow2 image (`None`: not qcow2, or no backing
/// file). A relative name is relative to the image's directory.
pub(crate) fn backing_file(p: &Path) -> Result<Option<PathBuf>, VmmError> {
    let mut f = std::fs::File::open(p).map_err(|e| VmmError::io("open", p, e))?;
    let mut h = [0u8; 20];
    if f.read_exact(&mut h).is_err() || &h[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&h[8..16]);
    let mut len = [0u8; 4];
    len.copy_from_slice(&h[16..20]);
    let (off, len) = (u64::from_be_bytes(off), u32::from_be_bytes(len));
    if off == 0 || len == 0 {
        return Ok(None);
    }
    if len > 1023 {
        return Err(VmmError::InvalidSpec(format!(
            "{}: backing file name of {len} bytes",
            p.display()
        )));
    }
    let mut name = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut name, off)
        .map_err(|e| VmmError::io("read backing file name of", p, e))?;
    let name =
        PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(name));
    Ok(Some(match p.parent() {
        Some(d) if name.is_relative() => d.join(name),
        _ => name,
    }))
}

fn fchown(f: &std::fs::File, uid: Option<u32>, gid: Option<u32>) -> std::io::Result<()> {
    std::os::unix::fs::fchown(f, uid, gid)
}

fn fchmod(f: &std::fs::File, mode: u32) -> std::io::Result<()> {
    // SAFETY: fchmod on an fd we own, integer arguments.
    if unsafe { libc::fchmod(f.as_raw_fd(), mode) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_backing_chain_from_qcow2_headers() {
        let t = tempfile::tempdir().unwrap();
        let mut h = b"QFI\xfb".to_vec();
        h.resize(8, 0);
        h.extend_from_slice(&64u64.to_be_bytes());
        h.extend_from_slice(&8u32.to_be_bytes());
        h.resize(64, 0);
        h.extend_from_slice(b"base.raw");
        let top = t.path().join("top.qcow2");
        std::fs::write(&top, &h).unwrap();
        assert_eq!(backing_file(&top).unwrap(), Some(t.path().join("base.raw")));
        let raw = t.path().join("base.raw");
        std::fs::write(&raw, [0u8; 64]).unwrap();
        assert_eq!(backing_file(&raw).unwrap(), None);
    }

    #[test]
    fn root_is_never_a_vm_user() {
        assert!(Credentials::of(&VmUser { uid: 0, gid: 5 }, false).is_err());
        assert!(Credentials::of(&VmUser { uid: 5, gid: 0 }, false).is_err());
        let c = Credentials::of(
            &VmUser {
                uid: 900001,
                gid: 900000,
            },
            false,
        )
        .unwrap();
        assert_eq!((c.ngroups, c.groups[0]), (1, 900000));
    }
}
