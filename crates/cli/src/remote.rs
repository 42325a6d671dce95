//! Remote mode: a daemon's TCP listener (`--host` / `FORKVM_HOST`), over
//! TLS (`https://`, rustls with the aws-lc-rs provider) or plain HTTP on a
//! loopback address.

use crate::client::{ClientError, Io};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsConnector;

/// A daemon's TCP listener and its token.
#[derive(Clone)]
pub struct Remote {
    /// `host:port`, as sent in `Host`.
    pub authority: String,
    pub token: String,
    /// `Some` for `https://`: the TLS configuration and the name the
    /// daemon's certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Remote {
    // By hand: the token stays out of every debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("authority", &self.authority)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn bad(msg: String) -> ClientError {
    ClientError::Http(msg)
}

impl Remote {
    /// From `https://HOST[:PORT]` or `http://HOST:PORT` (plain HTTP only to
    /// a loopback host), the API token, and for https the CA certificate(s)
    /// to trust (PEM; without it, the system's roots).
    pub fn parse(url: &str, token: &str, ca: Option<&Path>) -> Result<Self, ClientError> {
        let (https, rest) = match url.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            Some((scheme, _)) => {
                return Err(bad(format!(
                    "--host {url:?}: {scheme}:// is not supported: use https://HOST:PORT"
                )));
            }
            None => (false, url),
        };
        let rest = rest.trim_end_matches('/');
        let auth: http::uri::Authority = rest
            .parse()
            .ok()
            .filter(|_| !rest.is_empty() && !rest.contains(['/', '@']))
            .ok_or_else(|| bad(format!("--host {url:?}: expected https://HOST:PORT")))?;
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        let port = auth.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = format!("{}:{port}", auth.host());
        if token.is_empty() {
            return Err(bad(
                "--host needs the daemon's token in FORKVM_API_TOKEN".into()
            ));
        }
        let tls = if https {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| bad(format!("--host {url:?}: {e}")))?;
            Some((TlsConnector::from(client_config(ca)?), name))
        } else {
            if !is_loopback(host) {
                return Err(bad(format!(
                    "refusing to send the API token in plain HTTP to {host}: use https:// (the daemon serves TLS with --tls-cert/--tls-key)"
                )));
            }
            if ca.is_some() {
                return Err(bad("--tls-ca is for an https:// host".into()));
            }
            None
        };
        Ok(Self {
            authority,
            token: token.to_string(),
            tls,
        })
    }

    /// Whether requests go over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A fresh connection: TCP, then TLS for https.
    pub(crate) async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let conn_err = |source| ClientError::Connect {
            socket: PathBuf::from(&self.authority),
            source,
        };
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(conn_err)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((connector, name)) => connector
                .connect(name.clone(), tcp)
                .await
                .map(|s| Box::new(s) as Box<dyn Io>)
                .map_err(|e| ClientError::Http(format!("TLS with {}: {e}", self.authority))),
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Roots: the certificates in `ca`, or else the system's.
fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let err =
                |e: rustls_pki_types::pem::Error| bad(format!("--tls-ca {}: {e}", path.display()));
            for cert in CertificateDer::pem_file_iter(path).map_err(err)? {
                roots
                    .add(cert.map_err(err)?)
                    .map_err(|e| bad(format!("--tls-ca {}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(bad(format!(
                    "--tls-ca {}: no PEM certificate in it",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(bad(
                    "no system CA certificates found: give the daemon's CA with --tls-ca".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_hosts_and_refuses_plain_http_off_loopback() {
        let r = Remote::parse("http://127.0.0.1:4973/", T, None).unwrap();
        assert_eq!(r.authority, "127.0.0.1:4973");
        assert!(!r.is_tls());
        assert_eq!(
            Remote::parse("localhost:80", T, None).unwrap().authority,
            "localhost:80"
        );
        assert_eq!(
            Remote::parse("http://[::1]:9", T, None).unwrap().authority,
            "[::1]:9"
        );
        let e = Remote::parse("http://10.0.0.1:4973", T, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("https://"), "{e}");
        for bad in ["ftp://x:1", "http://", "http://a:1/path", "http://u@a:1"] {
            assert!(Remote::parse(bad, T, None).is_err(), "{bad}");
        }
        assert!(Remote::parse("http://127.0.0.1:1", "", None).is_err());
    }

    #[test]
    fn https_needs_a_readable_ca() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        let e = Remote::parse("https://10.0.0.1:4973", T, Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-ca"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = Remote::parse("https://10.0.0.1:4973", T, Some(&empty))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(
            format!(
                "{:?}",
                Remote::parse("http://127.0.0.1:1", T, None).unwrap()
            )
            .contains("127.0.0.1")
        );
        assert!(
            !format!(
                "{:?}",
                Remote::parse("http://127.0.0.1:1", T, None).unwrap()
            )
            .contains(T)
        );
    }
}
