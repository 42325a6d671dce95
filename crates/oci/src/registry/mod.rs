//! Pulling an image from a registry (OCI distribution API) into the blob store.
//!
//! `oci-client` does the authentication (anonymous, basic, the bearer-token
//! flow, or a bearer token the caller already has) and streams the blobs;
//! manifests are fetched here with a hard size bound (the client would
//! buffer a body of any size). Every document and blob is
//! verified against its digest before it is used or becomes visible.

mod session;

use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};

use crate::manifest::{self, Doc, Fetched, MAX_JSON};
use crate::reference::host_of;
use crate::{BlobStore, OciError, Reference};
use session::Session;

/// How many layers download at once.
const PARALLEL_LAYERS: usize = 3;

/// How to authenticate to a registry for one pull.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// User name and password: HTTP basic, or exchanged for a token when the
    /// registry runs the token flow.
    Basic { username: String, password: String },
    /// A bearer token obtained elsewhere, sent as `Authorization: Bearer`
    /// as it is (no token flow).
    Bearer { token: String },
}

impl Credentials {
    /// User name and password.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials::Basic {
            username: username.into(),
            password: password.into(),
        }
    }

    /// A bearer token.
    pub fn bearer(token: impl Into<String>) -> Self {
        Credentials::Bearer {
            token: token.into(),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::Bearer { .. } => f
                .debug_struct("Bearer")
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

/// Registry access settings.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Registries allowed over plain HTTP, as `host:port` (that port only) or
    /// `host` (any port). Loopback (`127.0.0.0/8`, `::1`, `localhost`) is always
    /// allowed. Everything else is HTTPS only.
    pub insecure: Vec<String>,
    pub credentials: Option<Credentials>,
}

/// Pull progress, reported from the pulling task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The platform manifest is known.
    Resolved {
        manifest_digest: String,
        layers: usize,
        bytes: u64,
    },
    /// Bytes of a layer received so far.
    Layer {
        index: usize,
        digest: String,
        done: u64,
        total: u64,
    },
    /// A layer was already in the blob store.
    LayerCached { index: usize, digest: String },
    /// A layer is verified and stored.
    LayerDone { index: usize, digest: String },
}

/// Whether `registry` (`host[:port]`) may be reached over plain HTTP.
pub fn plain_http_allowed(registry: &str, insecure: &[String]) -> bool {
    let host = host_of(registry);
    let listed = insecure
        .iter()
        .any(|i| i.eq_ignore_ascii_case(registry) || i.eq_ignore_ascii_case(host));
    listed || is_loopback(host)
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Pulls `r`'s linux/amd64 image: manifest (through an index if needed), config
/// and layers, all verified, into `blobs`. Layers already present are not
/// downloaded again.
pub async fn pull(
    r: &Reference,
    opts: &RegistryOptions,
    blobs: &BlobStore,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Fetched, OciError> {
    let plain = plain_http_allowed(&r.registry, &opts.insecure);
    pull_with(r, opts, blobs, progress, plain).await
}

pub(crate) async fn pull_with(
    r: &Reference,
    opts: &RegistryOptions,
    blobs: &BlobStore,
    progress: &(dyn Fn(Progress) + Send + Sync),
    plain: bool,
) -> Result<Fetched, OciError> {
    let session = Session::connect(r, opts, plain).await?;
    let (digest, doc) = session
        .manifest(r.tag_or_digest(), r.digest.as_deref(), None)
        .await?;
    let (manifest_digest, config, layers) = match doc {
        Doc::Manifest { config, layers } => (digest, config, layers),
        Doc::Index(entries) => {
            let chosen = manifest::select_platform(&entries)?;
            let size = manifest::descriptor_size(chosen, "platform manifest")?;
            match session
                .manifest(&chosen.digest, Some(&chosen.digest), Some(size))
                .await?
            {
                (d, Doc::Manifest { config, layers }) => (d, config, layers),
                (_, Doc::Index(_)) => {
                    return Err(OciError::bad(
                        "platform manifest",
                        "an index points at another index",
                    ));
                }
            }
        }
    };
    let config_size = manifest::descriptor_size(&config, "image config")?;
    manifest::check_json_size(config_size, "image config")?;
    manifest::check_digest(&config.digest, "image config")?;
    if !blobs.contains(&config.digest) {
        session
            .blob(
                blobs,
                "image config",
                &config.digest,
                config_size,
                MAX_JSON,
                &|_| {},
            )
            .await?;
    }
    let config_bytes = blobs.read_small(&config.digest, MAX_JSON)?;
    let fetched = manifest::describe(&manifest_digest, &config, &layers, &config_bytes)?;
    progress(Progress::Resolved {
        manifest_digest: manifest_digest.clone(),
        layers: fetched.layers.len(),
        bytes: fetched.layers.iter().map(|l| l.size).sum(),
    });
    // Futures built up front: a stream holding a closure makes the future !Send
    // (rustc's higher-ranked lifetime limitation).
    let downloads: Vec<_> = (fetched.layers.iter().enumerate())
        .map(|(index, layer)| session.layer(blobs, index, layer, progress))
        .collect();
    futures::stream::iter(downloads)
        .buffer_unordered(PARALLEL_LAYERS)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_policy() {
        let none: Vec<String> = vec![];
        assert!(plain_http_allowed("127.0.0.1:5000", &none));
        assert!(plain_http_allowed("127.3.2.1", &none));
        assert!(plain_http_allowed("localhost:5000", &none));
        assert!(plain_http_allowed("[::1]:5000", &none));
        assert!(!plain_http_allowed("docker.io", &none));
        assert!(!plain_http_allowed("10.0.0.5:5000", &none));
        let list = vec!["10.0.0.5:5000".to_string(), "reg.lan".to_string()];
        assert!(plain_http_allowed("10.0.0.5:5000", &list));
        assert!(!plain_http_allowed("10.0.0.5:5001", &list));
        assert!(plain_http_allowed("reg.lan:8080", &list));
        assert!(!plain_http_allowed("reg.lan.evil.com", &list));
    }

    #[test]
    fn credentials_are_not_printed() {
        let c = Credentials::basic("u", "hunter2");
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2") && s.contains("\"u\""), "{s}");
        let s = format!("{:?}", Credentials::bearer("tok-secret"));
        assert!(!s.contains("tok-secret") && s.contains("Bearer"), "{s}");
    }

    #[test]
    fn pull_future_is_send() {
        fn is_send<T: Send>(_: &T) {}
        let r: Reference = "127.0.0.1:1/x:y".parse().unwrap();
        let opts = RegistryOptions::default();
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(tmp.path()).unwrap();
        let fut = pull(&r, &opts, &blobs, &|_| {});
        is_send(&fut);
    }

    /// A registry that answers a TLS handshake in plain HTTP (what a plain-HTTP
    /// registry does) is reported as InsecureRegistry when HTTP is not allowed.
    #[tokio::test]
    async fn https_to_a_plain_http_server_is_insecure_registry() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = "Client sent an HTTP request to an HTTPS server.\n";
                let resp = format!(
                    "HTTP/1.0 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let r: Reference = format!("127.0.0.1:{port}/x:y").parse().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(tmp.path()).unwrap();
        let e = pull_with(&r, &RegistryOptions::default(), &blobs, &|_| {}, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "insecure_registry", "{e}");
        assert!(e.to_string().contains("insecure"), "{e}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_registry_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let r: Reference = format!("127.0.0.1:{port}/x:y").parse().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(tmp.path()).unwrap();
        let e = pull(&r, &RegistryOptions::default(), &blobs, &|_| {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), "registry", "{e}");
    }

    /// A registry that lets only `Authorization: Bearer good` in, and then
    /// has no such manifest: a bearer token is sent as it is (no token
    /// flow), and without it or with another one the pull is unauthorized.
    #[tokio::test]
    async fn a_bearer_token_is_sent_as_it_is() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 65536 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&req).to_ascii_lowercase();
                    let resp = if head.contains("\r\nauthorization: bearer good\r\n") {
                        let body = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
                        format!(
                            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
                        format!(
                            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"t\"\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        let r: Reference = format!("127.0.0.1:{port}/x:y").parse().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(tmp.path()).unwrap();
        let code = async |credentials| {
            let opts = RegistryOptions {
                insecure: vec![],
                credentials,
            };
            pull(&r, &opts, &blobs, &|_| {}).await.unwrap_err().code()
        };
        assert_eq!(code(Some(Credentials::bearer("good"))).await, "not_found");
        assert_eq!(code(Some(Credentials::bearer("bad"))).await, "unauthorized");
        assert_eq!(
            code(Some(Credentials::basic("good", "x"))).await,
            "unauthorized"
        );
        assert_eq!(code(None).await, "unauthorized");
    }
}
