//! forkvm: running a command in an instance through its guest agent.

use crate::error::ApiError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
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
    /// Data written to the command's stdin (base64 when `encoding` is
    /// `base64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// How `stdin`, `stdout` and `stderr` carry bytes: `utf8` (default;
    /// output that is not UTF-8 is shown with replacement characters) or
    /// `base64` (any bytes, round-trip exact).
    #[serde(default)]
    pub encoding: ExecEncoding,
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
        let stdin = match (self.stdin, self.encoding) {
            (None, _) => None,
            (Some(s), ExecEncoding::Utf8) => Some(s.into_bytes()),
            (Some(s), ExecEncoding::Base64) => Some(
                B64.decode(s.as_bytes())
                    .map_err(|e| ApiError::invalid(format!("stdin is not base64: {e}")))?,
            ),
        };
        Ok(core::ExecRequest {
            command: self.command,
            env: self.env.unwrap_or_default(),
            stdin,
            timeout_s: self.timeout_s,
        })
    }
}

/// forkvm: how an exec's stdin and output travel in JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecEncoding {
    #[default]
    Utf8,
    Base64,
}

/// forkvm: result of an exec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The request's encoding of `stdout` and `stderr`.
    #[serde(default)]
    pub encoding: ExecEncoding,
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl ExecResponse {
    pub fn new(r: core::ExecResult, encoding: ExecEncoding) -> Self {
        let text = |b: Vec<u8>| match encoding {
            ExecEncoding::Utf8 => String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            ExecEncoding::Base64 => B64.encode(b),
        };
        Self {
            exit_code: r.exit_code,
            stdout: text(r.stdout),
            stderr: text(r.stderr),
            encoding,
            timed_out: r.timed_out,
            duration_ms: r.duration_ms,
        }
    }
}
