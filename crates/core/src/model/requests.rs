//! What clients ask for: create, fork and exec requests, and exec results.

use super::{HandoffPath, InstanceState, PublishedPort};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a client asks for when forking.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ForkRequest {
    pub name: String,
    pub from_running: bool,
    pub target_state: Option<InstanceState>,
    /// `None` = one fork named `name`; `Some(n)` = forks `name-1..n`.
    pub count: Option<u32>,
    /// Default true: return once the fork answers on its new address.
    pub wait_for_network: Option<bool>,
    /// Fastest handoff path to try (default mailbox: mailbox → rpc → exec).
    /// `rpc` skips the mailbox, `exec` goes straight to the shell path
    /// (benchmarks compare the paths with it).
    #[serde(default)]
    pub handoff: Option<HandoffPath>,
    /// Ports published for the fork (only with a single fork): a fork
    /// never inherits its source's.
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
}

/// What a client asks for when creating an instance.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CreateRequest {
    pub name: String,
    /// Guest image name; `None` or "default" = the built default image.
    pub image: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub env: BTreeMap<String, String>,
    /// Replaces the image's entrypoint (and drops its cmd).
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's cmd. For the `default` image the guest runs
    /// `entrypoint ++ cmd` from its initramfs, if any.
    pub cmd: Option<Vec<String>>,
    /// Size of the writable disk of an OCI image instance (MiB).
    pub overlay_mib: Option<u64>,
    /// Default true.
    pub network_enabled: Option<bool>,
    /// Default true: its traffic leaves the daemon's namespace (source NAT).
    pub egress: Option<bool>,
    /// Host ports forwarded to the instance.
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
    pub tags: BTreeMap<String, String>,
}

/// A command to run in an instance through the agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Bytes written to the command's stdin.
    pub stdin: Option<Vec<u8>>,
    pub timeout_s: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: i32,
    /// Raw output bytes (the agent caps each stream; the API encodes them).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
    pub duration_ms: u64,
}
