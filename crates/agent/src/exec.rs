//! Process execution and PID-1 reaping.
//!
//! As PID 1 the agent inherits every orphan and must reap it, but `waitpid(-1)`
//! would also steal the exit status of processes an Exec is waiting for. So
//! every child the agent starts is registered with the [`Reaper`] *while the
//! registry lock is held across spawn*, and the reaper routes each status to the
//! waiter of that pid; unregistered pids are orphans and only logged.
//!
//! tokio's own process module also calls `waitpid`, so children are spawned with
//! `std::process` and their pipes are wrapped in tokio pipe types instead.
//! The agent runs a current-thread runtime, which keeps std's internal waitpid on
//! a failed exec from racing with the reaper.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Cap on captured output per stream for the non-streaming Exec (the host
/// sizes its reply limit from the same constant).
pub const MAX_CAPTURE: usize = forkvm_proto::EXEC_OUTPUT_CAP;
/// After the child exits, how long to keep draining pipes still held open by
/// its descendants before returning.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_millis(500);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or -1 when killed by a signal.
    pub code: i32,
    /// Signal number when killed by a signal, else 0.
    pub signal: i32,
}

/// Routes child exit statuses to their waiters.
#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitInfo>>>,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Spawns `cmd` and registers its pid before the reaper can observe its exit.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<ExitInfo>)> {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Reaps every exited child; call on SIGCHLD (signals coalesce, so loop).
    pub fn reap_all(&self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "waitpid failed");
                    return;
                }
                Ok(s) => s,
            };
            let (pid, info) = match status {
                WaitStatus::Exited(pid, code) => (pid, ExitInfo { code, signal: 0 }),
                WaitStatus::Signaled(pid, sig, _) => (
                    pid,
                    ExitInfo {
                        code: -1,
                        signal: sig as i32,
                    },
                ),
                // Stopped/continued children are not reaped; keep looping.
                _ => continue,
            };
            let waiter = self
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&pid.as_raw());
            match waiter {
                Some(tx) => {
                    // The waiter may have given up (client gone); nothing to do then.
                    let _ = tx.send(info);
                }
                None => debug!(
                    pid = pid.as_raw(),
                    code = info.code,
                    signal = info.signal,
                    "reaped orphan"
                ),
            }
        }
    }

    /// Runs forever, reaping on every SIGCHLD.
    pub async fn run(self: Arc<Self>, mut sigchld: tokio::signal::unix::Signal) {
        // Children that exited before the handler existed.
        self.reap_all();
        while sigchld.recv().await.is_some() {
            self.reap_all();
        }
        warn!("SIGCHLD stream ended; reaping stopped");
    }
}

/// A validated command to run.
#[derive(Clone, Debug, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    /// Full environment (boot env already merged with the request's).
    pub env: BTreeMap<String, String>,
    pub stdin: Vec<u8>,
    pub timeout: Option<Duration>,
    /// Working directory; with `chroot`, relative to the new root (`/` if
    /// unset), else the agent's own when unset.
    pub cwd: Option<String>,
    /// Run chrooted here: argv[0] is then looked up (execvp) in the env's
    /// PATH inside this root, never on the agent's side.
    pub chroot: Option<PathBuf>,
}

/// Where a command's stdin comes from.
pub enum StdinFeed {
    /// `spec.stdin`, then EOF (nothing: /dev/null).
    Spec,
    /// Chunks as they arrive; the channel's end is the command's EOF.
    Channel(mpsc::Receiver<Vec<u8>>),
}

/// Output chunk of a running command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// Result of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecOutcome {
    pub exit: ExitInfo,
    pub timed_out: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("argv is empty")]
    EmptyArgv,
    #[error("spawning {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("setting up pipes: {0}")]
    Pipe(#[source] io::Error),
    #[error("child exit status was lost")]
    StatusLost,
}

/// Merges the request env over the boot env and supplies a default PATH.
pub fn merge_env(
    boot: &BTreeMap<String, String>,
    request: impl IntoIterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([("PATH".to_owned(), DEFAULT_PATH.to_owned())]);
    env.extend(boot.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(request);
    env
}

fn pipe_rx(fd: impl Into<OwnedFd>) -> Result<pipe::Receiver, ExecError> {
    pipe::Receiver::from_owned_fd(fd.into()).map_err(ExecError::Pipe)
}

/// Reads one chunk; `None` once the pipe is at EOF (or broken).
async fn read_chunk(rx: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> Option<Vec<u8>> {
    let r = rx.as_mut()?;
    match r.read(buf).await {
        Ok(0) | Err(_) => {
            *rx = None;
            None
        }
        Ok(n) => Some(buf[..n].to_vec()),
    }
}

/// Runs `spec` to completion, sending output to `out` as it arrives. If `out` is
/// closed (the caller went away) the process group is killed. On timeout the
/// process group is killed with SIGKILL.
pub async fn run(
    reaper: &Reaper,
    spec: ExecSpec,
    out: mpsc::Sender<ExecEvent>,
) -> Result<ExecOutcome, ExecError> {
    run_fed(reaper, spec, StdinFeed::Spec, out).await
}

/// [`run`] with stdin from `feed`.
pub async fn run_fed(
    reaper: &Reaper,
    spec: ExecSpec,
    feed: StdinFeed,
    out: mpsc::Sender<ExecEvent>,
) -> Result<ExecOutcome, ExecError> {
    let program = spec.argv.first().ok_or(ExecError::EmptyArgv)?.clone();
    let piped = !spec.stdin.is_empty() || matches!(feed, StdinFeed::Channel(_));
    let mut cmd = command(&program, &spec, piped).map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    let (mut child, exit_rx) = reaper.spawn(&mut cmd).map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    debug!(pid = pid.as_raw(), %program, "exec started");

    let stdout = child.stdout.take().map(pipe_rx).transpose()?;
    let stderr = child.stderr.take().map(pipe_rx).transpose()?;
    if let Some(stdin) = child.stdin.take() {
        match feed {
            StdinFeed::Spec => feed_stdin(stdin, spec.stdin)?,
            StdinFeed::Channel(rx) => stream_stdin(stdin, rx)?,
        }
    }
    let running = Running {
        pid,
        program,
        stdout,
        stderr,
        exit_rx: Some(exit_rx),
    };
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let outcome = running.wait(deadline, &out).await?;
    debug!(
        pid = pid.as_raw(),
        code = outcome.exit.code,
        signal = outcome.exit.signal,
        timed_out = outcome.timed_out,
        "exec finished"
    );
    Ok(outcome)
}

/// The command for `spec`: only the given environment, output piped, and its
/// own process group, so a timeout kills `sh -c` *and* what it started.
/// A path with a NUL byte is an `InvalidInput` error.
fn command(program: &str, spec: &ExecSpec, stdin_piped: bool) -> io::Result<Command> {
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(&spec.env)
        .stdin(if stdin_piped {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    match &spec.chroot {
        Some(root) => chroot_into(&mut cmd, root, spec.cwd.as_deref().unwrap_or("/"))?,
        None => {
            if let Some(cwd) = &spec.cwd {
                cmd.current_dir(cwd);
            }
        }
    }
    Ok(cmd)
}

/// Makes `cmd` chroot to `root` and change to `cwd` inside it before exec.
/// std runs the pre_exec hook after its own set-up and then calls execvp
/// with the command's environment, so the program is looked up in that
/// PATH inside the new root: the agent's side never resolves a path (or
/// follows a symbolic link) of the image.
pub(crate) fn chroot_into(cmd: &mut Command, root: &Path, cwd: &str) -> io::Result<()> {
    let cstr = |b: &[u8]| {
        CString::new(b).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{:?} contains a NUL byte", String::from_utf8_lossy(b)),
            )
        })
    };
    let root_c = cstr(root.as_os_str().as_bytes())?;
    let cwd_c = cstr(cwd.as_bytes())?;
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (chroot, chdir) on C strings prepared
    // before the fork; it allocates nothing. chdir("/") first: chroot keeps
    // the old working directory (outside the root), and a relative `cwd` is
    // then relative to the new root.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::chroot(root_c.as_c_str())?;
            nix::unistd::chdir(c"/")?;
            nix::unistd::chdir(cwd_c.as_c_str())?;
            Ok(())
        });
    }
    Ok(())
}

/// Writes `data` to the child's stdin from a task, then closes it.
fn feed_stdin(stdin: ChildStdin, data: Vec<u8>) -> Result<(), ExecError> {
    let mut tx = pipe::Sender::from_owned_fd(stdin.into()).map_err(ExecError::Pipe)?;
    tokio::spawn(async move {
        // EPIPE is normal when the child does not read all of its input.
        let _ = tx.write_all(&data).await;
    });
    Ok(())
}

/// Writes what arrives on `rx` to the child's stdin from a task; closes it
/// when the channel ends.
fn stream_stdin(stdin: ChildStdin, mut rx: mpsc::Receiver<Vec<u8>>) -> Result<(), ExecError> {
    let mut tx = pipe::Sender::from_owned_fd(stdin.into()).map_err(ExecError::Pipe)?;
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if tx.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// SIGKILL to the child's process group (already gone is fine).
pub(crate) fn kill_group(pid: Pid) {
    if let Err(e) = killpg(pid, Signal::SIGKILL)
        && e != Errno::ESRCH
    {
        warn!(pid = pid.as_raw(), error = %e, "killpg failed");
    }
}

/// A spawned child as [`run`] waits on it: its output pipes (`None` once at
/// EOF) and its exit status from the [`Reaper`] (`None` once received).
struct Running {
    pid: Pid,
    program: String,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    exit_rx: Option<oneshot::Receiver<ExitInfo>>,
}

impl Running {
    /// Forwards output to `out` until the child has exited and its pipes are
    /// closed (or [`DRAIN_GRACE`] after the exit); kills the process group at
    /// `deadline` or when `out` closes.
    async fn wait(
        mut self,
        deadline: Option<Instant>,
        out: &mpsc::Sender<ExecEvent>,
    ) -> Result<ExecOutcome, ExecError> {
        let pid = self.pid;
        let mut timed_out = false;
        let mut exit: Option<ExitInfo> = None;
        let mut drain_until: Option<Instant> = None;
        let mut obuf = vec![0u8; 64 << 10];
        let mut ebuf = vec![0u8; 64 << 10];
        let mut out_open = true;

        loop {
            if exit.is_some() && self.stdout.is_none() && self.stderr.is_none() {
                break;
            }
            let timeout_at = deadline.filter(|_| !timed_out && exit.is_none());
            tokio::select! {
                Some(chunk) = read_chunk(&mut self.stdout, &mut obuf), if self.stdout.is_some() => {
                    if out_open && out.send(ExecEvent::Stdout(chunk)).await.is_err() {
                        out_open = false;
                        kill_group(pid);
                    }
                }
                Some(chunk) = read_chunk(&mut self.stderr, &mut ebuf), if self.stderr.is_some() => {
                    if out_open && out.send(ExecEvent::Stderr(chunk)).await.is_err() {
                        out_open = false;
                        kill_group(pid);
                    }
                }
                st = async {
                    match self.exit_rx.as_mut() {
                        Some(rx) => rx.await,
                        None => std::future::pending().await,
                    }
                }, if self.exit_rx.is_some() => {
                    self.exit_rx = None;
                    exit = Some(st.map_err(|_| ExecError::StatusLost)?);
                    drain_until = Some(Instant::now() + DRAIN_GRACE);
                }
                _ = tokio::time::sleep_until(timeout_at.unwrap_or_else(Instant::now)), if timeout_at.is_some() => {
                    info!(pid = pid.as_raw(), program = %self.program, "exec timed out; killing process group");
                    timed_out = true;
                    kill_group(pid);
                }
                _ = tokio::time::sleep_until(drain_until.unwrap_or_else(Instant::now)), if drain_until.is_some() => {
                    debug!(pid = pid.as_raw(), "output still open after exit; not waiting for it");
                    break;
                }
                _ = out.closed(), if out_open => {
                    out_open = false;
                    kill_group(pid);
                }
            }
        }
        let exit = exit.ok_or(ExecError::StatusLost)?;
        Ok(ExecOutcome { exit, timed_out })
    }
}

/// Collected output of [`run_collect`].
#[derive(Debug, Default)]
pub struct Collected {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `spec` and collects output, each stream capped at [`MAX_CAPTURE`] bytes
/// (the rest is read and discarded so the child never blocks on a full pipe).
pub async fn run_collect(
    reaper: &Reaper,
    spec: ExecSpec,
) -> Result<(ExecOutcome, Collected), ExecError> {
    let (tx, mut rx) = mpsc::channel(16);
    let collect = async move {
        let mut c = Collected::default();
        while let Some(ev) = rx.recv().await {
            let (buf, chunk) = match ev {
                ExecEvent::Stdout(b) => (&mut c.stdout, b),
                ExecEvent::Stderr(b) => (&mut c.stderr, b),
            };
            let room = MAX_CAPTURE.saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        c
    };
    let (outcome, collected) = tokio::join!(run(reaper, spec, tx), collect);
    Ok((outcome?, collected))
}

#[cfg(test)]
mod tests {
    use super::*;

    // All exec tests share one process-wide reaper (waitpid(-1) would steal
    // other tests' children), so they run sequentially inside one test.
    #[tokio::test(flavor = "current_thread")]
    async fn exec_end_to_end() {
        let reaper = Reaper::new();
        let sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).unwrap();
        tokio::spawn(reaper.clone().run(sig));
        let env = merge_env(
            &BTreeMap::from([("A".into(), "boot".into()), ("B".into(), "boot".into())]),
            [("B".to_string(), "req".to_string())],
        );
        let spec = |argv: &[&str]| ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.clone(),
            ..Default::default()
        };

        // exit code, stdout, stderr, env merge
        let (o, c) = run_collect(
            &reaper,
            spec(&["/bin/sh", "-c", "echo $A-$B; echo err >&2; exit 3"]),
        )
        .await
        .unwrap();
        assert_eq!(o.exit, ExitInfo { code: 3, signal: 0 });
        assert!(!o.timed_out);
        assert_eq!(c.stdout, b"boot-req\n");
        assert_eq!(c.stderr, b"err\n");

        // stdin
        let mut s = spec(&["/bin/cat"]);
        s.stdin = b"hello stdin".to_vec();
        let (o, c) = run_collect(&reaper, s).await.unwrap();
        assert_eq!(o.exit.code, 0);
        assert_eq!(c.stdout, b"hello stdin");

        // timeout kills the whole group (the grandchild sleep holds stdout open)
        let mut s = spec(&["/bin/sh", "-c", "sleep 30; echo never"]);
        s.timeout = Some(Duration::from_millis(200));
        let t0 = std::time::Instant::now();
        let (o, c) = run_collect(&reaper, s).await.unwrap();
        assert!(o.timed_out);
        assert_eq!(
            o.exit,
            ExitInfo {
                code: -1,
                signal: 9
            }
        );
        assert!(c.stdout.is_empty());
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

        // killed by a signal
        let (o, _) = run_collect(&reaper, spec(&["/bin/sh", "-c", "kill -TERM $$"]))
            .await
            .unwrap();
        assert_eq!(
            o.exit,
            ExitInfo {
                code: -1,
                signal: 15
            }
        );

        // output cap
        let (o, c) = run_collect(
            &reaper,
            spec(&["/bin/sh", "-c", "head -c 17000000 /dev/zero"]),
        )
        .await
        .unwrap();
        assert_eq!(o.exit.code, 0);
        assert_eq!(c.stdout.len(), MAX_CAPTURE);

        // missing program is a typed error, not a hang
        let err = run_collect(&reaper, spec(&["/nonexistent/prog"]))
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Spawn { .. }), "{err:?}");
        let err = run_collect(&reaper, spec(&[])).await.unwrap_err();
        assert!(matches!(err, ExecError::EmptyArgv), "{err:?}");

        // many concurrent short children: every status reaches its waiter
        let futs = (0..20).map(|i| {
            let s = spec(&["/bin/sh", "-c", &format!("exit {i}")]);
            let r = reaper.clone();
            async move { run_collect(&r, s).await.map(|(o, _)| o.exit.code) }
        });
        let codes: Vec<i32> = futures::future::join_all(futs)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(codes, (0..20).collect::<Vec<_>>());

        // streaming consumer dropping its receiver kills the command
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let t0 = std::time::Instant::now();
        let o = run(&reaper, spec(&["/bin/sh", "-c", "yes"]), tx)
            .await
            .unwrap();
        assert_eq!(o.exit.signal, 9);
        assert!(t0.elapsed() < Duration::from_secs(5));

        // stdin streamed from a channel; its end is EOF
        let (in_tx, in_rx) = mpsc::channel(4);
        let (tx, mut rx) = mpsc::channel(16);
        in_tx.send(b"\x00\xffab".to_vec()).await.unwrap();
        drop(in_tx);
        let o = run_fed(&reaper, spec(&["/bin/cat"]), StdinFeed::Channel(in_rx), tx)
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(ExecEvent::Stdout(b)) = rx.recv().await {
            got.extend(b);
        }
        assert_eq!((o.exit.code, got.as_slice()), (0, &b"\x00\xffab"[..]));

        crate::session::tests::tty_session(&reaper, spec(&["/bin/sh"])).await;
        chrooted(&reaper).await;
        crate::workload::tests::host_root_workload_starts_once(&reaper).await;
    }

    /// A 64-bit little-endian ELF without a PT_INTERP program header.
    fn is_static_elf64(b: &[u8]) -> bool {
        let num = |off: usize, len: usize| -> Option<usize> {
            let mut v = 0usize;
            for (i, byte) in b.get(off..off + len)?.iter().enumerate() {
                v |= usize::from(*byte) << (8 * i);
            }
            Some(v)
        };
        if !b.starts_with(b"\x7fELF\x02\x01") {
            return false;
        }
        let (Some(phoff), Some(phentsize), Some(phnum)) =
            (num(0x20, 8), num(0x36, 2), num(0x38, 2))
        else {
            return false;
        };
        (0..phnum).all(|i| num(phoff + i * phentsize, 4).is_some_and(|t| t != 3))
    }

    /// A tiny root: a static busybox as /bin/sh, cat, ls, pwd and sleep, a script
    /// only the root has, a data file, and a symbolic link to a host path.
    fn busybox_root() -> Option<tempfile::TempDir> {
        let busybox = Path::new("/usr/bin/busybox");
        let bin = std::fs::read(busybox).ok()?;
        // A dynamic busybox would need the host's loader inside the root.
        if !is_static_elf64(&bin) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["bin", "srv"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
        for a in ["sh", "cat", "ls", "pwd", "sleep"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
        }
        let script = root.join("bin/only-in-image");
        std::fs::write(&script, "#!/bin/sh\necho inside $PWD\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("/usr/bin/busybox", root.join("bin/hostlink")).unwrap();
        std::fs::write(root.join("srv/data.txt"), "in the image\n").unwrap();
        Some(dir)
    }

    /// Exec with a chroot: programs come from the root's PATH, paths and
    /// the working directory are the root's, symbolic links resolve inside.
    async fn chrooted(reaper: &Reaper) {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping the chroot cases: not root");
            return;
        }
        let Some(dir) = busybox_root() else {
            eprintln!("skipping the chroot cases: no static /usr/bin/busybox");
            return;
        };
        let spec = |argv: &[&str], cwd: Option<&str>| ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: merge_env(&BTreeMap::new(), [("PATH".into(), "/bin".into())]),
            cwd: cwd.map(Into::into),
            chroot: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let run = |s| async move { run_collect(reaper, s).await };

        let (o, c) = run(spec(&["cat", "/srv/data.txt"], None)).await.unwrap();
        assert_eq!(
            (o.exit.code, c.stdout.as_slice()),
            (0, &b"in the image\n"[..])
        );
        let (_, c) = run(spec(&["ls", "/"], None)).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&c.stdout), "bin\nsrv\n");
        // PATH lookup inside the root; cwd absolute, relative, or "/".
        let (_, c) = run(spec(&["only-in-image"], Some("/srv"))).await.unwrap();
        assert_eq!(c.stdout, b"inside /srv\n");
        let (_, c) = run(spec(&["pwd"], Some("srv"))).await.unwrap();
        assert_eq!(c.stdout, b"/srv\n");
        let (_, c) = run(spec(&["pwd"], None)).await.unwrap();
        assert_eq!(c.stdout, b"/\n");
        // stdin and timeout as without a chroot.
        let mut s = spec(&["cat"], None);
        s.stdin = b"piped".to_vec();
        assert_eq!(run(s).await.unwrap().1.stdout, b"piped");
        let mut s = spec(&["sh", "-c", "sleep 30"], None);
        s.timeout = Some(Duration::from_millis(200));
        assert!(run(s).await.unwrap().0.timed_out);
        // Host paths do not exist in there, not even through a link.
        for argv in [&["/usr/bin/busybox"][..], &["hostlink"], &["/bin/hostlink"]] {
            let err = run(spec(argv, None)).await.unwrap_err();
            assert!(
                matches!(&err, ExecError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound),
                "{argv:?}: {err:?}"
            );
        }
        let err = run(spec(&["pwd"], Some("/nonexistent"))).await.unwrap_err();
        assert!(matches!(err, ExecError::Spawn { .. }), "{err:?}");
        let err = run(spec(&["pwd"], Some("a\0b"))).await.unwrap_err();
        assert!(
            matches!(&err, ExecError::Spawn { source, .. } if source.kind() == io::ErrorKind::InvalidInput),
            "{err:?}"
        );
    }

    #[test]
    fn env_merge_precedence() {
        let boot = BTreeMap::from([
            ("PATH".to_string(), "/x".to_string()),
            ("K".into(), "1".into()),
        ]);
        let env = merge_env(&boot, [("K".to_string(), "2".to_string())]);
        assert_eq!(env["PATH"], "/x");
        assert_eq!(env["K"], "2");
        assert_eq!(merge_env(&BTreeMap::new(), [])["PATH"], DEFAULT_PATH);
    }
}
