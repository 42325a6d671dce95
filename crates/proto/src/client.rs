//! Host-side connection to the agent through QEMU's unix socket for the
//! virtio-serial port (`-chardev socket,...,server=on`).
//!
//! QEMU accepts one client at a time on that socket, so callers should keep one
//! client per VM and clone it (tonic clients multiplex over one HTTP/2 connection).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::agent::agent_client::AgentClient;

/// Failure to open the agent channel.
#[derive(Debug, thiserror::Error)]
#[error("connecting to agent socket {path}: {source}")]
pub struct ConnectError {
    pub path: PathBuf,
    #[source]
    pub source: tonic::transport::Error,
}

/// Connects to the agent behind the unix socket at `path`.
///
/// The returned channel connects eagerly (the HTTP/2 handshake with the guest
/// has completed when this returns); if the connection later drops, tonic
/// reconnects lazily through the same connector on the next call.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<AgentClient<Channel>, ConnectError> {
    let path = path.as_ref().to_path_buf();
    let sock = path.clone();
    // The URI is a placeholder required by tonic; the connector ignores it.
    let channel = Endpoint::from_static("http://agent")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let sock = sock.clone();
            async move { UnixStream::connect(sock).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ConnectError { path, source })?;
    Ok(AgentClient::new(channel).max_decoding_message_size(crate::MAX_REPLY_BYTES))
}
