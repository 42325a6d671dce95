//! A small HTTP/1 client for the daemon's unix socket or, in remote mode,
//! its TCP listener (`crate::remote`).

use forkvm_api::wire::{
    AgentHealth, ErrorBody, ExecParams, ExecResponse, ForkResponse, Health, Image,
    ImageCreateParams, ImageImportParams, Instance, InstanceCreateParams, InstanceForkParams,
    Snapshot, SnapshotCreateParams, SnapshotForkParams, WaitForStateResponse,
};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to forkvm daemon at {}: is `forkvm serve` running? ({source})", socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// The daemon answered with an error body.
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("talking to the daemon: {0}")]
    Http(String),
    #[error("unexpected response from the daemon: {0}")]
    Decode(String),
}

pub struct Client {
    socket: PathBuf,
    /// Remote mode: `host:port` of a daemon's TCP listener and its token.
    remote: Option<Remote>,
}

pub use crate::remote::Remote;

/// A connection to the daemon, over whichever transport.
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            remote: None,
        }
    }

    /// Talks to a remote daemon's TCP listener instead of the socket.
    pub fn remote(mut self, remote: Option<Remote>) -> Self {
        self.remote = remote;
        self
    }

    /// A fresh connection to the daemon.
    pub(crate) async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        match &self.remote {
            Some(r) => r.connect().await,
            None => UnixStream::connect(&self.socket)
                .await
                .map(|s| Box::new(s) as Box<dyn Io>)
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                }),
        }
    }

    /// `scheme://authority` for WebSocket URLs: `wss` to an https host.
    pub(crate) fn ws_base(&self) -> String {
        match &self.remote {
            Some(r) if r.is_tls() => format!("wss://{}", r.authority),
            Some(r) => format!("ws://{}", r.authority),
            None => "ws://localhost".to_string(),
        }
    }

    /// `Host` and, in remote mode, `Authorization` for a request.
    pub(crate) fn headers(&self) -> Vec<(http::HeaderName, String)> {
        match &self.remote {
            Some(r) => vec![
                (header::HOST, r.authority.clone()),
                (header::AUTHORIZATION, format!("Bearer {}", r.token)),
            ],
            None => vec![(header::HOST, "localhost".to_string())],
        }
    }

    /// `GET path` decoded as `T`.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(Method::GET, path, None).await
    }

    /// One request on a fresh connection; returns status, content type and body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        accept: &str,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let (resp, conn_task) = self.request(method, path, body, accept).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        conn_task.abort();
        if status.is_success() {
            Ok((status, bytes))
        } else {
            Err(api_error(status, &bytes))
        }
    }

    /// A GET whose body is read as it arrives (event and log streams); an
    /// error status is read whole and returned as the error.
    pub async fn stream(
        &self,
        path: &str,
        accept: &str,
    ) -> Result<(Incoming, tokio::task::JoinHandle<()>), ClientError> {
        let (resp, conn_task) = self.request(Method::GET, path, None, accept).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok((resp.into_body(), conn_task));
        }
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        conn_task.abort();
        Err(api_error(status, &bytes))
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        accept: &str,
    ) -> Result<(http::Response<Incoming>, tokio::task::JoinHandle<()>), ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let conn_task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed with error");
            }
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::ACCEPT, accept);
        for (k, v) in self.headers() {
            req = req.header(k, v);
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok((resp, conn_task))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (_, bytes) = self.send(method, path, body, "application/json").await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.json(Method::POST, path, Some(body)).await
    }

    /// `GET /health`: the daemon is up and serving.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.json(Method::GET, "/health", None).await
    }

    /// `GET /instances/{id}/agent`: the guest agent's own health report.
    pub async fn agent(&self, id: &str) -> Result<AgentHealth, ClientError> {
        self.json(Method::GET, &format!("/instances/{}/agent", seg(id)), None)
            .await
    }

    pub async fn create(&self, p: &InstanceCreateParams) -> Result<Instance, ClientError> {
        self.post("/instances", p).await
    }

    pub async fn standby(&self, id: &str) -> Result<Instance, ClientError> {
        self.json(
            Method::POST,
            &format!("/instances/{}/standby", seg(id)),
            None,
        )
        .await
    }

    pub async fn restore(&self, id: &str) -> Result<Instance, ClientError> {
        self.json(
            Method::POST,
            &format!("/instances/{}/restore", seg(id)),
            None,
        )
        .await
    }

    pub async fn fork(
        &self,
        id: &str,
        p: &InstanceForkParams,
    ) -> Result<ForkResponse, ClientError> {
        self.post(&format!("/instances/{}/fork", seg(id)), p).await
    }

    pub async fn create_snapshot(
        &self,
        id: &str,
        p: &SnapshotCreateParams,
    ) -> Result<Snapshot, ClientError> {
        self.post(&format!("/instances/{}/snapshots", seg(id)), p)
            .await
    }

    pub async fn list_snapshots(&self) -> Result<Vec<Snapshot>, ClientError> {
        self.json(Method::GET, "/snapshots", None).await
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), ClientError> {
        self.send(
            Method::DELETE,
            &format!("/snapshots/{}", seg(id)),
            None,
            "*/*",
        )
        .await
        .map(|_| ())
    }

    pub async fn fork_snapshot(
        &self,
        id: &str,
        p: &SnapshotForkParams,
    ) -> Result<ForkResponse, ClientError> {
        self.post(&format!("/snapshots/{}/fork", seg(id)), p).await
    }

    pub async fn list(&self) -> Result<Vec<Instance>, ClientError> {
        self.json(Method::GET, "/instances", None).await
    }

    pub async fn get(&self, id: &str) -> Result<Instance, ClientError> {
        self.json(Method::GET, &format!("/instances/{}", seg(id)), None)
            .await
    }

    pub async fn wait(
        &self,
        id: &str,
        state: &str,
        timeout: &str,
    ) -> Result<WaitForStateResponse, ClientError> {
        let path = format!(
            "/instances/{}/wait?state={}&timeout={}",
            seg(id),
            seg(state),
            seg(timeout)
        );
        self.json(Method::GET, &path, None).await
    }

    pub async fn start(&self, id: &str) -> Result<Instance, ClientError> {
        self.json(Method::POST, &format!("/instances/{}/start", seg(id)), None)
            .await
    }

    pub async fn stop(&self, id: &str) -> Result<Instance, ClientError> {
        self.json(Method::POST, &format!("/instances/{}/stop", seg(id)), None)
            .await
    }

    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.send(
            Method::DELETE,
            &format!("/instances/{}", seg(id)),
            None,
            "*/*",
        )
        .await
        .map(|_| ())
    }

    pub async fn pull_image(&self, p: &ImageCreateParams) -> Result<Image, ClientError> {
        self.post("/images", p).await
    }

    pub async fn import_image(&self, p: &ImageImportParams) -> Result<Image, ClientError> {
        self.post("/images/import", p).await
    }

    pub async fn list_images(&self) -> Result<Vec<Image>, ClientError> {
        self.json(Method::GET, "/images", None).await
    }

    pub async fn get_image(&self, name: &str) -> Result<Image, ClientError> {
        self.json(Method::GET, &format!("/images/{}", seg(name)), None)
            .await
    }

    pub async fn delete_image(&self, name: &str) -> Result<(), ClientError> {
        self.send(
            Method::DELETE,
            &format!("/images/{}", seg(name)),
            None,
            "*/*",
        )
        .await
        .map(|_| ())
    }

    pub async fn exec(&self, id: &str, p: &ExecParams) -> Result<ExecResponse, ClientError> {
        self.post(&format!("/instances/{}/exec", seg(id)), p).await
    }

    pub async fn logs(&self, id: &str, q: &LogsQuery) -> Result<String, ClientError> {
        let (_, bytes) = self
            .send(Method::GET, &q.path(id), None, "text/plain")
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// What `GET /instances/{id}/logs` is asked for.
#[derive(Clone, Debug, Default)]
pub struct LogsQuery {
    pub tail: Option<usize>,
    pub follow: bool,
    /// `app` or `vmm`.
    pub source: Option<String>,
}

impl LogsQuery {
    pub fn path(&self, id: &str) -> String {
        let mut q = Vec::new();
        if let Some(n) = self.tail {
            q.push(format!("tail={n}"));
        }
        if self.follow {
            q.push("follow=true".to_string());
        }
        if let Some(s) = &self.source {
            q.push(format!("source={}", seg(s)));
        }
        let mut path = format!("/instances/{}/logs", seg(id));
        if !q.is_empty() {
            path.push('?');
            path.push_str(&q.join("&"));
        }
        path
    }
}

pub(crate) fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status,
            code: e.code,
            message: e.message,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body).trim().to_string();
            ClientError::Api {
                status,
                code: String::new(),
                message: if text.is_empty() {
                    format!("daemon answered {status}")
                } else {
                    format!("daemon answered {status}: {text}")
                },
            }
        }
    }
}

/// Percent-encode one path segment (ids and names are user input). Hand-rolled:
/// the RFC 3986 unreserved set is all we need and it saves a dependency.
pub(crate) fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(seg("web-1"), "web-1");
        assert_eq!(seg("a b/../c"), "a%20b%2F..%2Fc");
        assert_eq!(seg("é"), "%C3%A9");
    }

    #[test]
    fn error_bodies() {
        match api_error(
            StatusCode::NOT_FOUND,
            br#"{"code":"not_found","message":"instance \"x\" not found"}"#,
        ) {
            ClientError::Api { code, message, .. } => {
                assert_eq!(code, "not_found");
                assert_eq!(message, "instance \"x\" not found");
            }
            other => panic!("{other:?}"),
        }
        let e = api_error(StatusCode::BAD_GATEWAY, b"oops");
        assert_eq!(e.to_string(), "daemon answered 502 Bad Gateway: oops");
    }
}
