//! Interactive exec on a pseudo-terminal (`ExecSession` with `tty`): the
//! command gets a new session with the terminal's slave side as its
//! controlling terminal and stdio; the agent holds the master side, writes
//! the caller's input to it, reads the output from it and applies resizes.
//! Without a terminal, sessions run through [`exec::run_fed`] instead.
//!
//! Output, the exit and the caller's departure are handled as in
//! [`exec::run`]: the process group is killed when the caller goes away or
//! the timeout passes, and output still open [`exec::DRAIN_GRACE`] after the
//! exit is not waited for.

use crate::exec::{self, ExecError, ExecEvent, ExecOutcome, ExecSpec, Reaper};
use nix::errno::Errno;
use nix::pty::{OpenptyResult, Winsize, openpty};
use nix::unistd::Pid;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

/// What the caller sends to a running terminal session.
#[derive(Debug)]
pub enum TtyInput {
    Stdin(Vec<u8>),
    Resize { rows: u16, cols: u16 },
}

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_size(master: &OwnedFd, rows: u16, cols: u16) {
    let ws = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which
    // points at a live, properly laid out Winsize (nix's is repr(C) libc's).
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r != 0 {
        debug!(error = %Errno::last(), "TIOCSWINSZ failed");
    }
}

/// The command on the slave side of a new terminal, in a session of its own.
fn spawn(
    reaper: &Reaper,
    spec: &ExecSpec,
    size: (u16, u16),
) -> Result<(OwnedFd, Pid, tokio::sync::oneshot::Receiver<exec::ExitInfo>), ExecError> {
    let program = spec.argv.first().ok_or(ExecError::EmptyArgv)?.clone();
    let spawn_err = |source| ExecError::Spawn {
        program: program.clone(),
        source,
    };
    let ws = (size.0 > 0 && size.1 > 0).then(|| winsize(size.0, size.1));
    let OpenptyResult { master, slave } =
        openpty(ws.as_ref(), None).map_err(|e| spawn_err(e.into()))?;
    let stdio = || slave.try_clone().map(Stdio::from).map_err(spawn_err);
    let mut cmd = Command::new(&program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(&spec.env)
        .stdin(stdio()?)
        .stdout(stdio()?)
        .stderr(stdio()?);
    // SAFETY: runs in the forked child before exec; setsid and ioctl are
    // async-signal-safe system calls and nothing is allocated. The new
    // session makes the child its process group's leader (so the group can
    // be killed as with pipes) and fd 0, the slave, its controlling terminal.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    match &spec.chroot {
        Some(root) => exec::chroot_into(&mut cmd, root, spec.cwd.as_deref().unwrap_or("/"))
            .map_err(spawn_err)?,
        None => {
            if let Some(cwd) = &spec.cwd {
                cmd.current_dir(cwd);
            }
        }
    }
    let (child, exit_rx) = reaper.spawn(&mut cmd).map_err(spawn_err)?;
    // The child has its copies; ours would keep the terminal open after it exits.
    drop(cmd);
    drop(slave);
    Ok((master, Pid::from_raw(child.id() as i32), exit_rx))
}

/// Runs `spec` on a new terminal of `size` (rows, cols) until it exits.
pub async fn run_tty(
    reaper: &Reaper,
    spec: ExecSpec,
    size: (u16, u16),
    mut input: mpsc::Receiver<TtyInput>,
    out: mpsc::Sender<ExecEvent>,
) -> Result<ExecOutcome, ExecError> {
    let (master, pid, exit_rx) = spawn(reaper, &spec, size)?;
    nix::fcntl::fcntl(
        &master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| ExecError::Pipe(e.into()))?;
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and
    // refers to the same terminal until the AsyncFd is dropped.
    let master =
        unsafe { AsyncFd::register(master) }.map_err(|e| ExecError::Pipe(e.into_parts().1))?;
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut exit_rx = Some(exit_rx);
    let (mut exit, mut timed_out, mut open) = (None, false, true);
    let mut drain_until: Option<Instant> = None;
    let mut buf = vec![0u8; 32 << 10];
    loop {
        if exit.is_some() && !open {
            break;
        }
        let timeout_at = deadline.filter(|_| !timed_out && exit.is_none());
        tokio::select! {
            r = master.readable(), if open => {
                let mut guard = r.map_err(ExecError::Pipe)?;
                match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(Into::into)) {
                    Ok(Ok(0)) | Ok(Err(_)) => open = false, // EIO: every slave fd is closed
                    Ok(Ok(n)) => {
                        if out.send(ExecEvent::Stdout(buf[..n].to_vec())).await.is_err() {
                            exec::kill_group(pid);
                        }
                    }
                    Err(_would_block) => {}
                }
            }
            msg = input.recv(), if exit.is_none() => match msg {
                Some(TtyInput::Stdin(data)) => write_all(&master, &data).await,
                Some(TtyInput::Resize { rows, cols }) => set_size(master.get_ref(), rows, cols),
                None => exec::kill_group(pid), // the caller went away
            },
            st = async { exit_rx.as_mut().expect("guarded").await }, if exit_rx.is_some() => {
                exit_rx = None;
                exit = Some(st.map_err(|_| ExecError::StatusLost)?);
                drain_until = Some(Instant::now() + exec::DRAIN_GRACE);
            }
            _ = tokio::time::sleep_until(timeout_at.unwrap_or_else(Instant::now)), if timeout_at.is_some() => {
                timed_out = true;
                exec::kill_group(pid);
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or_else(Instant::now)), if drain_until.is_some() => break,
        }
    }
    let exit = exit.ok_or(ExecError::StatusLost)?;
    Ok(ExecOutcome { exit, timed_out })
}

/// Writes all of `data` to the terminal (a full terminal buffer waits).
async fn write_all(master: &AsyncFd<OwnedFd>, mut data: &[u8]) {
    while !data.is_empty() {
        let Ok(mut guard) = master.writable().await else {
            return;
        };
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(Into::into)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => {
                debug!(error = %e, "terminal write failed");
                return;
            }
            Err(_would_block) => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Run from `exec`'s test, which owns the process-wide reaper.
    pub(crate) async fn tty_session(reaper: &Reaper, sh: ExecSpec) {
        let (in_tx, in_rx) = mpsc::channel(4);
        let (tx, mut rx) = mpsc::channel(16);
        in_tx
            .send(TtyInput::Resize { rows: 31, cols: 97 })
            .await
            .unwrap();
        in_tx
            .send(TtyInput::Stdin(b"tty; stty size; exit 4\n".to_vec()))
            .await
            .unwrap();
        let collect = async move {
            let mut out = Vec::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    ExecEvent::Stdout(b) => out.extend(b),
                    ExecEvent::Stderr(_) => panic!("a terminal has one output stream"),
                }
            }
            out
        };
        let (o, out) = tokio::join!(run_tty(reaper, sh, (24, 80), in_rx, tx), collect);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(o.unwrap().exit.code, 4, "{text}");
        assert!(text.contains("/dev/pts/"), "{text}");
        assert!(text.contains("31 97"), "{text}");
        drop(in_tx);
    }
}
