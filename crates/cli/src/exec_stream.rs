//! `forkvm exec` over the WebSocket exec (`GET /instances/{id}/exec`, channel
//! mode): output as it is produced and byte for byte, stdin streamed with
//! `-i`, a terminal with `-t` (local terminal in raw mode, its size sent at
//! the start and on every SIGWINCH).

use crate::client::Client;
use crate::commands::{EXIT_TIMED_OUT, ExecArgs, exit_byte};
use anyhow::{Context, Result, bail};
use forkvm_api::exec_ws::{CH_CLOSE, CH_RESIZE, CH_STDERR, CH_STDIN, CH_STDOUT};
use futures::{SinkExt, StreamExt};
use std::io::Write;
use std::os::fd::AsFd;
use std::process::ExitCode;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// The local terminal's size, if stdout is one.
fn term_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` into the live local.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Puts stdin's terminal in raw mode until dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Self(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}

fn framed(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// Local stdin as channel frames, then the close of stdin.
fn pump_stdin(tx: mpsc::Sender<Message>) {
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(framed(CH_STDIN, &buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(framed(CH_CLOSE, &[CH_STDIN])).await;
    });
}

/// Terminal resizes as channel frames.
fn pump_resizes(tx: mpsc::Sender<Message>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut winch = signal(SignalKind::window_change()).context("SIGWINCH handler")?;
    tokio::spawn(async move {
        while winch.recv().await.is_some() {
            if let Some((rows, cols)) = term_size() {
                let size = format!("{{\"rows\":{rows},\"cols\":{cols}}}");
                if tx.send(framed(CH_RESIZE, size.as_bytes())).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(())
}

pub(crate) type Ws = tokio_tungstenite::WebSocketStream<Box<dyn crate::client::Io>>;

/// A WebSocket to `path` on the daemon; an error answer before the upgrade
/// comes back as the API's error.
pub(crate) async fn connect(c: &Client, path: &str) -> Result<Ws> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stream = c.connect().await?;
    let mut req = format!("{}{path}", c.ws_base()).into_client_request()?;
    for (k, v) in c.headers() {
        req.headers_mut().insert(k, v.parse()?);
    }
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                let body = resp.body().as_deref().unwrap_or_default();
                crate::client::api_error(resp.status(), body).into()
            }
            e => anyhow::anyhow!("{path}: {e}"),
        })?;
    Ok(ws)
}

pub async fn exec(c: &Client, a: &ExecArgs) -> Result<ExitCode> {
    let path = format!("/instances/{}/exec", crate::client::seg(&a.id));
    let (mut sink, mut source) = connect(c, &path).await?.split();
    let size = a.tty.then(term_size).flatten().unwrap_or((0, 0));
    let req = serde_json::json!({
        "command": a.command, "tty": a.tty, "channels": true,
        "env": a.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "timeout": a.timeout.unwrap_or(0), "rows": size.0, "cols": size.1,
    });
    sink.send(Message::Text(req.to_string().into())).await?;
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    if a.stdin {
        pump_stdin(tx.clone());
    } else {
        tx.send(framed(CH_CLOSE, &[CH_STDIN])).await?;
    }
    let _raw = if a.tty {
        pump_resizes(tx.clone())?;
        a.stdin.then(RawMode::enter).flatten()
    } else {
        None
    };
    drop(tx);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
    });
    while let Some(msg) = source.next().await {
        match msg.context("reading the exec stream")? {
            Message::Binary(b) => write_output(&b)?,
            Message::Text(t) => return finish(t.as_str()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    bail!("the daemon closed the exec without an exit code")
}

fn write_output(frame: &[u8]) -> Result<()> {
    let Some((&ch, data)) = frame.split_first() else {
        return Ok(());
    };
    match ch {
        CH_STDOUT => {
            let mut out = std::io::stdout().lock();
            out.write_all(data)?;
            out.flush()?;
        }
        CH_STDERR => std::io::stderr().write_all(data)?,
        _ => {}
    }
    Ok(())
}

/// The final text message: the exit code (or why there is none).
fn finish(text: &str) -> Result<ExitCode> {
    let v: serde_json::Value = serde_json::from_str(text).context("exit message")?;
    if let Some(e) = v["error"].as_str() {
        bail!("exec: {e}");
    }
    if v["timedOut"].as_bool() == Some(true) {
        eprintln!("error: command timed out");
        return Ok(ExitCode::from(EXIT_TIMED_OUT));
    }
    let code = v["exitCode"]
        .as_i64()
        .context("exit message without exitCode")?;
    Ok(ExitCode::from(exit_byte(i32::try_from(code).unwrap_or(1))))
}
