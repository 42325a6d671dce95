//! forkvm: running a command in an instance through its guest agent.

use crate::error::ApiError;
use forkvm_core as core;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// forkvm: `POST /instances/{id}/exec` body.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ExecParams {
    /// argv; must not be empty.
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Data written to the command's stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill the command after this many seconds (default 600). An instance
    /// runs at most 16 execs at once; more get 409.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    /// Fields forkvm does not support: 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "super::Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: super::Unsupported,
}

impl ExecParams {
    pub fn into_core(self) -> Result<core::ExecRequest, ApiError> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(ApiError::invalid("command must be a non-empty argv"));
        }
        if self.timeout_s == Some(0) {
            return Err(ApiError::invalid("timeout_s must be at least 1"));
        }
        Ok(core::ExecRequest {
            command: self.command,
            env: self.env.unwrap_or_default(),
            stdin: self.stdin,
            timeout_s: self.timeout_s,
        })
    }
}

/// forkvm: result of an exec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl From<core::ExecResult> for ExecResponse {
    fn from(r: core::ExecResult) -> Self {
        Self {
            exit_code: r.exit_code,
            stdout: r.stdout,
            stderr: r.stderr,
            timed_out: r.timed_out,
            duration_ms: r.duration_ms,
        }
    }
}
