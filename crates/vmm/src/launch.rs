//! Launching QEMU confined: a seccomp sandbox, a session of its own, its
//! cgroup ([`crate::cgroup`]), resource limits ([`crate::rlimits`]) and an
//! unprivileged user ([`crate::user`]), the last three applied between
//! fork and exec, in that order. What it opens it gets as fds
//! ([`crate::fds`]); the daemon writes its pidfile.
//!
//! QEMU is *not* started with `-daemonize`: its seccomp filter is installed
//! before it would daemonize, and daemonizing needs `fork` (denied by
//! `spawn=deny`) and `setsid` (denied by `elevateprivileges=deny`) — QEMU 7.2
//! dies of SIGSYS. Instead the daemon does what daemonizing did, in the
//! child before exec: `setsid` (no terminal signals from the daemon's
//! session), `chdir("/")`; QEMU stays the daemon's child (tokio reaps it if
//! it exits while the daemon runs; after a daemon restart init does) and
//! outlives the daemon as before. Readiness is QMP answering `query-status`
//! (QEMU serves QMP only once its main loop runs), raced against QEMU
//! exiting.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::error::VmmError;
use crate::fds::{Passed, PassedRaw};
use crate::jail::Jail;
use crate::process::is_qemu_for;
use crate::qemu::{
    QEMU_PATH, QemuHypervisor, qemu_log_path, query_status, remove_if_exists, start_output_tail,
};
use crate::qmp::QmpClient;
use crate::rlimits::Rlimits;
use crate::user::Credentials;
use crate::{Accel, RunState, VmSpec};
use forkvm_cgroup::{JoinFds, Joiner, VmCgroup};

/// Bound on QEMU's start: spawn until QMP answers.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// QEMU's seccomp sandbox (`-sandbox`): the default filter plus every deny
/// option QEMU 7.2 has. `obsolete`: old syscalls nobody needs;
/// `elevateprivileges`: set*uid/gid, setsid and friends; `spawn`: fork,
/// vfork, execve (nothing forkvm uses spawns: `script=no` TAPs, `fd:`
/// migration, QMP-created overlays); `resourcecontrol`: scheduler and
/// affinity calls.
pub(crate) const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

impl QemuHypervisor {
    /// Runs QEMU for `spec` and returns its pid and run state once QMP
    /// answers. Its environment is [`QEMU_PATH`] alone.
    pub(crate) async fn launch(
        &self,
        spec: &VmSpec,
        args: &[OsString],
        cgroup: Option<&VmCgroup>,
    ) -> Result<(u32, RunState), VmmError> {
        tracing::info!(id = %spec.id, accel = ?spec.accel, incoming = spec.incoming,
            mem_share = spec.mem_share, user = ?spec.user, "starting qemu");
        tracing::debug!(id = %spec.id, args = ?args, "qemu command line");
        let mut cmd = self.command(spec, args)?;
        let creds = spec
            .user
            .as_ref()
            .map(|u| Credentials::of(u, spec.accel == Accel::Kvm))
            .transpose()?;
        let passed = Passed::open(spec)?;
        let pidfile = open_pidfile(&spec.pidfile)?;
        // Open until the child has exec'd; it writes into them.
        let joiner = cgroup.map(VmCgroup::joiner).transpose()?;
        let jail = Jail::for_spec(spec, &self.qemu_bin)?;
        let child_setup = ChildSetup {
            pidfile: pidfile.as_raw_fd(),
            join: joiner.as_ref().map(Joiner::fds),
            passed: passed.raw(),
            rlimits: Rlimits::for_spec(spec)?,
            creds,
        };
        // SAFETY: the closure runs in the forked child before exec, where
        // only async-signal-safe calls are allowed; ChildSetup::apply makes
        // only such calls (getpid, write, setsid, dup2, setrlimit, signal,
        // setgroups, setgid, setuid, prctl; the jail's umask, unshare,
        // mount, mkdir, open, symlink, pivot_root, chdir, umount2, rmdir)
        // on values captured by copy or prepared before the fork.
        unsafe {
            cmd.pre_exec(move || child_setup.apply(jail.as_ref()));
        }
        let spawned = cmd.spawn();
        // The child has exec'd (or failed): it has its own copies of the
        // fds, and is in its cgroup. The sockets stay bound: QEMU listens.
        drop(passed);
        drop(pidfile);
        drop(joiner);
        let mut child = spawned.map_err(|e| VmmError::Spawn {
            bin: self.qemu_bin.clone(),
            source: e,
        })?;
        let pid = child.id().ok_or_else(|| VmmError::QemuExited {
            status: "exited at once".into(),
            stderr_tail: start_output_tail(spec),
        })?;
        let ready = tokio::select! {
            st = child.wait() => Err(exited(spec, st)),
            r = tokio::time::timeout(START_TIMEOUT, qmp_ready(&spec.qmp_socket)) => {
                r.unwrap_or_else(|_| Err(VmmError::Timeout {
                    what: format!("qemu start of {} ({})", spec.id, start_output_tail(spec)),
                    timeout: START_TIMEOUT,
                }))
            }
        };
        let state = match ready {
            Ok(st) => st,
            Err(e) => {
                // Don't leak a QEMU we can't control, and reap it (it is
                // ours). A QMP error is often QEMU exiting on a bad spec:
                // then its exit and its output are the better report.
                let _ = child.start_kill();
                let st = child.wait().await;
                let killed = matches!(&st, Ok(s) if s.signal() == Some(libc::SIGKILL));
                return Err(match e {
                    VmmError::QemuExited { .. } => e,
                    _ if !killed => exited(spec, st),
                    _ => e,
                });
            }
        };
        if !is_qemu_for(&spec.id, pid) {
            return Err(VmmError::QemuExited {
                status: format!("pid {pid} is not running"),
                stderr_tail: start_output_tail(spec),
            });
        }
        // Dropping the handle leaves QEMU running; tokio reaps it if it
        // exits while this daemon runs.
        drop(child);
        Ok((pid, state))
    }
}

impl QemuHypervisor {
    /// QEMU's command: `args`, [`QEMU_PATH`] as its only environment, `/`
    /// as its directory, its output into [`qemu_log_path`].
    fn command(
        &self,
        spec: &VmSpec,
        args: &[OsString],
    ) -> Result<tokio::process::Command, VmmError> {
        // QEMU's stdout and stderr, for its whole life (it keeps no -D log:
        // without -daemonize its errors go to stderr).
        let err_path = qemu_log_path(spec);
        let err_file = File::create(&err_path).map_err(|e| VmmError::io("create", &err_path, e))?;
        let out_file = err_file
            .try_clone()
            .map_err(|e| VmmError::io("dup", &err_path, e))?;
        let mut cmd = tokio::process::Command::new(&self.qemu_bin);
        // QEMU gets nothing of the daemon's environment (its API token,
        // credentials): a device escape must not find them in its memory.
        cmd.env_clear()
            .env("PATH", QEMU_PATH)
            .args(args)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(out_file)
            .stderr(err_file)
            // A VM outlives the daemon and the future that started it.
            .kill_on_drop(false);
        Ok(cmd)
    }
}

/// The start error of a QEMU that exited with `st`.
fn exited(spec: &VmSpec, st: std::io::Result<std::process::ExitStatus>) -> VmmError {
    match st {
        Ok(s) => VmmError::QemuExited {
            status: s.to_string(),
            stderr_tail: start_output_tail(spec),
        },
        Err(e) => VmmError::io("wait for", "qemu", e),
    }
}

/// QMP answers `query-status`: QEMU's main loop runs, the machine is set up.
async fn qmp_ready(socket: &Path) -> Result<RunState, VmmError> {
    let mut q = QmpClient::connect(socket, START_TIMEOUT).await?;
    query_status(&mut q).await
}

/// The pidfile, empty, for the child to write its pid into before exec
/// (QEMU has no `-pidfile`: it may not write the directory). Written by
/// the child, it names QEMU even if the daemon dies right after the fork.
fn open_pidfile(path: &Path) -> Result<File, VmmError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| VmmError::io("create", path, e))
}

/// Writes this process's pid and a newline to `fd`. Only async-signal-safe
/// calls (getpid, write), no allocation: this runs in the child after fork.
fn write_own_pid(fd: i32) -> std::io::Result<()> {
    // SAFETY: getpid has no preconditions.
    let mut pid = unsafe { libc::getpid() } as u32;
    let mut buf = [0u8; 12];
    let mut i = buf.len() - 1;
    buf[i] = b'\n';
    loop {
        i -= 1;
        buf[i] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    let out = &buf[i..];
    // SAFETY: writes `out.len()` bytes from a stack buffer to an fd the
    // parent keeps open until the child has exec'd.
    let n = unsafe { libc::write(fd, out.as_ptr().cast(), out.len()) };
    if n != out.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What a QEMU that did not start leaves: its sockets and pidfile.
pub(crate) fn remove_start_leftovers(spec: &VmSpec) {
    for p in [&spec.qmp_socket, &spec.agent_socket, &spec.pidfile] {
        if let Err(e) = remove_if_exists(p) {
            tracing::warn!(id = %spec.id, error = %e, "removing a failed start's file");
        }
    }
}

/// What the child does between fork and exec. Plain data (fds as numbers)
/// so nothing is allocated or dropped in the child.
#[derive(Clone, Copy)]
struct ChildSetup {
    /// The pidfile, opened empty: the child writes its pid first.
    pidfile: i32,
    /// The VM cgroup's `cgroup.procs` files: joined first, so QEMU never
    /// runs outside it.
    join: Option<JoinFds>,
    /// The fds QEMU gets, to be put at their numbers.
    passed: PassedRaw,
    rlimits: Rlimits,
    /// The user to become, last (after the limits, so they can't be
    /// raised again).
    creds: Option<Credentials>,
}

impl ChildSetup {
    /// Only async-signal-safe calls: this runs after fork in the child.
    /// The jail (its own mount namespace) comes before the user drops root.
    fn apply(&self, jail: Option<&Jail>) -> std::io::Result<()> {
        write_own_pid(self.pidfile)?;
        if let Some(j) = &self.join {
            j.join_self()?;
        }
        // SAFETY: setsid takes no arguments and only affects this process.
        if unsafe { libc::setsid() } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.passed.install()?;
        if let Some(j) = jail {
            j.enter()?;
        }
        self.rlimits.apply()?;
        match &self.creds {
            Some(c) => c.apply(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_writes_its_own_pid() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("qemu.pid");
        let f = open_pidfile(&p).unwrap();
        write_own_pid(f.as_raw_fd()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{}\n", std::process::id())
        );
    }
}
