//! One shared way to call the guest agent: a cached connection per instance
//! and a retry/reconnect wrapper used by every RPC (health, exec, reconfigure).
//!
//! QEMU accepts one client at a time on an agent socket, so the daemon keeps
//! exactly one tonic channel per instance and multiplexes calls over it. When a
//! call fails at the transport level (guest not serving yet, connection reset
//! by a restore or a guest reboot, per-try timeout) the channel is dropped and
//! the call is retried on a fresh connection until the deadline.

use crate::error::{CoreError, Result};
use forkvm_proto::agent::agent_client::AgentClient;
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub type Client = AgentClient<Channel>;

/// How one call may be retried.
#[derive(Clone, Copy, Debug)]
pub struct CallPolicy {
    /// Give up after this instant.
    pub deadline: Instant,
    /// Bound for one attempt (connect + call).
    pub per_try: Duration,
}

impl CallPolicy {
    pub fn within(total: Duration, per_try: Duration) -> Self {
        Self {
            deadline: Instant::now() + total,
            per_try,
        }
    }
}

#[derive(Default)]
pub struct AgentLinks {
    links: Mutex<HashMap<String, Client>>,
}

/// Transport-level failures are worth a retry on a new connection; errors the
/// agent itself returned are not.
fn is_transport(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    ) || (status.code() == Code::Internal && status.message().contains("h2"))
}

fn map_status(op: &str, status: Status) -> CoreError {
    match status.code() {
        Code::Unimplemented => CoreError::NotImplemented(format!(
            "agent does not implement {op}: {}",
            status.message()
        )),
        Code::InvalidArgument => CoreError::Invalid(format!("{op}: {}", status.message())),
        _ => CoreError::Internal(format!("agent {op} failed: {}", status.message())),
    }
}

impl AgentLinks {
    /// Drop the cached connection of an instance (stop, delete, restore).
    pub fn forget(&self, id: &str) {
        if let Ok(mut l) = self.links.lock() {
            l.remove(id);
        }
    }

    fn cached(&self, id: &str) -> Option<Client> {
        self.links.lock().ok().and_then(|l| l.get(id).cloned())
    }

    fn remember(&self, id: &str, c: Client) {
        if let Ok(mut l) = self.links.lock() {
            l.insert(id.to_string(), c);
        }
    }

    /// Run `f` against the instance's agent, reconnecting and retrying
    /// transport failures until `policy.deadline`.
    pub async fn call<T, F, Fut>(
        &self,
        id: &str,
        socket: &Path,
        op: &str,
        policy: CallPolicy,
        f: F,
    ) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let mut backoff = Duration::from_millis(20);
        loop {
            let attempt = async {
                let client = match self.cached(id) {
                    Some(c) => c,
                    None => {
                        let c = forkvm_proto::client::connect_unix(socket)
                            .await
                            .map_err(|e| Status::unavailable(e.to_string()))?;
                        self.remember(id, c.clone());
                        c
                    }
                };
                f(client).await
            };
            let last_err = match tokio::time::timeout(policy.per_try, attempt).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) if !is_transport(&status) => return Err(map_status(op, status)),
                Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
                Err(_) => format!("no answer within {:?}", policy.per_try),
            };
            self.forget(id);
            if Instant::now() + backoff >= policy.deadline {
                return Err(CoreError::Timeout(format!(
                    "agent {op}: guest agent did not answer in time ({last_err})"
                )));
            }
            tracing::debug!(instance = id, op, error = %last_err, "agent call failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}
