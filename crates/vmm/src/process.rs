//! Process helpers: identifying our QEMU processes and waiting for them.
//!
//! QEMU is this daemon's child only until the daemon restarts (then init
//! adopts it), and tokio reaps it meanwhile: we never `waitpid` it. A pidfd
//! gives a race-free handle that becomes readable on exit either way.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The `-name` guest name forkvm gives a VM; also its process name.
pub fn qemu_name(id: &str) -> String {
    format!("forkvm-{id}")
}

/// True if `pid` is a live (non-zombie) process whose command line is a
/// QEMU started for VM `id`. Guards against pid reuse after a daemon restart.
pub fn is_qemu_for(id: &str, pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let proc_dir = Path::new("/proc").join(pid.to_string());
    // A zombie still has a /proc entry but its cmdline is empty; check state too
    // because a subreaper that doesn't reap would leave one.
    if matches!(stat_state(&proc_dir.join("stat")), Some('Z' | 'X') | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    cmdline_matches(&cmdline, id)
}

/// The state letter of `/proc/<pid>[/task/<tid>]/stat` (`R`, `S`, `T`, …).
fn stat_state(stat_path: &Path) -> Option<char> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
}

/// Every thread of `pid` is stopped by a signal (`T`): it runs no code.
/// False if it is gone.
pub(crate) fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("task")) else {
        return false;
    };
    let mut any = false;
    for t in tasks.flatten() {
        any = true;
        if stat_state(&t.path().join("stat")) != Some('T') {
            return false;
        }
    }
    any
}

/// `pid`'s main thread is stopped by a signal (a held VMM).
pub(crate) fn is_stopped(pid: u32) -> bool {
    stat_state(&Path::new("/proc").join(pid.to_string()).join("stat")) == Some('T')
}

/// Checks a NUL-separated command line for `-name forkvm-<id>[,...]`.
pub(crate) fn cmdline_matches(cmdline: &[u8], id: &str) -> bool {
    let want = qemu_name(id);
    let mut args = cmdline.split(|b| *b == 0);
    let Some(argv0) = args.next() else {
        return false;
    };
    if !String::from_utf8_lossy(argv0).contains("qemu") {
        return false;
    }
    while let Some(a) = args.next() {
        if a == b"-name" {
            let Some(v) = args.next() else { return false };
            let v = String::from_utf8_lossy(v);
            let first = v.split(',').next().unwrap_or("");
            let guest = first.strip_prefix("guest=").unwrap_or(first);
            return guest == want;
        }
    }
    false
}

/// A pidfd for a process that is not our child.
pub(crate) struct PidFd {
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    /// Opens a pidfd for `pid`. Fails with ESRCH if it is already gone.
    pub(crate) fn open(pid: u32) -> std::io::Result<Self> {
        // Hand-rolled syscall: neither nix 0.32 nor std expose pidfd_open for
        // non-child processes.
        // SAFETY: a plain syscall with integer arguments; on success it
        // returns a new fd that nothing else owns.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        // SAFETY: `owned` is a valid open fd that the AsyncFd takes ownership
        // of, so it stays open and unchanged for the AsyncFd's lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(PidFd { fd })
    }

    /// Sends `sig` through the pidfd, so it can't hit a recycled pid.
    pub(crate) fn signal(&self, sig: libc::c_int) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: valid pidfd, null siginfo and zero flags as the syscall documents.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ESRCH: it already exited, which is what the caller wants anyway.
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Waits up to `t` for the process to exit; true if it did.
    pub(crate) async fn wait_exit(&self, t: Duration) -> bool {
        // A pidfd polls readable once the process has exited.
        matches!(tokio::time::timeout(t, self.fd.readable()).await, Ok(Ok(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cl(args: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for a in args {
            v.extend_from_slice(a.as_bytes());
            v.push(0);
        }
        v
    }

    #[test]
    fn cmdline_matching() {
        let ok = cl(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "forkvm-a1,process=forkvm-a1",
            "-m",
            "256",
        ]);
        assert!(cmdline_matches(&ok, "a1"));
        assert!(
            !cmdline_matches(&ok, "a"),
            "prefix of another id must not match"
        );
        assert!(!cmdline_matches(&ok, "a12"));
        let not_qemu = cl(&["/bin/sleep", "-name", "forkvm-a1"]);
        assert!(!cmdline_matches(&not_qemu, "a1"));
        let no_name = cl(&["qemu-system-x86_64", "-m", "256"]);
        assert!(!cmdline_matches(&no_name, "a1"));
        assert!(!cmdline_matches(b"", "a1"));
    }

    #[test]
    fn own_process_is_not_a_vm() {
        assert!(!is_qemu_for("x", std::process::id()));
        assert!(!is_qemu_for("x", 0));
    }
}

/// A duplicate, in this process, of process `pid`'s file descriptor for TAP
/// device `tap` (the tun fd whose `/proc/<pid>/fdinfo` names it), taken with
/// `pidfd_getfd`: a TAP without multi-queue admits one opener, so a VMM that
/// takes over from another gets the other's fd instead of opening it.
pub fn take_tap_fd(pid: u32, tap: &str) -> std::io::Result<OwnedFd> {
    let want = format!("iff:\t{tap}");
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if info.lines().any(|l| l.trim_end() == want) {
            return pidfd_getfd(pid, fd);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("process {pid} holds no fd of TAP {tap}"),
    ))
}

fn pidfd_getfd(pid: u32, fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments; on success it returns a
    // new fd that nothing else owns.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    use std::os::fd::AsRawFd;
    // SAFETY: integer arguments only; the result is a new close-on-exec fd
    // in our table (needs ptrace rights over `pid`: root here).
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above, a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

#[cfg(test)]
mod takeover_tests {
    use super::*;

    #[test]
    fn a_process_without_that_tap_is_an_error() {
        let e = take_tap_fd(std::process::id(), "fvm-none").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
