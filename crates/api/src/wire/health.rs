//! Liveness: the daemon's `GET /health` and what an instance's guest agent
//! reports about itself (`GET /instances/{id}/agent`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `GET /health` response.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
    /// forkvm version.
    pub version: String,
}

/// What the guest agent reports about itself (forkvm extra).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentHealth {
    pub version: String,
    pub boot_id: String,
    pub uptime_ms: u64,
    pub hostname: String,
    /// RPCs the agent served since boot, by method (a fork inherits its
    /// source's counters).
    pub rpc_counts: std::collections::BTreeMap<String, u64>,
    /// Marker id of the armed mailbox page (32 hex digits), if any.
    pub mailbox_marker: Option<String>,
    /// Guest-physical address of the mailbox page.
    pub mailbox_gpa: Option<u64>,
    pub mailbox_applied: u64,
    pub mailbox_rejected: u64,
    pub mailbox_applied_generation: u64,
}

impl From<forkvm_core::AgentHealth> for AgentHealth {
    fn from(h: forkvm_core::AgentHealth) -> Self {
        Self {
            version: h.version,
            boot_id: h.boot_id,
            uptime_ms: h.uptime_ms,
            hostname: h.hostname,
            rpc_counts: h.rpc_counts,
            mailbox_marker: h.mailbox.as_ref().map(|m| m.marker.clone()),
            mailbox_gpa: h.mailbox.as_ref().map(|m| m.gpa),
            mailbox_applied: h.mailbox_applied,
            mailbox_rejected: h.mailbox_rejected,
            mailbox_applied_generation: h.mailbox_applied_generation,
        }
    }
}
