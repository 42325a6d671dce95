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

impl NetworkInfo {
    /// Networking wanted (or not) but nothing allocated yet.
    pub fn unassigned(enabled: bool) -> Self {
        Self {
            enabled,
            ip: None,
            mac: None,
            tap: None,
            gateway: None,
            prefix_len: None,
            bridge: None,
        }
    }
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
    /// The snapshot holding this instance's memory and device state while it
    /// is in Standby.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Instance (or snapshot) this one was forked from.
    #[serde(default)]
    pub forked_from: Option<String>,
    /// The guest still carries another VM's network identity (a fork not yet
    /// re-addressed); the next restore must hand the new identity over.
    #[serde(default)]
    pub pending_handoff: bool,
    /// How the network identity reached the guest after the last fork/restore.
    #[serde(default)]
    pub handoff: Option<HandoffRecord>,
    /// Kernel command line of the current boot (kept for snapshots).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// The guest agent's armed mailbox page, as last reported.
    #[serde(default)]
    pub mailbox: Option<MailboxInfo>,
}

/// Where the guest agent's mailbox page is and how to recognise it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxInfo {
    /// Marker id, 32 hex digits.
    pub marker: String,
    /// Guest-physical address of the page.
    pub gpa: u64,
}

impl Instance {
    /// A new record in state Created: no VMM, no network claims yet.
    pub fn created(id: String, name: String, image: String, vcpus: u32, memory_mb: u32) -> Self {
        Self {
            id,
            name,
            image,
            state: InstanceState::Created,
            state_error: None,
            vcpus,
            memory_mb,
            env: BTreeMap::new(),
            entrypoint: vec![],
            network: NetworkInfo::unassigned(true),
            created_at: chrono::Utc::now(),
            started_at: None,
            stopped_at: None,
            pid: None,
            accel: None,
            snapshot_id: None,
            forked_from: None,
            pending_handoff: false,
            handoff: None,
            cmdline: None,
            mailbox: None,
        }
    }
}

/// Which way a fork learned its new network identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandoffPath {
    /// Guest-initiated through the snapshot-memory mailbox.
    Mailbox,
    /// Host-initiated ReconfigureNetwork RPC to the agent.
    Rpc,
    /// Host-initiated shell `ip` commands through the agent's Exec.
    Exec,
}

/// Timings of one fork, milliseconds per stage, plus the handoff path.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HandoffRecord {
    pub path: Option<HandoffPath>,
    /// Why a faster path was not used, when the fork fell back.
    pub fallback_reason: Option<String>,
    /// The error when the handoff failed.
    pub error: Option<String>,
    /// Stage name → milliseconds (allocate, snapshot, memory_prepare,
    /// vmm_start, state_load, resume, network_ready, total).
    pub stages_ms: BTreeMap<String, f64>,
}

impl HandoffRecord {
    pub fn stage(&mut self, name: &str, since: std::time::Instant) {
        self.stages_ms
            .insert(name.to_string(), since.elapsed().as_secs_f64() * 1000.0);
    }
}

/// A VM snapshot: device state plus an immutable copy of guest memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub name: Option<String>,
    pub source_instance_id: String,
    pub source_instance_name: String,
    pub created_at: DateTime<Utc>,
    /// What a restore needs to rebuild an identical machine.
    pub image: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub env: BTreeMap<String, String>,
    pub entrypoint: Vec<String>,
    /// The kernel command line the source booted with (kept identical).
    pub cmdline: String,
    /// The source's network identity at snapshot time.
    pub network: NetworkInfo,
    /// Bytes actually used on the host (state file + allocated memory blocks).
    pub size_bytes: u64,
    /// Owned by an instance in Standby (deleted when it is restored).
    pub standby_of: Option<String>,
    /// The source's mailbox at capture time (forks patch it before resume).
    #[serde(default)]
    pub mailbox: Option<MailboxInfo>,
}

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
