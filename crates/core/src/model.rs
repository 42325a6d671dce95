//! The domain model: instances and their network identity, as stored and as
//! returned to API clients.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Lifecycle states, spelled as the hypeman API spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum InstanceState {
    Created,
    Initializing,
    Running,
    Paused,
    Shutdown,
    Stopped,
    Standby,
    Unknown,
}

impl InstanceState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Created => "Created",
            Self::Initializing => "Initializing",
            Self::Running => "Running",
            Self::Paused => "Paused",
            Self::Shutdown => "Shutdown",
            Self::Stopped => "Stopped",
            Self::Standby => "Standby",
            Self::Unknown => "Unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Created" => Self::Created,
            "Initializing" => Self::Initializing,
            "Running" => Self::Running,
            "Paused" => Self::Paused,
            "Shutdown" => Self::Shutdown,
            "Stopped" => Self::Stopped,
            "Standby" => Self::Standby,
            "Unknown" => Self::Unknown,
            _ => return None,
        })
    }

    /// States in which a QEMU process is expected to exist.
    pub fn has_vmm(&self) -> bool {
        matches!(
            self,
            Self::Created | Self::Initializing | Self::Running | Self::Paused | Self::Shutdown
        )
    }
}

/// The network identity of an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub enabled: bool,
    pub ip: Option<String>,
    pub mac: Option<String>,
    pub tap: Option<String>,
    pub gateway: Option<String>,
    pub prefix_len: Option<u8>,
    pub bridge: Option<String>,
}

/// One instance, as stored in the state store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub name: String,
    pub image: String,
    pub state: InstanceState,
    /// Why the instance is in its state when that is not the happy path
    /// (e.g. "vmm exited while the daemon was down").
    pub state_error: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub env: BTreeMap<String, String>,
    pub entrypoint: Vec<String>,
    pub network: NetworkInfo,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub stopped_at: Option<DateTime<Utc>>,
    /// QEMU process id while a VMM exists.
    pub pid: Option<u32>,
    /// "tcg" or "kvm" for the current/last VMM.
    pub accel: Option<String>,
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
    pub entrypoint: Vec<String>,
    /// Default true.
    pub network_enabled: Option<bool>,
}

/// A command to run in an instance through the agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub stdin: Option<String>,
    pub timeout_s: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub duration_ms: u64,
}
