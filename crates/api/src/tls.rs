//! The TCP listener over TLS: rustls (aws-lc-rs provider) with the
//! operator's certificate chain and private key (PEM files), served by
//! axum-server (TLS handshakes off the accept loop, bounded in time).

use crate::server::{ServeError, tcp_router};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use forkvm_core::Manager;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight (event and log streams included) may go on
/// after shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Errors loading the certificate and key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the TLS certificate chain {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("{path} holds no PEM certificate")]
    NoCert { path: PathBuf },
    #[error("reading the TLS private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("TLS certificate {cert} and key {key} do not make a server configuration: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// The rustls server configuration from a PEM certificate chain (leaf
/// first) and a PEM private key (PKCS#8, PKCS#1 or SEC1); HTTP/1.1 only, so
/// WebSocket upgrades (exec, cp) work.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_err = |e: rustls_pki_types::pem::Error| TlsError::Cert {
        path: cert.to_path_buf(),
        message: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(cert_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(cert_err)?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: cert.to_path_buf(),
        });
    }
    warn_if_key_is_open(key);
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
        .map_err(|source| TlsError::Config {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn warn_if_key_is_open(key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::metadata(key)
        && md.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(key = %key.display(), mode = format_args!("{:o}", md.permissions().mode() & 0o777),
            "the TLS private key is readable by other users");
    }
}

/// Serve the API over TLS on a bound TCP listener (any address), requiring
/// `Authorization: Bearer <token>`.
pub async fn serve_tls_listener(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    token: &str,
    manager: Arc<Manager>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let app = tcp_router(manager, token)?;
    let what = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "tcp".into());
    tracing::info!(addr = %what, "API listening on TCP (TLS, bearer auth)");
    let handle = axum_server::Handle::<std::net::SocketAddr>::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(SHUTDOWN_GRACE));
    });
    let acceptor =
        RustlsAcceptor::new(RustlsConfig::from_config(tls)).handshake_timeout(HANDSHAKE_TIMEOUT);
    axum_server::Server::from_listener(listener)
        .acceptor(acceptor)
        .handle(handle)
        .serve(app.into_make_service())
        .await
        .map_err(|source| ServeError::Serve { what, source })
}
