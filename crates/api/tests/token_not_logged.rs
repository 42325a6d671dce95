//! The API token never reaches the logs: every request through the TCP
//! router (accepted, refused, a WebSocket upgrade attempt) traced at TRACE
//! level with every span and event captured, and the token searched for.

use axum::body::Body;
use axum::http::{Method, Request, header};
use forkvm_api::tcp_router;
use forkvm_core::{Config, Manager};
use std::io::Write;
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

const TOKEN: &str = "never-logged-0123456789abcdef-TOKEN";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_token_is_never_logged() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().expect("tempdir");
    let manager = Manager::open(Config::new(
        dir.path().join("data"),
        dir.path().join("mem"),
        "fvt-none",
        "10.250.0.0/24",
        "qemu-system-x86_64",
    ))
    .await
    .expect("open manager");
    let app = tcp_router(manager, TOKEN).expect("router");
    let wrong = format!("Bearer {TOKEN}x");
    let right = format!("Bearer {TOKEN}");
    for (method, path, auth) in [
        (Method::GET, "/instances", right.as_str()),
        (Method::GET, "/instances", wrong.as_str()),
        (Method::POST, "/instances", right.as_str()),
        (Method::GET, "/instances/nope/exec", right.as_str()),
        (Method::GET, "/nope", wrong.as_str()),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, auth)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{not json"))
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("response");
        let _ = axum::body::to_bytes(resp.into_body(), 1 << 20).await;
    }
    let logs = String::from_utf8_lossy(&captured.0.lock().expect("lock")).into_owned();
    assert!(
        logs.contains("/instances"),
        "the capture saw no request: {logs}"
    );
    assert!(!logs.contains("TOKEN"), "the token was logged:\n{logs}");
    assert!(
        !logs.contains("Bearer"),
        "an Authorization header was logged:\n{logs}"
    );
}
