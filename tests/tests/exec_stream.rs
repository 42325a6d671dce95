//! Streaming exec over the WebSocket (`GET /instances/{id}/exec`): bytes in
//! and out exactly, stdout and stderr apart, stdin to EOF, a terminal with
//! resize, hypeman's plain framing, and `forkvm exec -i` on top of it. Real
//! guests, the real agent's `ExecSession`.

use anyhow::{Context, Result, bail, ensure};
use forkvm_e2e::{TestEnv, forkvm_bin, s};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>;

/// An exec WebSocket on the daemon's socket, its request sent.
async fn open(env: &TestEnv, id: &str, req: Value) -> Result<Ws> {
    let stream = tokio::net::UnixStream::connect(&env.socket).await?;
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://localhost/instances/{id}/exec"), stream)
            .await
            .context("WebSocket upgrade")?;
    ws.send(Message::Text(req.to_string().into())).await?;
    Ok(ws)
}

fn frame(ch: u8, data: &[u8]) -> Message {
    let mut v = vec![ch];
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// Everything until the exit message: (channel → bytes, exit JSON).
async fn collect(ws: &mut Ws, channels: bool) -> Result<([Vec<u8>; 3], Value)> {
    let mut out: [Vec<u8>; 3] = Default::default();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .context("no message within 60 s")?
            .context("stream ended without an exit")??;
        match msg {
            Message::Binary(b) if channels => {
                let (&ch, data) = b.split_first().context("empty frame")?;
                out[usize::from(ch).min(2)].extend_from_slice(data);
            }
            Message::Binary(b) => out[1].extend_from_slice(&b),
            Message::Text(t) => return Ok((out, serde_json::from_str(t.as_str())?)),
            Message::Close(_) => bail!("closed without an exit"),
            _ => {}
        }
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    // Make sure the awkward bytes are there whatever the draw.
    v[..4].copy_from_slice(&[0x00, 0xff, 0xfe, b'\n']);
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_data_round_trips_and_streams_stay_apart() -> Result<()> {
    let env = TestEnv::start().await?;
    let id = s(&env.create(json!({"name": "ws"})).await?, "id");

    // 2 MiB of random bytes through cat, then EOF.
    let data = random_bytes(2 << 20);
    let mut ws = open(&env, &id, json!({"command": ["cat"], "channels": true})).await?;
    for chunk in data.chunks(60_000) {
        ws.send(frame(0, chunk)).await?;
    }
    ws.send(frame(255, &[0])).await?;
    let (out, exit) = collect(&mut ws, true).await?;
    ensure!(exit["exitCode"] == 0, "{exit}");
    ensure!(
        out[1].len() == data.len(),
        "{} of {} bytes back",
        out[1].len(),
        data.len()
    );
    ensure!(out[1] == data, "cat changed the bytes");

    let mut ws = open(
        &env,
        &id,
        json!({"command": ["sh", "-c", "printf '\\377\\376\\000A'; echo oops >&2; exit 3"],
               "channels": true}),
    )
    .await?;
    ws.send(frame(255, &[0])).await?;
    let (out, exit) = collect(&mut ws, true).await?;
    ensure!(out[1] == b"\xff\xfe\x00A", "stdout {:?}", out[1]);
    ensure!(out[2] == b"oops\n", "stderr {:?}", out[2]);
    ensure!(exit["exitCode"] == 3, "{exit}");

    // The buffered JSON exec carries any bytes with `encoding: base64`.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let data = random_bytes(64 << 10);
    let (st, r) = env
        .request(
            "POST",
            &format!("/instances/{id}/exec"),
            Some(
                json!({"command": ["sh", "-c", "cat; printf '\\377\\000' >&2"],
                        "stdin": b64.encode(&data), "encoding": "base64"}),
            ),
        )
        .await?;
    ensure!(st == 200 && r["encoding"] == "base64", "{st} {r}");
    ensure!(b64.decode(s(&r, "stdout"))? == data, "stdout changed");
    ensure!(b64.decode(s(&r, "stderr"))? == b"\xff\x00", "stderr {r}");
    let (st, r) = env
        .request(
            "POST",
            &format!("/instances/{id}/exec"),
            Some(json!({"command": ["cat"], "stdin": "not base64!", "encoding": "base64"})),
        )
        .await?;
    ensure!(st == 400, "{st} {r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shell_on_a_terminal_runs_commands_resizes_and_reports_its_exit() -> Result<()> {
    let env = TestEnv::start().await?;
    let id = s(&env.create(json!({"name": "tty"})).await?, "id");
    let mut ws = open(
        &env,
        &id,
        json!({"command": ["/bin/sh"], "tty": true, "channels": true, "rows": 24, "cols": 80}),
    )
    .await?;
    ws.send(frame(4, br#"{"rows":33,"cols":101}"#)).await?;
    ws.send(frame(0, b"tty; stty size; echo sum-$((6*7)); exit 5\n"))
        .await?;
    let (out, exit) = collect(&mut ws, true).await?;
    let text = String::from_utf8_lossy(&out[1]);
    ensure!(exit["exitCode"] == 5, "{exit} after {text}");
    ensure!(text.contains("sum-42"), "{text}");
    ensure!(text.contains("/dev/pts/"), "not on a terminal: {text}");
    ensure!(text.contains("33 101"), "resize not applied: {text}");
    ensure!(out[2].is_empty(), "a terminal has one output stream");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hypemans_plain_framing_and_the_cli_work() -> Result<()> {
    let env = TestEnv::start().await?;
    let id = s(&env.create(json!({"name": "plain"})).await?, "id");
    // hypeman mode: text or binary messages are stdin, binary output.
    let mut ws = open(
        &env,
        &id,
        json!({"command": ["sh", "-c", "read x; echo got-$x"]}),
    )
    .await?;
    ws.send(Message::Text("hello\n".into())).await?;
    let (out, exit) = collect(&mut ws, false).await?;
    ensure!(
        out[1] == b"got-hello\n",
        "{:?}",
        String::from_utf8_lossy(&out[1])
    );
    ensure!(exit["exitCode"] == 0, "{exit}");

    // forkvm exec -i: binary stdin through cat, byte for byte.
    let data = random_bytes(256 << 10);
    let mut child = Command::new(forkvm_bin())
        .arg("--socket")
        .arg(&env.socket)
        .args(["exec", "-i", "plain", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let feed = data.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&feed));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(out.status.success(), "{:?}", out.status);
    ensure!(
        out.stdout == data,
        "{} of {} bytes back",
        out.stdout.len(),
        data.len()
    );

    // A stopped instance: 409 before any upgrade, as JSON.
    let (st, _) = env
        .request("POST", &format!("/instances/{id}/stop"), None)
        .await?;
    ensure!(st == 200);
    let stream = tokio::net::UnixStream::connect(&env.socket).await?;
    match tokio_tungstenite::client_async(format!("ws://localhost/instances/{id}/exec"), stream)
        .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            ensure!(resp.status() == 409, "{:?}", resp.status())
        }
        other => bail!("upgrade on a stopped instance: {other:?}"),
    }
    Ok(())
}
