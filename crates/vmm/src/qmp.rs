//! A small async QMP client over a unix socket.
//!
//! Hand-rolled because QMP is line-delimited JSON with three message kinds
//! (greeting, response, event); the crates that exist drag in a different
//! runtime model or are unmaintained.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, timeout, timeout_at};

use crate::error::VmmError;

/// Events kept for [`QmpClient::take_events`]; older ones are dropped so a
/// chatty guest can't grow the client without bound.
const MAX_EVENTS: usize = 256;

/// Default bound on a single command round trip.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A negotiated QMP session (greeting read, `qmp_capabilities` done).
#[derive(Debug)]
pub struct QmpClient {
    socket: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    events: VecDeque<Value>,
    command_timeout: Duration,
    greeting: Value,
}

impl QmpClient {
    /// Connects to `socket`, retrying while it does not exist or refuses
    /// (QEMU may still be setting up) until `deadline` elapses, then
    /// reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(socket: &Path, deadline: Duration) -> Result<Self, VmmError> {
        let until = Instant::now() + deadline;
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < until =>
                {
                    // The socket file appears during QEMU start-up; nothing to
                    // wait on but the path, so retry briefly.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(VmmError::io("connect", socket, e)),
            }
        };
        let (r, w) = stream.into_split();
        let mut c = QmpClient {
            socket: socket.to_path_buf(),
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
            events: VecDeque::new(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            greeting: Value::Null,
        };
        // QEMU serves one QMP client at a time: a second client sits in the
        // backlog without a greeting, so the greeting wait must be bounded.
        let greeting = match timeout_at(
            until.max(Instant::now() + Duration::from_secs(1)),
            c.read_message(),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => {
                return Err(VmmError::Timeout {
                    what: format!(
                        "QMP greeting on {} (another client connected?)",
                        socket.display()
                    ),
                    timeout: deadline,
                });
            }
        };
        if greeting.get("QMP").is_none() {
            return Err(c.protocol(format!("expected greeting, got {greeting}")));
        }
        c.greeting = greeting;
        c.execute("qmp_capabilities", None).await?;
        tracing::debug!(socket = %socket.display(), "qmp connected");
        Ok(c)
    }

    /// The greeting QEMU sent (contains its version).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Changes the bound on each later command round trip.
    pub fn set_command_timeout(&mut self, t: Duration) {
        self.command_timeout = t;
    }

    /// Runs `command` with optional `arguments` and returns its `return` value.
    /// Events arriving meanwhile are queued for [`take_events`](Self::take_events).
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        self.execute_inner(command, arguments, None).await
    }

    /// Like [`execute`](Self::execute), passing `fd` along as SCM_RIGHTS
    /// (for `getfd` / `add-fd`).
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, VmmError> {
        self.execute_inner(command, arguments, Some(fd)).await
    }

    async fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, VmmError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let t = self.command_timeout;
        let fut = async {
            let mut sent = 0;
            if let Some(fd) = fd {
                sent = self
                    .send_with_fd(line.as_bytes(), fd)
                    .await
                    .map_err(|e| VmmError::io("sendmsg qmp", &self.socket, e))?;
            }
            self.writer
                .write_all(&line.as_bytes()[sent..])
                .await
                .map_err(|e| VmmError::io("write qmp", &self.socket, e))?;
            loop {
                let m = self.read_message().await?;
                if m.get("event").is_some() {
                    if self.events.len() == MAX_EVENTS {
                        self.events.pop_front();
                    }
                    self.events.push_back(m);
                    continue;
                }
                if m.get("id").and_then(Value::as_u64) != Some(id) {
                    // A reply to a command of an earlier, timed-out call.
                    tracing::debug!(socket = %self.socket.display(), reply = %m, "dropping stale qmp reply");
                    continue;
                }
                if let Some(r) = m.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = m.get("error") {
                    return Err(VmmError::QmpCommand {
                        command: command.to_string(),
                        class: e
                            .get("class")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                            .to_string(),
                        desc: e
                            .get("desc")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                            .to_string(),
                    });
                }
                return Err(self.protocol(format!("unexpected message {m}")));
            }
        };
        match timeout(t, fut).await {
            Ok(r) => r,
            Err(_) => Err(VmmError::Timeout {
                what: format!("QMP {command} on {}", self.socket.display()),
                timeout: t,
            }),
        }
    }

    /// Sends (a prefix of) `buf` with `fd` attached; returns the bytes sent.
    async fn send_with_fd(&self, buf: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<usize> {
        let stream: &UnixStream = self.writer.as_ref();
        let raw = [fd.as_raw_fd()];
        loop {
            stream.writable().await?;
            let r = stream.try_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(buf)];
                let cmsg = [ControlMessage::ScmRights(&raw)];
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &iov,
                    &cmsg,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match r {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Drains the events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .await
                .map_err(|e| VmmError::io("read qmp", &self.socket, e))?;
            if n == 0 {
                return Err(self.protocol("connection closed by QEMU".into()));
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(line.trim())
                .map_err(|e| self.protocol(format!("bad json {line:?}: {e}")));
        }
    }

    fn protocol(&self, reason: String) -> VmmError {
        VmmError::QmpProtocol {
            socket: self.socket.clone(),
            reason,
        }
    }
}
