//! Listeners: a unix socket without authentication (access is the socket's
//! file mode) and TCP with a bearer token, over TLS (`crate::tls`) or, on a
//! loopback address only, plain HTTP. All shut down gracefully when the
//! future they are given completes.

use crate::error::ApiError;
use crate::routes::router;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use forkvm_core::Manager;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, UnixListener, UnixStream};

/// Errors of the listeners.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("creating socket directory {path}: {source}")]
    SocketDir { path: PathBuf, source: io::Error },
    #[error("{path} exists and is not a socket; refusing to remove it")]
    NotASocket { path: PathBuf },
    #[error("another forkvm daemon is listening on {path}")]
    SocketInUse { path: PathBuf },
    #[error("removing stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("binding {what}: {source}")]
    Bind { what: String, source: io::Error },
    #[error("setting permissions on {path}: {source}")]
    Chmod { path: PathBuf, source: io::Error },
    #[error("an API token is required for the TCP listener")]
    EmptyToken,
    #[error(
        "the API token is {len} characters long; the TCP listener needs at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32`)"
    )]
    ShortToken { len: usize },
    #[error(
        "refusing plain HTTP on {addr}: it is not a loopback address; give --tls-cert and --tls-key (PEM) to serve TLS"
    )]
    PlainNotLoopback { addr: SocketAddr },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("serving {what}: {source}")]
    Serve { what: String, source: io::Error },
}

/// The shortest API token the TCP listener accepts (characters).
pub const MIN_TOKEN_LEN: usize = 32;

/// Refuse an empty or short token (before anything listens).
pub fn check_token(token: &str) -> Result<(), ServeError> {
    let len = token.chars().count();
    match len {
        0 => Err(ServeError::EmptyToken),
        n if n < MIN_TOKEN_LEN => Err(ServeError::ShortToken { len }),
        _ => Ok(()),
    }
}

/// The token's SHA-256: requests are compared digest to digest, so the
/// comparison is constant-time whatever length a client sends.
#[derive(Clone)]
struct Token([u8; 32]);

/// The router behind bearer-token authentication; `/health` stays open so
/// load balancers can probe it.
pub fn tcp_router(manager: Arc<Manager>, token: &str) -> Result<Router, ServeError> {
    check_token(token)?;
    let token = Token(Sha256::digest(token.as_bytes()).into());
    Ok(router(manager).layer(middleware::from_fn_with_state(token, require_bearer)))
}

async fn require_bearer(State(token): State<Token>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented.is_some_and(|p| {
        let digest: [u8; 32] = Sha256::digest(p.as_bytes()).into();
        bool::from(digest.ct_eq(&token.0))
    });
    if ok {
        next.run(req).await
    } else {
        tracing::info!(path = %req.uri().path(), "rejected request without a valid bearer token");
        let mut resp = ApiError::unauthorized().into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        resp
    }
}

/// Bind the unix socket: create the parent directory, remove a stale socket
/// (refusing if a daemon still answers on it), chmod 0660.
pub async fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::SocketDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ServeError::SocketInUse {
                    path: path.to_path_buf(),
                });
            }
            tracing::info!(path = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(|source| ServeError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(ServeError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind {
        what: path.display().to_string(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        ServeError::Chmod {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

/// Serve the API without authentication on a bound unix listener until
/// `shutdown` completes; removes the socket file afterwards.
pub async fn serve_unix_listener(
    listener: UnixListener,
    path: &Path,
    manager: Arc<Manager>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    tracing::info!(socket = %path.display(), "API listening on unix socket");
    let res = axum::serve(listener, router(manager))
        .with_graceful_shutdown(shutdown)
        .await;
    if let Err(e) = std::fs::remove_file(path) {
        tracing::debug!(socket = %path.display(), error = %e, "socket already gone");
    }
    res.map_err(|source| ServeError::Serve {
        what: path.display().to_string(),
        source,
    })
}

/// Bind `path` and serve the API on it without authentication.
pub async fn serve_unix(
    path: &Path,
    manager: Arc<Manager>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = bind_unix(path).await?;
    serve_unix_listener(listener, path, manager, shutdown).await
}

/// Plain HTTP only where nobody but this host can listen in.
pub fn check_plain_addr(addr: SocketAddr) -> Result<(), ServeError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(ServeError::PlainNotLoopback { addr })
    }
}

/// Serve the API as plain HTTP on a bound loopback TCP listener, requiring
/// `Authorization: Bearer <token>`; a listener on any other address is
/// refused (serve TLS there: [`crate::tls::serve_tls_listener`]).
pub async fn serve_tcp_listener(
    listener: TcpListener,
    token: &str,
    manager: Arc<Manager>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let app = tcp_router(manager, token)?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        what: "tcp".into(),
        source,
    })?;
    check_plain_addr(addr)?;
    let what = addr.to_string();
    tracing::info!(addr = %what, "API listening on TCP (plain HTTP on loopback, bearer auth)");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ServeError::Serve { what, source })
}

/// Bind `addr` and serve the API on it, requiring `Authorization: Bearer <token>`.
pub async fn serve_tcp(
    addr: SocketAddr,
    token: &str,
    manager: Arc<Manager>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    check_token(token)?;
    check_plain_addr(addr)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            what: addr.to_string(),
            source,
        })?;
    serve_tcp_listener(listener, token, manager, shutdown).await
}
