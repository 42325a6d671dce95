//! forkvm: the network handoff of a fork or restore, the path it took and
//! its per-stage timings.

use forkvm_core as core;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// forkvm: which way a fork learned its new network identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HandoffPath {
    /// Guest-initiated, through the mailbox page in snapshot memory.
    Mailbox,
    /// Host-initiated ReconfigureNetwork RPC to the guest agent.
    Rpc,
    /// Host-initiated shell `ip` commands through the agent's exec.
    Exec,
}

impl HandoffPath {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Mailbox => "mailbox",
            Self::Rpc => "rpc",
            Self::Exec => "exec",
        }
    }
}

impl From<core::HandoffPath> for HandoffPath {
    fn from(p: core::HandoffPath) -> Self {
        match p {
            core::HandoffPath::Mailbox => Self::Mailbox,
            core::HandoffPath::Rpc => Self::Rpc,
            core::HandoffPath::Exec => Self::Exec,
        }
    }
}

impl From<HandoffPath> for core::HandoffPath {
    fn from(p: HandoffPath) -> Self {
        match p {
            HandoffPath::Mailbox => core::HandoffPath::Mailbox,
            HandoffPath::Rpc => core::HandoffPath::Rpc,
            HandoffPath::Exec => core::HandoffPath::Exec,
        }
    }
}

/// forkvm: the network handoff of a fork or restore.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Handoff {
    /// Path taken; null while a handoff is still pending (`wait_for_network=false`).
    #[serde(default)]
    pub path: Option<HandoffPath>,
    /// Why a faster path was not used, when the fork fell back.
    #[serde(default)]
    pub fallback_reason: Option<String>,
    /// Why the handoff failed, if it did.
    #[serde(default)]
    pub error: Option<String>,
    /// Stage name → milliseconds (e.g. `vmm_start`, `state_load`, `resume`,
    /// `network_ready`, `total`).
    #[serde(default)]
    #[schema(example = json!({"resume": 2.1, "network_ready": 18.4, "total": 96.0}))]
    pub stages_ms: BTreeMap<String, f64>,
    /// Forged, stale or malformed ack datagrams the host ignored (forkvm
    /// extra; left out when none came).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub forged_acks: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl From<&core::HandoffRecord> for Handoff {
    fn from(h: &core::HandoffRecord) -> Self {
        Self {
            path: h.path.map(Into::into),
            fallback_reason: h.fallback_reason.clone(),
            error: h.error.clone(),
            stages_ms: h
                .stages_ms
                .iter()
                .map(|(s, ms)| (s.as_str().to_string(), *ms))
                .collect(),
            forged_acks: h.forged_acks,
        }
    }
}
