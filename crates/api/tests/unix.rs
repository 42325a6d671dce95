//! The unix-socket listener: stale-socket handling, file mode, a real HTTP
//! round trip, and graceful shutdown removing the socket.

use forkvm_api::{ServeError, bind_unix, serve_unix_listener};
use forkvm_core::{Config, Manager};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn http_get(path: &std::path::Path, uri: &str) -> String {
    let mut s = UnixStream::connect(path).await.expect("connect");
    s.write_all(format!("GET {uri} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn serve_on_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/sub/forkvm.sock");
    let m = Manager::open(Config::new(
        dir.path().join("data"),
        dir.path().join("mem"),
        "fvt-none",
        "10.250.0.0/24",
        "qemu-system-x86_64",
    ))
    .await
    .unwrap();

    // A stale socket (nobody listening) is replaced; parents are created.
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(
        std::fs::symlink_metadata(&sock)
            .unwrap()
            .file_type()
            .is_socket()
    );

    let listener = bind_unix(&sock).await.expect("bind over stale socket");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let sock2 = sock.clone();
    let server = tokio::spawn(async move {
        serve_unix_listener(listener, &sock2, m, async {
            let _ = rx.await;
        })
        .await
    });

    let resp = http_get(&sock, "/health").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(r#""status":"ok""#), "{resp}");
    let resp = http_get(&sock, "/instances/ghost").await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    assert!(resp.contains(r#""code":"not_found""#), "{resp}");

    // A second daemon must not steal a live socket.
    match bind_unix(&sock).await {
        Err(ServeError::SocketInUse { .. }) => {}
        other => panic!("expected SocketInUse, got {other:?}"),
    }

    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("graceful shutdown within 10 s")
        .unwrap()
        .unwrap();
    assert!(!sock.exists(), "socket removed on shutdown");

    // Never delete something that is not a socket.
    std::fs::write(&sock, b"precious").unwrap();
    match bind_unix(&sock).await {
        Err(ServeError::NotASocket { .. }) => {}
        other => panic!("expected NotASocket, got {other:?}"),
    }
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
}
