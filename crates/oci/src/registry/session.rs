//! One pull's conversation with a registry: authentication, bounded manifest
//! fetches, verified blob downloads, and the mapping of client errors to
//! [`OciError`] variants.

use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};

use super::{Credentials, Progress, RegistryOptions};
use crate::blobs::sha256_of;
use crate::error::BoxError;
use crate::manifest::{self, Doc, Layer, MANIFEST_TYPES, MAX_JSON};
use crate::{BlobStore, OciError, Reference};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const USER_AGENT: &str = concat!("forkvm-oci/", env!("CARGO_PKG_VERSION"));

pub(super) struct Session {
    client: Client,
    http: reqwest::Client,
    oref: oci_client::Reference,
    scheme: &'static str,
    registry: String,
    repository: String,
    /// A bearer token: the caller's, or from the token flow if the
    /// registry uses one.
    token: Option<String>,
    /// User name and password for HTTP basic.
    credentials: Option<(String, String)>,
    plain: bool,
}

impl Session {
    /// Builds the clients and authenticates for pulling `r`'s repository.
    pub async fn connect(
        r: &Reference,
        opts: &RegistryOptions,
        plain: bool,
    ) -> Result<Session, OciError> {
        let oref = oci_client::Reference::with_tag(
            r.registry.clone(),
            r.repository.clone(),
            r.tag.clone().unwrap_or_else(|| "latest".into()),
        );
        let config = ClientConfig {
            protocol: if plain {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: USER_AGENT,
            ..ClientConfig::default()
        };
        let client = Client::try_from(config)
            .map_err(|e| registry_err(&r.registry, "building the HTTP client", e))?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| registry_err(&r.registry, "building the HTTP client", e))?;
        let (auth, credentials) = match &opts.credentials {
            Some(Credentials::Basic { username, password }) => (
                RegistryAuth::Basic(username.clone(), password.clone()),
                Some((username.clone(), password.clone())),
            ),
            // Returned by `auth` as the session's token, used as it is.
            Some(Credentials::Bearer { token }) => (RegistryAuth::Bearer(token.clone()), None),
            None => (RegistryAuth::Anonymous, None),
        };
        let mut s = Session {
            client,
            http,
            oref,
            scheme: if plain { "http" } else { "https" },
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            token: None,
            credentials,
            plain,
        };
        s.token = s
            .client
            .auth(&s.oref, &auth, RegistryOperation::Pull)
            .await
            .map_err(|e| s.map(e, "authenticating"))?;
        Ok(s)
    }

    /// Fetches a manifest or index by tag or digest, at most `MAX_JSON` (and at most
    /// `size`, from a descriptor) bytes, checked against `expected` digest.
    pub async fn manifest(
        &self,
        tag_or_digest: &str,
        expected: Option<&str>,
        size: Option<u64>,
    ) -> Result<(String, Doc), OciError> {
        let what = format!("manifest {}:{tag_or_digest}", self.repository);
        let url = format!(
            "{}://{}/v2/{}/manifests/{tag_or_digest}",
            self.scheme,
            self.oref.resolve_registry(),
            self.repository
        );
        let mut req = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, MANIFEST_TYPES.join(", "));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        } else if let Some((u, p)) = &self.credentials {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.status_err(status.as_u16(), &what, resp).await);
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type");
        let header_digest = header("docker-content-digest");
        let limit = size.map_or(MAX_JSON, |s| s.min(MAX_JSON));
        let body = read_bounded(resp, limit, &what)
            .await
            .map_err(|e| match e {
                Bounded::TooLarge(n) if size.is_some_and(|s| n > s) => OciError::SizeMismatch {
                    what: what.clone(),
                    expected: size.unwrap_or(0),
                    actual: n,
                },
                Bounded::TooLarge(n) => OciError::TooLarge {
                    what: what.clone(),
                    actual: n,
                    limit: MAX_JSON,
                },
                Bounded::Http(e) => self.transport(e),
            })?;
        let actual = sha256_of(&body);
        let claimed = expected
            .map(str::to_string)
            .or(header_digest.filter(|d| d.starts_with("sha256:")));
        if let Some(expected) = claimed
            && expected != actual
        {
            return Err(OciError::DigestMismatch {
                what,
                expected,
                actual,
            });
        }
        if let Some(s) = size
            && s != body.len() as u64
        {
            return Err(OciError::SizeMismatch {
                what,
                expected: s,
                actual: body.len() as u64,
            });
        }
        let doc = manifest::parse_doc(&body, content_type.as_deref(), &what)?;
        Ok((actual, doc))
    }

    /// Downloads one layer into the store unless it is there already.
    pub async fn layer(
        &self,
        blobs: &BlobStore,
        index: usize,
        layer: &Layer,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(), OciError> {
        let digest = layer.digest.clone();
        if blobs.contains(&layer.digest) {
            let have = blobs.size(&layer.digest)?;
            if have != layer.size {
                return Err(OciError::SizeMismatch {
                    what: format!("layer {index}"),
                    expected: layer.size,
                    actual: have,
                });
            }
            progress(Progress::LayerCached { index, digest });
            return Ok(());
        }
        let total = layer.size;
        let report = |done| {
            progress(Progress::Layer {
                index,
                digest: digest.clone(),
                done,
                total,
            })
        };
        let what = format!("layer {index}");
        self.blob(blobs, &what, &layer.digest, layer.size, u64::MAX, &report)
            .await?;
        progress(Progress::LayerDone {
            index,
            digest: layer.digest.clone(),
        });
        Ok(())
    }

    /// Streams a blob into the store, verified against digest and size.
    pub async fn blob(
        &self,
        blobs: &BlobStore,
        what: &str,
        digest: &str,
        size: u64,
        max: u64,
        report: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), OciError> {
        let desc = OciDescriptor {
            digest: digest.to_string(),
            size: i64::try_from(size).unwrap_or(i64::MAX),
            // Never follow a manifest's foreign `urls`: only this registry is asked.
            urls: None,
            ..OciDescriptor::default()
        };
        let sized = self
            .client
            .pull_blob_stream(&self.oref, &desc)
            .await
            .map_err(|e| self.map(e, what))?;
        if let Some(len) = sized.content_length.filter(|l| *l != size) {
            return Err(OciError::SizeMismatch {
                what: what.to_string(),
                expected: size,
                actual: len,
            });
        }
        let mut writer = blobs.writer(what, Some(digest), Some(size), max)?;
        let mut stream = sized.stream;
        let mut last = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.stream_err(e, what))?;
            writer.write(&chunk)?;
            if writer.written() - last >= 1 << 20 || writer.written() == size {
                last = writer.written();
                report(last);
            }
        }
        tokio::task::spawn_blocking(move || writer.commit())
            .await
            .map_err(|e| registry_err(&self.registry, "storing a blob", e))??;
        Ok(())
    }

    async fn status_err(&self, status: u16, what: &str, resp: reqwest::Response) -> OciError {
        let body = read_bounded(resp, 64 << 10, what).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body).trim().to_string();
        let source: Option<BoxError> = (!text.is_empty()).then(|| text.clone().into());
        match status {
            401 | 403 => OciError::Unauthorized {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                source,
            },
            404 => OciError::NotFound {
                registry: self.registry.clone(),
                what: what.to_string(),
                source,
            },
            _ => OciError::Registry {
                registry: self.registry.clone(),
                message: format!("HTTP {status} for {what}"),
                source,
            },
        }
    }

    /// Maps an `oci-client` error to the crate's error.
    fn map(&self, e: OciDistributionError, what: &str) -> OciError {
        use OciDistributionError as E;
        let unauthorized = |source: Option<BoxError>| OciError::Unauthorized {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            source,
        };
        let not_found = |source: BoxError| OciError::NotFound {
            registry: self.registry.clone(),
            what: what.to_string(),
            source: Some(source),
        };
        match e {
            E::AuthenticationFailure(m) => unauthorized(Some(m.into())),
            E::UnauthorizedError { .. } => unauthorized(Some(Box::new(e))),
            E::RegistryError { ref envelope, .. } => {
                let code = envelope.errors.first().map(|x| &x.code);
                match code {
                    Some(
                        OciErrorCode::BlobUnknown
                        | OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound,
                    ) => not_found(Box::new(e)),
                    Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                        unauthorized(Some(Box::new(e)))
                    }
                    _ => registry_err(&self.registry, what, e),
                }
            }
            E::ServerError { code: 404, .. } => not_found(Box::new(e)),
            E::ServerError {
                code: 401 | 403, ..
            } => unauthorized(Some(Box::new(e))),
            E::DigestError(DigestError::VerificationError { expected, actual }) => {
                OciError::DigestMismatch {
                    what: what.to_string(),
                    expected,
                    actual,
                }
            }
            E::RequestError(re) => self.transport(re),
            E::IoError(io) => self.stream_err(io, what),
            other => registry_err(&self.registry, what, other),
        }
    }

    /// A download stream error: digest mismatch found by the client, or transport.
    fn stream_err(&self, e: std::io::Error, what: &str) -> OciError {
        if let Some(DigestError::VerificationError { expected, actual }) =
            e.get_ref().and_then(|i| i.downcast_ref::<DigestError>())
        {
            return OciError::DigestMismatch {
                what: what.to_string(),
                expected: expected.clone(),
                actual: actual.clone(),
            };
        }
        registry_err(&self.registry, &format!("downloading {what}"), e)
    }

    /// A connection-level failure; a TLS handshake answered in plain text means
    /// the registry speaks only HTTP, which is refused unless allowed.
    fn transport(&self, e: reqwest::Error) -> OciError {
        let chain = error_chain(&e);
        if !self.plain && looks_like_plain_http(&chain) {
            return OciError::InsecureRegistry {
                registry: self.registry.clone(),
                source: Some(Box::new(e)),
            };
        }
        OciError::Registry {
            registry: self.registry.clone(),
            message: format!(
                "cannot reach the registry ({chain}); check the address and that it is up"
            ),
            source: Some(Box::new(e)),
        }
    }
}

fn registry_err(
    registry: &str,
    what: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> OciError {
    OciError::Registry {
        registry: registry.to_string(),
        message: format!("{what}: {e}"),
        source: Some(Box::new(e)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

/// rustls' report of a non-TLS reply to its ClientHello.
fn looks_like_plain_http(chain: &str) -> bool {
    chain.contains("InvalidContentType")
        || chain.contains("corrupt message")
        || chain.contains("http request to an https")
}

enum Bounded {
    TooLarge(u64),
    Http(reqwest::Error),
}

/// Reads a response body of at most `limit` bytes.
async fn read_bounded(
    mut resp: reqwest::Response,
    limit: u64,
    _what: &str,
) -> Result<Vec<u8>, Bounded> {
    if let Some(len) = resp.content_length().filter(|l| *l > limit) {
        return Err(Bounded::TooLarge(len));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Bounded::Http)? {
        let after = body.len() as u64 + chunk.len() as u64;
        if after > limit {
            return Err(Bounded::TooLarge(after));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
