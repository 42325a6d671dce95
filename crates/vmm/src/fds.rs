//! What the daemon opens for a QEMU: its TAP, its QMP and agent sockets
//! (bound and listening), its memory file, console, kernel, initrd and
//! image disk. QEMU gets them as fds at fixed numbers (`crate::args`) and
//! reopens files through `/proc/self/fd/N`: it needs no search permission
//! on the daemon's directories, no write permission on any directory, no
//! `/dev/net/tun` and no CAP_NET_ADMIN. With a [`VmUser`] the files get the
//! ownership that user needs (`crate::user`).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::args::{
    AGENT_FD, BOOT_CONFIG_FD, CONSOLE_FD, IMAGE_DISK_FD, INITRD_FD, KERNEL_FD, MEM_FD, QMP_FD,
    TAP_FD,
};
use crate::error::VmmError;
use crate::process::take_tap_fd;
use crate::user::{VmUser, own, prepare_disk_chain, share_base, share_read};
use crate::{DiskRole, NetBackend, VmSpec};

/// At most this many fds are passed.
pub(crate) const MAX_PASSED: usize = 9;
/// Passed fds are first moved at or above this number, so putting them at
/// their targets (all below) in the child never overwrites another.
const HIGH_FD: i32 = 64;

/// The fds for one QEMU, each at [`HIGH_FD`] or above, close-on-exec, with
/// the number QEMU expects it at.
pub(crate) struct Passed {
    fds: Vec<(OwnedFd, i32)>,
}

/// Plain `(fd, target)` pairs for the child.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PassedRaw {
    pairs: [(i32, i32); MAX_PASSED],
    n: usize,
}

impl Passed {
    /// Opens (and, with a user, hands over) everything `spec`'s QEMU uses.
    pub(crate) fn open(spec: &VmSpec) -> Result<Self, VmmError> {
        let user = spec.user.as_ref();
        let mut p = Passed { fds: Vec::new() };
        if let Some(net) = &spec.net {
            p.push(tap_fd(&net.backend)?, TAP_FD)?;
        }
        p.push(listen(&spec.qmp_socket)?, QMP_FD)?;
        p.push(listen(&spec.agent_socket)?, AGENT_FD)?;
        p.push(mem_file(spec)?.into(), MEM_FD)?;
        let con = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&spec.console_log)
            .map_err(|e| VmmError::io("open", &spec.console_log, e))?;
        if let Some(u) = user {
            own(&con, &spec.console_log, u)?;
        }
        p.push(con.into(), CONSOLE_FD)?;
        if let Some(cfg) = &spec.boot_config {
            // The instance's env: its QEMU's alone (never group-readable).
            let f = File::open(cfg).map_err(|e| VmmError::io("open", cfg, e))?;
            if let Some(u) = user {
                own(&f, cfg, u)?;
            }
            p.push(f.into(), BOOT_CONFIG_FD)?;
        }
        p.push(read_only(&spec.kernel, user)?.into(), KERNEL_FD)?;
        p.push(read_only(&spec.initrd, user)?.into(), INITRD_FD)?;
        for d in &spec.disks {
            match d.role {
                DiskRole::Image => p.push(read_only(&d.path, user)?.into(), IMAGE_DISK_FD)?,
                DiskRole::Rw => {
                    if let Some(u) = user {
                        prepare_disk_chain(&d.path, u)?;
                    }
                }
            }
        }
        Ok(p)
    }

    fn push(&mut self, fd: OwnedFd, target: i32) -> Result<(), VmmError> {
        // SAFETY: F_DUPFD_CLOEXEC on an fd we own; the result is a new fd
        // nothing else owns.
        let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
        if high < 0 {
            return Err(VmmError::io(
                "dup",
                format!("fd {}", fd.as_raw_fd()),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `high` was just returned by the kernel and is ours alone.
        let high = unsafe { OwnedFd::from_raw_fd(high) };
        self.fds.push((high, target));
        Ok(())
    }

    /// The pairs the child `dup2`s; valid while `self` lives.
    pub(crate) fn raw(&self) -> PassedRaw {
        let mut r = PassedRaw {
            pairs: [(-1, -1); MAX_PASSED],
            n: 0,
        };
        for (slot, (fd, target)) in r.pairs.iter_mut().zip(&self.fds) {
            *slot = (fd.as_raw_fd(), *target);
            r.n += 1;
        }
        r
    }
}

impl PassedRaw {
    /// Puts every fd at its number, inheritable. Only async-signal-safe
    /// calls: this runs in the child after fork.
    pub(crate) fn install(&self) -> std::io::Result<()> {
        for &(fd, target) in &self.pairs[..self.n] {
            // SAFETY: integer arguments; dup2 touches only this child's fd
            // table and the copy at `target` is not close-on-exec. Sources
            // are >= HIGH_FD > every target, so none is overwritten.
            if unsafe { libc::dup2(fd, target) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// A listening socket bound at `path` (a stale one is replaced).
fn listen(path: &Path) -> Result<OwnedFd, VmmError> {
    crate::qemu::remove_if_exists(path)?;
    let l = UnixListener::bind(path).map_err(|e| VmmError::io("bind", path, e))?;
    Ok(l.into())
}

/// The guest RAM file: `share=on` creates it if missing (QEMU sizes it)
/// and gives it to the user; `share=off` maps an existing base.
fn mem_file(spec: &VmSpec) -> Result<File, VmmError> {
    let p = &spec.mem_path;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(spec.mem_share)
        .mode(0o600)
        .open(p)
        .map_err(|e| VmmError::io("open", p, e))?;
    if let Some(u) = &spec.user {
        if spec.mem_share {
            own(&f, p, u)?;
        } else {
            share_base(&f, p, u)?;
        }
    }
    Ok(f)
}

fn read_only(p: &Path, user: Option<&VmUser>) -> Result<File, VmmError> {
    let f = File::open(p).map_err(|e| VmmError::io("open", p, e))?;
    if let Some(u) = user {
        share_read(&f, p, u)?;
    }
    Ok(f)
}

/// The TAP: attached by name (a missing one is created and lives as long
/// as an fd of it: QEMU's), or taken over from the QEMU that holds it.
fn tap_fd(b: &NetBackend) -> Result<OwnedFd, VmmError> {
    match b {
        NetBackend::Tap(name) => open_tap(name).map(OwnedFd::from),
        NetBackend::TakeOver { tap, from_pid } => take_tap_fd(*from_pid, tap)
            .map_err(|e| VmmError::io("take over TAP from", format!("/proc/{from_pid}"), e)),
    }
}

/// `TUNSETIFF` with the flags QEMU uses itself (`IFF_VNET_HDR`: the NIC's
/// device state needs vnet headers).
fn open_tap(name: &str) -> Result<File, VmmError> {
    let dev = "/dev/net/tun";
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(dev)
        .map_err(|e| VmmError::io("open", dev, e))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    // Flags are < 0x8000: they fit the kernel's short.
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq on our stack; the fd is
    // open.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(VmmError::io(
            "TUNSETIFF",
            format!("tap {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(f)
}
