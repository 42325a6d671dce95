//! Typed errors of the core. Each failure keeps its cause (`source()`), and
//! [`CoreError::kind`] is the one place that classifies it for callers (the
//! API turns a kind into an HTTP status).

use crate::agent::AgentError;
use crate::handoff::HandoffError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CoreError {
    /// Input the caller can fix.
    #[error("{0}")]
    Invalid(String),
    /// Unknown instance, snapshot or image.
    #[error("{0}")]
    NotFound(String),
    /// The request clashes with current state: name taken, wrong state.
    #[error("{0}")]
    Conflict(String),
    /// Capacity exhausted: IP pool, memory budget.
    #[error("{0}")]
    Exhausted(String),
    /// The hypervisor failed.
    #[error("{context}: {source}")]
    Vmm {
        context: String,
        #[source]
        source: Box<forkvm_vmm::VmmError>,
    },
    /// Host networking (bridge, TAP, netlink) failed.
    #[error("{context}: {source}")]
    Net {
        context: String,
        #[source]
        source: Box<forkvm_net::NetError>,
    },
    /// A file operation on the host failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The state store failed.
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    /// A guest image exists but could not be loaded (a missing one is NotFound).
    #[error("loading image: {0}")]
    Image(#[source] Box<forkvm_image::ImageError>),
    /// A call to the guest agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The VM exited while an operation waited on its guest.
    #[error(transparent)]
    VmExited(#[from] crate::teardown::VmExited),
    /// The new identity did not reach a fork.
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    /// The guest did not come up (boot or restore) within its deadline.
    #[error("{0}")]
    Timeout(String),
    /// A broken invariant of the daemon itself.
    #[error("{0}")]
    Internal(String),
}

/// Failures of the SQLite state store.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
    #[error("encoding a record: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("corrupt {what} record: {source}")]
    Corrupt {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("state store lock poisoned")]
    Poisoned,
}

/// What kind of failure an error is, for whoever must answer for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is wrong (400).
    Invalid,
    /// Nothing by that name (404).
    NotFound,
    /// Wrong state or name taken (409).
    Conflict,
    /// Not enough of something right now (409 in the hypeman API).
    Exhausted,
    /// The guest did not answer in time (504).
    Timeout,
    /// The host or the guest failed (500).
    Failed,
}

impl CoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) => ErrorKind::Invalid,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Conflict(_) => ErrorKind::Conflict,
            Self::Exhausted(_) => ErrorKind::Exhausted,
            Self::Timeout(_) => ErrorKind::Timeout,
            Self::Agent(e) => e.kind(),
            Self::Handoff(e) => e.kind(),
            Self::Vmm { .. }
            | Self::Net { .. }
            | Self::Io { .. }
            | Self::Store(_)
            | Self::Image(_)
            | Self::VmExited(_)
            | Self::Internal(_) => ErrorKind::Failed,
        }
    }

    /// Stable machine-readable code for the API's `{code, message}` body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_request",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Exhausted(_) => "exhausted",
            Self::Timeout(_) => "timeout",
            Self::Vmm { .. } => "vmm_error",
            Self::Net { .. } => "network_error",
            Self::Io { .. } => "io_error",
            Self::Store(_) => "store_error",
            Self::Image(_) => "image_error",
            Self::VmExited(_) => "vm_exited",
            Self::Agent(e) => e.code(),
            Self::Handoff(e) => e.code(),
            Self::Internal(_) => "internal_error",
        }
    }

    pub(crate) fn vmm(context: impl Into<String>) -> impl FnOnce(forkvm_vmm::VmmError) -> Self {
        let context = context.into();
        move |source| Self::Vmm {
            context,
            source: Box::new(source),
        }
    }

    pub(crate) fn net(context: impl Into<String>) -> impl FnOnce(forkvm_net::NetError) -> Self {
        let context = context.into();
        move |source| Self::Net {
            context,
            source: Box::new(source),
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn host_failures_keep_their_source() {
        let e = CoreError::io("create /x")(std::io::Error::other("disk full"));
        assert_eq!(e.to_string(), "create /x: disk full");
        assert_eq!(e.source().unwrap().to_string(), "disk full");
        assert_eq!((e.kind(), e.code()), (ErrorKind::Failed, "io_error"));
    }
}
