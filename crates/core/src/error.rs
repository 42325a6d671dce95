//! Typed errors of the core, each mapping to one API status class.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CoreError {
    /// Input the caller can fix (400).
    #[error("{0}")]
    Invalid(String),
    /// Unknown instance, snapshot or image (404).
    #[error("{0}")]
    NotFound(String),
    /// The request clashes with current state: name taken, wrong state (409).
    #[error("{0}")]
    Conflict(String),
    /// Capacity exhausted: IP pool, memory (507-like; the API maps it to 409 or 507).
    #[error("{0}")]
    Exhausted(String),
    /// The feature exists in the API but not for this case (501).
    #[error("{0}")]
    NotImplemented(String),
    /// The guest did not answer in time (504-like; the API maps it to 500 with the message).
    #[error("{0}")]
    Timeout(String),
    /// Everything else: host failures (500).
    #[error("{0}")]
    Internal(String),
}

impl CoreError {
    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{context}: {e}"))
    }
    /// Stable machine-readable code for the API's `{code, message}` body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_request",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Exhausted(_) => "exhausted",
            Self::NotImplemented(_) => "not_implemented",
            Self::Timeout(_) => "timeout",
            Self::Internal(_) => "internal_error",
        }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
