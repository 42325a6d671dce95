//! `GET /instances/{id}/exec` as a WebSocket: streaming, binary-safe exec
//! with stdin and an optional terminal, in hypeman's protocol (its
//! `cmd/api/api/exec.go` was read to match it) plus forkvm's channel mode.
//!
//! 1. The client's first message is text, a JSON [`ExecWsRequest`].
//! 2. Then, in **hypeman mode** (default), every client message (binary or
//!    text) is stdin, and every server binary message is output (stdout and
//!    stderr together, as a terminal would show them).
//!    In **channel mode** (`"channels": true`, forkvm) every binary message
//!    starts with a channel byte, as Kubernetes' `channel.k8s.io`: client →
//!    server `0` stdin, `4` resize (`{"rows":R,"cols":C}`), `255` close
//!    (payload `0`: EOF on stdin); server → client `1` stdout, `2` stderr.
//! 3. The last server message is text `{"exitCode":N}` (`-1` killed or timed
//!    out; `127` when the command could not be run, after the reason as
//!    output), then the server closes (a full close handshake: see
//!    `close_handshake`). A client that goes away ends the command.

use crate::error::ApiError;
use crate::routes::{ApiPath, AppState};
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use forkvm_core::{ExecSession, InstanceState, SessionInput, SessionOutput, SessionRequest};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use utoipa::ToSchema;

/// How long the client has to send its request after the upgrade.
const FIRST_MESSAGE: Duration = Duration::from_secs(30);

pub const CH_STDIN: u8 = 0;
pub const CH_STDOUT: u8 = 1;
pub const CH_STDERR: u8 = 2;
pub const CH_RESIZE: u8 = 4;
pub const CH_CLOSE: u8 = 255;

/// The first WebSocket message of an exec.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct ExecWsRequest {
    /// argv; default `["/bin/sh"]`.
    #[serde(default)]
    pub command: Vec<String>,
    /// Run on a pseudo-terminal.
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Seconds; 0 = the default (600).
    #[serde(default)]
    pub timeout: u32,
    /// hypeman: seconds to wait for the agent (forkvm's agent is up once the
    /// instance is Running; accepted and not needed).
    #[serde(default)]
    pub wait_for_agent: u32,
    /// forkvm: channel mode (see the module docs).
    #[serde(default)]
    pub channels: bool,
    /// forkvm: initial terminal size.
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
}

/// Interactive exec over WebSocket (hypeman's protocol).
///
/// Upgrade, then send an `ExecWsRequest` as the first (text) message; see
/// docs/exec.md for the framing. The plain JSON exec is `POST` on the same
/// path.
#[utoipa::path(get, path = "/instances/{id}/exec", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
              (status = 400, body = ErrorBody, description = "Not a WebSocket upgrade"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn exec_ws(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (id, ws) = upgrade_running(&m, &id, ws, "exec; POST runs a buffered exec").await?;
    Ok(ws.on_upgrade(move |socket| serve(m, id, socket)))
}

/// What a WebSocket endpoint of a Running instance checks before the
/// upgrade, each as a JSON error: the instance exists (404), runs (409),
/// and the request is an upgrade (400). Returns the instance's id.
pub(crate) async fn upgrade_running(
    m: &AppState,
    id: &str,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    what: &str,
) -> Result<(String, WebSocketUpgrade), ApiError> {
    let inst = m.get(id).await?;
    if inst.state != InstanceState::Running {
        return Err(ApiError::from(forkvm_core::CoreError::Conflict(format!(
            "instance {} is {}; {what} needs a Running instance",
            inst.name,
            inst.state.as_str()
        ))));
    }
    let ws =
        ws.map_err(|e| ApiError::invalid(format!("this is a WebSocket endpoint ({e}): {what}")))?;
    Ok((inst.id, ws))
}

async fn serve(m: AppState, id: String, mut ws: WebSocket) {
    let req = match first_request(&mut ws).await {
        Ok(r) => r,
        Err(msg) => {
            let body = serde_json::json!({ "error": msg }).to_string();
            let _ = ws.send(Message::Text(body.into())).await;
            let _ = ws.send(Message::Close(None)).await;
            close_handshake(&mut ws).await;
            return;
        }
    };
    let channels = req.channels;
    let session = m
        .exec_session(
            &id,
            SessionRequest {
                command: if req.command.is_empty() {
                    vec!["/bin/sh".into()]
                } else {
                    req.command
                },
                env: req.env,
                cwd: req.cwd,
                timeout_s: Some(req.timeout),
                tty: req.tty,
                rows: req.rows,
                cols: req.cols,
            },
        )
        .await;
    match session {
        Ok(s) => relay(&mut ws, s, channels).await,
        Err(e) => {
            let text = format!("Error: {e}\r\n").into_bytes();
            let _ = ws.send(output(channels, CH_STDERR, text)).await;
            let _ = ws.send(exit_message(127, false)).await;
        }
    }
    let _ = ws.send(Message::Close(None)).await;
    close_handshake(&mut ws).await;
}

/// Reads what the client still sends until its Close or EOF (at most
/// [`CLOSE_WAIT`]): a socket dropped with unread input (a stdin-close frame
/// in flight) is answered by the kernel with a reset, which can discard the
/// exit message on its way to the client.
async fn close_handshake(ws: &mut WebSocket) {
    let drain = async {
        while let Some(Ok(m)) = ws.recv().await {
            if matches!(m, Message::Close(_)) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
}

/// Longest the server waits for a client's side of the close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

async fn first_request(ws: &mut WebSocket) -> Result<ExecWsRequest, String> {
    match tokio::time::timeout(FIRST_MESSAGE, ws.recv()).await {
        Err(_) => Err(format!("no request within {FIRST_MESSAGE:?}")),
        Ok(None) | Ok(Some(Err(_))) => Err("connection closed before the request".into()),
        Ok(Some(Ok(Message::Text(t)))) => {
            serde_json::from_str(t.as_str()).map_err(|e| format!("invalid JSON: {e}"))
        }
        Ok(Some(Ok(_))) => Err("first message must be JSON text".into()),
    }
}

fn output(channels: bool, channel: u8, mut data: Vec<u8>) -> Message {
    if channels {
        data.insert(0, channel);
    }
    Message::Binary(data.into())
}

/// `timedOut` is forkvm's (hypeman clients read `exitCode` only).
fn exit_message(code: i32, timed_out: bool) -> Message {
    Message::Text(format!("{{\"exitCode\":{code},\"timedOut\":{timed_out}}}").into())
}

/// Client messages to the session and its output to the client, until the
/// command exits or the client leaves (dropping the session ends it).
async fn relay(ws: &mut WebSocket, mut session: ExecSession, channels: bool) {
    loop {
        tokio::select! {
            msg = ws.recv() => {
                let Some(Ok(msg)) = msg else { return };
                let Some(input) = client_input(msg, channels) else { continue };
                if !session.send(input).await {
                    // The command is gone; its exit is on its way.
                    continue;
                }
            }
            out = session.next() => match out {
                Some(Ok(SessionOutput::Stdout(b))) => {
                    if ws.send(output(channels, CH_STDOUT, b)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(SessionOutput::Stderr(b))) => {
                    if ws.send(output(channels, CH_STDERR, b)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(SessionOutput::Exit { code, timed_out, .. })) => {
                    let _ = ws.send(exit_message(code, timed_out)).await;
                    return;
                }
                Some(Err(e)) => {
                    let text = format!("Error: {e}\r\n").into_bytes();
                    let _ = ws.send(output(channels, CH_STDERR, text)).await;
                    let _ = ws.send(exit_message(127, false)).await;
                    return;
                }
                None => {
                    let _ = ws.send(exit_message(127, false)).await;
                    return;
                }
            },
        }
    }
}

/// One client message as session input (`None`: nothing to do).
pub(crate) fn client_input(msg: Message, channels: bool) -> Option<SessionInput> {
    let data: Vec<u8> = match msg {
        Message::Binary(b) => b.to_vec(),
        Message::Text(t) if !channels => t.as_str().as_bytes().to_vec(),
        _ => return None,
    };
    if !channels {
        return Some(SessionInput::Stdin(data));
    }
    let (&ch, rest) = data.split_first()?;
    match ch {
        CH_STDIN => Some(SessionInput::Stdin(rest.to_vec())),
        CH_CLOSE if rest.first() == Some(&CH_STDIN) => Some(SessionInput::CloseStdin),
        CH_RESIZE => {
            #[derive(Deserialize)]
            struct Size {
                rows: u16,
                cols: u16,
            }
            let s: Size = serde_json::from_slice(rest).ok()?;
            Some(SessionInput::Resize {
                rows: s.rows,
                cols: s.cols,
            })
        }
        _ => None,
    }
}

use crate::wire::ErrorBody;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_frames_map_to_input_and_output() {
        let bin = |v: &[u8]| Message::Binary(v.to_vec().into());
        assert_eq!(
            client_input(bin(&[0, 0xff, 0x00]), true),
            Some(SessionInput::Stdin(vec![0xff, 0x00]))
        );
        assert_eq!(
            client_input(bin(&[255, 0]), true),
            Some(SessionInput::CloseStdin)
        );
        assert_eq!(
            client_input(bin(b"\x04{\"rows\":40,\"cols\":100}"), true),
            Some(SessionInput::Resize {
                rows: 40,
                cols: 100
            })
        );
        assert_eq!(client_input(bin(&[9, 1]), true), None);
        assert_eq!(client_input(Message::Text("ls\n".into()), true), None);
        // hypeman mode: everything is stdin, bytes untouched.
        assert_eq!(
            client_input(bin(&[0, 1, 2]), false),
            Some(SessionInput::Stdin(vec![0, 1, 2]))
        );
        assert_eq!(
            client_input(Message::Text("ls\n".into()), false),
            Some(SessionInput::Stdin(b"ls\n".to_vec()))
        );
        let Message::Binary(b) = output(true, CH_STDERR, vec![7]) else {
            panic!()
        };
        assert_eq!(&b[..], &[2, 7]);
    }
}
