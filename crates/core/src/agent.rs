//! The guest agent as the core sees it: the [`GuestAgent`] trait (what the
//! orchestration needs from an agent) and [`AgentLinks`], its implementation
//! over gRPC on each VM's virtio-serial unix socket.
//!
//! QEMU accepts one client at a time on an agent socket, so `AgentLinks`
//! keeps exactly one tonic channel per instance and multiplexes calls over it.
//! When a call fails at the transport level (guest not serving yet,
//! connection reset by a restore or a guest reboot, per-try timeout) the
//! channel is dropped and the call is retried on a fresh connection until the
//! deadline.

use crate::error::ErrorKind;
use forkvm_proto::agent as pb;
use forkvm_proto::agent::agent_client::AgentClient;
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

type Client = AgentClient<Channel>;

/// Boxed future of a [`GuestAgent`] call (keeps the trait object-safe).
pub type AgentFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, AgentError>> + Send + 'a>>;

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

/// A call to the agent that did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The agent does not offer this call (an older or foreign agent).
    #[error("agent does not implement {op}: {message}")]
    Unimplemented { op: &'static str, message: String },
    /// The agent refused the request's content.
    #[error("{op}: {message}")]
    Rejected { op: &'static str, message: String },
    /// The agent answered with a failure.
    #[error("agent {op} failed: {message}")]
    Failed { op: &'static str, message: String },
    /// No answer before the deadline (`last`: the last transport error).
    #[error("agent {op}: guest agent did not answer in time ({last})")]
    Timeout { op: &'static str, last: String },
    /// The connection broke after a once-only request was sent: the guest
    /// may have run it, so it is not sent again.
    #[error(
        "agent {op}: connection lost after the request was sent; it may have run and was not retried ({message})"
    )]
    Interrupted { op: &'static str, message: String },
}

impl AgentError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Rejected { .. } => ErrorKind::Invalid,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Unimplemented { .. } | Self::Failed { .. } | Self::Interrupted { .. } => {
                ErrorKind::Failed
            }
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unimplemented { .. } => "agent_unimplemented",
            Self::Rejected { .. } => "invalid_request",
            Self::Failed { .. } => "agent_error",
            Self::Timeout { .. } => "timeout",
            Self::Interrupted { .. } => "agent_interrupted",
        }
    }
}

/// What the orchestration needs from a VM's guest agent. `id` names the
/// instance (one cached connection each), `socket` is its agent socket.
pub trait GuestAgent: Send + Sync {
    fn health<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::HealthResponse>;

    fn reconfigure_network<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        cfg: pb::NetworkConfig,
        policy: CallPolicy,
    ) -> AgentFuture<'a, ()>;

    fn exec<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        req: pb::ExecRequest,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::ExecResponse>;

    fn set_clock<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        unix_time_ns: i64,
        policy: CallPolicy,
    ) -> AgentFuture<'a, ()>;

    /// Start the image's workload (idempotent: a started one is reported
    /// as it is, never started twice).
    fn start_workload<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        spec: pb::WorkloadSpec,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::WorkloadStatus>;

    /// An interactive command: `input` is sent as it comes (its first
    /// message must be `start`), the output streams back, the last item
    /// being the exit. Sent once and never retried — the command may have
    /// started — so a transport failure is an error at once. Connecting is
    /// bounded by `connect`.
    fn exec_session<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        input: tokio::sync::mpsc::Receiver<pb::ExecInput>,
        connect: Duration,
    ) -> AgentFuture<'a, ExecOutputStream>;

    /// What is at a guest path (read-only: retried like the other calls).
    fn stat<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        req: pb::StatRequest,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::StatResponse>;

    /// Writes one file or directory (`input` starts with `start`, ends with
    /// `end`); sent once, never retried.
    fn copy_in<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        input: tokio::sync::mpsc::Receiver<pb::CopyInRequest>,
        connect: Duration,
    ) -> AgentFuture<'a, pb::CopyInResult>;

    /// Streams a file or tree out of the guest.
    fn copy_out<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        req: pb::CopyOutRequest,
        connect: Duration,
    ) -> AgentFuture<'a, CopyOutStream>;

    /// Drop the cached connection of an instance (stop, delete, restore).
    fn forget(&self, id: &str);
}

/// What [`GuestAgent::copy_out`] streams back.
pub type CopyOutStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::CopyOutMessage, AgentError>> + Send>>;

/// What [`GuestAgent::exec_session`] streams back.
pub type ExecOutputStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::ExecOutput, AgentError>> + Send>>;

/// [`GuestAgent`] over gRPC, one cached connection per instance.
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

fn map_status(op: &'static str, status: Status) -> AgentError {
    let message = status.message().to_string();
    match status.code() {
        Code::Unimplemented => AgentError::Unimplemented { op, message },
        // The request or the image is at fault (no such program, user or
        // disk in the image): the caller can fix it.
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition => {
            AgentError::Rejected { op, message }
        }
        _ => AgentError::Failed { op, message },
    }
}

impl AgentLinks {
    fn cached(&self, id: &str) -> Option<Client> {
        self.links.lock().ok().and_then(|l| l.get(id).cloned())
    }

    fn remember(&self, id: &str, c: Client) {
        if let Ok(mut l) = self.links.lock() {
            l.insert(id.to_string(), c);
        }
    }

    /// The cached connection, or a new one within `connect`; for calls that
    /// are made once (streams whose requests may already have run).
    async fn client_once(
        &self,
        id: &str,
        socket: &Path,
        connect: Duration,
        op: &'static str,
    ) -> Result<Client, AgentError> {
        if let Some(c) = self.cached(id) {
            return Ok(c);
        }
        let c = tokio::time::timeout(connect, forkvm_proto::client::connect_unix(socket))
            .await
            .map_err(|_| AgentError::Timeout {
                op,
                last: format!("no connection within {connect:?}"),
            })?
            .map_err(|e| AgentError::Failed {
                op,
                message: e.to_string(),
            })?;
        self.remember(id, c.clone());
        Ok(c)
    }

    /// A failed once-only call: the connection goes if the transport broke.
    fn failed_once(&self, id: &str, op: &'static str, s: Status) -> AgentError {
        if is_transport(&s) {
            self.forget(id);
        }
        map_status(op, s)
    }

    /// Run `f` against the instance's agent, reconnecting and retrying
    /// transport failures until `policy.deadline`.
    async fn call<T, F, Fut>(
        &self,
        id: &str,
        socket: &Path,
        op: &'static str,
        policy: CallPolicy,
        f: F,
    ) -> Result<T, AgentError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
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
            let last = match tokio::time::timeout(policy.per_try, attempt).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) if !is_transport(&status) => return Err(map_status(op, status)),
                Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
                Err(_) => format!("no answer within {:?}", policy.per_try),
            };
            self.forget(id);
            if Instant::now() + backoff >= policy.deadline {
                return Err(AgentError::Timeout { op, last });
            }
            tracing::debug!(instance = id, op, error = %last, "agent call failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

impl AgentLinks {
    /// Run a request that must not run twice (exec). Reaching the agent is
    /// retried (a `Health` call within `policy`), the request itself is sent
    /// exactly once: a transport failure after that is
    /// [`AgentError::Interrupted`], since the guest may already have run it.
    async fn call_once<T, F, Fut>(
        &self,
        id: &str,
        socket: &Path,
        op: &'static str,
        policy: CallPolicy,
        f: F,
    ) -> Result<T, AgentError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let probe = CallPolicy {
            deadline: policy.deadline,
            per_try: policy.per_try.min(Duration::from_secs(10)),
        };
        self.call(id, socket, op, probe, |mut c| async move {
            c.health(pb::HealthRequest {}).await
        })
        .await?;
        let client = self.client_once(id, socket, probe.per_try, op).await?;
        match tokio::time::timeout(policy.per_try, f(client)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) if is_transport(&status) => {
                self.forget(id);
                Err(AgentError::Interrupted {
                    op,
                    message: format!("{}: {}", status.code(), status.message()),
                })
            }
            Ok(Err(status)) => Err(map_status(op, status)),
            Err(_) => {
                self.forget(id);
                Err(AgentError::Timeout {
                    op,
                    last: format!("no answer within {:?}", policy.per_try),
                })
            }
        }
    }
}

impl GuestAgent for AgentLinks {
    fn health<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::HealthResponse> {
        Box::pin(self.call(id, socket, "Health", policy, |mut c| async move {
            c.health(pb::HealthRequest {}).await
        }))
    }

    fn reconfigure_network<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        cfg: pb::NetworkConfig,
        policy: CallPolicy,
    ) -> AgentFuture<'a, ()> {
        Box::pin(async move {
            self.call(id, socket, "ReconfigureNetwork", policy, |mut c| {
                let cfg = cfg.clone();
                async move { c.reconfigure_network(cfg).await }
            })
            .await
            .map(|_| ())
        })
    }

    fn exec<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        req: pb::ExecRequest,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::ExecResponse> {
        Box::pin(
            self.call_once(id, socket, "Exec", policy, move |mut c| async move {
                c.exec(req).await
            }),
        )
    }

    fn start_workload<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        spec: pb::WorkloadSpec,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::WorkloadStatus> {
        Box::pin(
            self.call(id, socket, "StartWorkload", policy, move |mut c| {
                let spec = spec.clone();
                async move { c.start_workload(spec).await }
            }),
        )
    }

    fn set_clock<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        unix_time_ns: i64,
        policy: CallPolicy,
    ) -> AgentFuture<'a, ()> {
        Box::pin(async move {
            self.call(id, socket, "SetClock", policy, |mut c| async move {
                c.set_clock(pb::SetClockRequest { unix_time_ns }).await
            })
            .await
            .map(|_| ())
        })
    }

    fn exec_session<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        input: tokio::sync::mpsc::Receiver<pb::ExecInput>,
        connect: Duration,
    ) -> AgentFuture<'a, ExecOutputStream> {
        use futures::StreamExt;
        const OP: &str = "ExecSession";
        Box::pin(async move {
            let mut client = self.client_once(id, socket, connect, OP).await?;
            let input = tokio_stream::wrappers::ReceiverStream::new(input);
            let resp = client
                .exec_session(input)
                .await
                .map_err(|s| self.failed_once(id, OP, s))?;
            let out = resp.into_inner().map(|r| r.map_err(|s| map_status(OP, s)));
            Ok(Box::pin(out) as ExecOutputStream)
        })
    }

    fn stat<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        req: pb::StatRequest,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::StatResponse> {
        Box::pin(self.call(id, socket, "Stat", policy, move |mut c| {
            let req = req.clone();
            async move { c.stat(req).await }
        }))
    }

    fn copy_in<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        input: tokio::sync::mpsc::Receiver<pb::CopyInRequest>,
        connect: Duration,
    ) -> AgentFuture<'a, pb::CopyInResult> {
        const OP: &str = "CopyIn";
        Box::pin(async move {
            let mut client = self.client_once(id, socket, connect, OP).await?;
            let input = tokio_stream::wrappers::ReceiverStream::new(input);
            client
                .copy_in(input)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| self.failed_once(id, OP, s))
        })
    }

    fn copy_out<'a>(
        &'a self,
        id: &'a str,
        socket: &'a Path,
        req: pb::CopyOutRequest,
        connect: Duration,
    ) -> AgentFuture<'a, CopyOutStream> {
        use futures::StreamExt;
        const OP: &str = "CopyOut";
        Box::pin(async move {
            let mut client = self.client_once(id, socket, connect, OP).await?;
            let resp = client
                .copy_out(req)
                .await
                .map_err(|s| self.failed_once(id, OP, s))?;
            let out = resp.into_inner().map(|r| r.map_err(|s| map_status(OP, s)));
            Ok(Box::pin(out) as CopyOutStream)
        })
    }

    fn forget(&self, id: &str) {
        if let Ok(mut l) = self.links.lock() {
            l.remove(id);
        }
    }
}

/// The armed mailbox an agent reports in Health, if any.
pub(crate) fn mailbox_of(h: &pb::HealthResponse) -> Option<crate::model::MailboxInfo> {
    (h.mailbox_marker.len() == 16).then(|| crate::model::MailboxInfo {
        marker: hex::encode(&h.mailbox_marker),
        gpa: h.mailbox_gpa,
    })
}
