//! Interactive exec (`GET /instances/{id}/exec` over WebSocket): a command
//! in a Running guest with its input streamed in and its output streamed
//! out as it is produced, binary-safe, optionally on a terminal. Built on
//! the agent's `ExecSession`; it takes one of the instance's exec slots for
//! as long as it runs, and is never re-sent (the command may have started).

use crate::agent::ExecOutputStream;
use crate::error::{CoreError, Result};
use crate::guest::{DEFAULT_EXEC_TIMEOUT_S, OwnedExecSlot, exec_message, require_running};
use crate::model::ExecRequest;
use crate::services::Services;
use forkvm_proto::agent as pb;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long connecting to the agent may take.
const CONNECT: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct SessionRequest {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Working directory (in the image's root for an OCI instance).
    pub cwd: Option<String>,
    /// Killed after this long (default 600 s; 0 = the default).
    pub timeout_s: Option<u32>,
    /// On a pseudo-terminal: stdout and stderr are then one stream.
    pub tty: bool,
    /// Initial terminal size (0 = the kernel's default).
    pub rows: u16,
    pub cols: u16,
}

/// What the caller sends while the command runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionInput {
    Stdin(Vec<u8>),
    /// EOF on stdin (no effect on a terminal).
    CloseStdin,
    Resize {
        rows: u16,
        cols: u16,
    },
}

/// What comes back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last message: `code` is -1 when killed by `signal` or timed out.
    Exit {
        code: i32,
        signal: i32,
        timed_out: bool,
    },
}

/// A running session; dropping it ends the command.
pub struct ExecSession {
    input: mpsc::Sender<pb::ExecInput>,
    output: ExecOutputStream,
    _slot: OwnedExecSlot,
}

impl ExecSession {
    /// Sends input; false once the command is gone.
    pub async fn send(&mut self, input: SessionInput) -> bool {
        use pb::exec_input::Kind;
        let kind = match input {
            SessionInput::Stdin(b) => Kind::Stdin(b),
            SessionInput::CloseStdin => Kind::StdinClose(true),
            SessionInput::Resize { rows, cols } => Kind::Resize(pb::WindowSize {
                rows: rows.into(),
                cols: cols.into(),
            }),
        };
        self.input
            .send(pb::ExecInput { kind: Some(kind) })
            .await
            .is_ok()
    }

    /// The next output; `None` after the exit (or if the agent went away
    /// without one: an error first).
    pub async fn next(&mut self) -> Option<Result<SessionOutput>> {
        use pb::exec_output::Kind;
        let msg = match self.output.next().await? {
            Ok(m) => m,
            Err(e) => return Some(Err(e.into())),
        };
        Some(Ok(match msg.kind {
            Some(Kind::Stdout(b)) => SessionOutput::Stdout(b),
            Some(Kind::Stderr(b)) => SessionOutput::Stderr(b),
            Some(Kind::Exit(e)) => SessionOutput::Exit {
                code: e.exit_code,
                signal: e.signal,
                timed_out: e.timed_out,
            },
            None => SessionOutput::Stdout(Vec::new()),
        }))
    }
}

pub(crate) async fn start(
    svc: &Arc<Services>,
    id_or_name: &str,
    req: SessionRequest,
) -> Result<ExecSession> {
    let inst = svc.find(id_or_name)?;
    require_running(&inst, "exec needs a Running instance")?;
    if req.command.first().is_none_or(|p| p.is_empty()) {
        return Err(CoreError::Invalid("command must name a program".into()));
    }
    let slot = OwnedExecSlot::claim(svc, &inst)?;
    let timeout_s = req
        .timeout_s
        .filter(|t| *t > 0)
        .unwrap_or(DEFAULT_EXEC_TIMEOUT_S);
    let mut request = exec_message(
        &inst,
        ExecRequest {
            command: req.command,
            env: req.env,
            stdin: None,
            timeout_s: Some(timeout_s),
        },
        timeout_s,
    );
    request.cwd = req.cwd.unwrap_or_default();
    let start = pb::ExecInput {
        kind: Some(pb::exec_input::Kind::Start(pb::ExecStart {
            request: Some(request),
            tty: req.tty,
            size: Some(pb::WindowSize {
                rows: req.rows.into(),
                cols: req.cols.into(),
            }),
        })),
    };
    let (tx, rx) = mpsc::channel(16);
    // Room for one message: this cannot fail.
    let _ = tx.try_send(start);
    let output = svc
        .agent
        .exec_session(&inst.id, &svc.paths(&inst).agent_socket, rx, CONNECT)
        .await?;
    Ok(ExecSession {
        input: tx,
        output,
        _slot: slot,
    })
}
