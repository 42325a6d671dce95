//! Wire types: the JSON bodies of the REST API.
//!
//! Field names, states and shapes follow the hypeman API (its Python client
//! parses these unchanged); forkvm's additions are extra fields only. These
//! types derive both `Serialize` and `Deserialize` so the CLI client can reuse
//! them.

use crate::error::ApiError;
use chrono::{DateTime, Utc};
use forkvm_core as core;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// Error body of every non-2xx response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `invalid_request`, `not_found`.
    #[schema(example = "not_found")]
    pub code: String,
    /// Human-readable description.
    pub message: String,
}

/// `GET /health` response.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
    /// forkvm version.
    pub version: String,
}

/// Instance lifecycle state, spelled as hypeman spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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

impl From<core::InstanceState> for InstanceState {
    fn from(s: core::InstanceState) -> Self {
        use core::InstanceState as C;
        match s {
            C::Created => Self::Created,
            C::Initializing => Self::Initializing,
            C::Running => Self::Running,
            C::Paused => Self::Paused,
            C::Shutdown => Self::Shutdown,
            C::Stopped => Self::Stopped,
            C::Standby => Self::Standby,
            C::Unknown => Self::Unknown,
        }
    }
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
}

/// Network identity of an instance (hypeman's `Instance.network` plus forkvm extras).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceNetwork {
    /// Whether the instance is attached to the default network.
    pub enabled: bool,
    /// Assigned IPv4 address (null without network).
    pub ip: Option<String>,
    /// Assigned MAC address (null without network).
    pub mac: Option<String>,
    /// Network name: always "default" when enabled (hypeman's meaning).
    pub name: Option<String>,
    /// forkvm: host TAP device of the instance.
    #[serde(default)]
    pub tap: Option<String>,
    /// forkvm: default gateway given to the guest.
    #[serde(default)]
    pub gateway: Option<String>,
    /// forkvm: prefix length of the instance network.
    #[serde(default)]
    pub prefix_len: Option<u8>,
    /// forkvm: host bridge the TAP is attached to.
    #[serde(default)]
    pub bridge: Option<String>,
}

/// An instance as returned by the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    /// Unique identifier.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Guest image name.
    pub image: String,
    pub state: InstanceState,
    /// Why the instance is in its state when that is not the happy path.
    #[serde(default)]
    pub state_error: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub stopped_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub vcpus: u32,
    /// Base memory size, human-readable (e.g. "256MB", "1GB").
    #[serde(default)]
    #[schema(example = "256MB")]
    pub size: String,
    /// Always "qemu".
    #[serde(default)]
    #[schema(example = "qemu")]
    pub hypervisor: String,
    /// Whether a snapshot exists for this instance.
    #[serde(default)]
    pub has_snapshot: bool,
    #[serde(default)]
    pub network: InstanceNetwork,
    /// forkvm: memory in MiB.
    #[serde(default)]
    pub memory_mb: u32,
    /// forkvm: the argv the guest runs (entrypoint followed by cmd).
    #[serde(default)]
    pub command: Vec<String>,
    /// forkvm: QEMU process id while a VMM exists.
    #[serde(default)]
    pub pid: Option<u32>,
    /// forkvm: accelerator of the current/last VMM ("tcg" or "kvm").
    #[serde(default)]
    pub accel: Option<String>,
    /// forkvm: the snapshot holding this instance's state while in Standby.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// forkvm: the instance or snapshot this one was forked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<String>,
    /// forkvm: how the network identity reached the guest after the last
    /// fork or restore, with per-stage timings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Handoff>,
}

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

impl From<&core::Instance> for Instance {
    fn from(i: &core::Instance) -> Self {
        let n = &i.network;
        Self {
            id: i.id.clone(),
            name: i.name.clone(),
            image: i.image.clone(),
            state: i.state.into(),
            state_error: i.state_error.clone(),
            created_at: i.created_at,
            started_at: i.started_at,
            stopped_at: i.stopped_at,
            env: i.env.clone(),
            vcpus: i.vcpus,
            size: format_size_mb(i.memory_mb),
            hypervisor: "qemu".into(),
            has_snapshot: i.snapshot_id.is_some(),
            network: InstanceNetwork {
                enabled: n.enabled,
                ip: n.ip.map(|ip| ip.to_string()),
                mac: n.mac.map(|m| m.to_string()),
                name: n.enabled.then(|| "default".to_string()),
                tap: n.tap.clone(),
                gateway: n.gateway.map(|ip| ip.to_string()),
                prefix_len: n.prefix_len,
                bridge: n.bridge.clone(),
            },
            memory_mb: i.memory_mb,
            command: i.entrypoint.clone(),
            pid: i.pid,
            accel: i.accel.clone(),
            snapshot_id: i.snapshot_id.clone(),
            forked_from: i.forked_from.clone(),
            handoff: i.handoff.as_ref().map(Handoff::from),
        }
    }
}

impl From<core::Instance> for Instance {
    fn from(i: core::Instance) -> Self {
        Self::from(&i)
    }
}

/// `network` object of a create request. Other hypeman fields (bandwidth,
/// egress) are accepted and ignored.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct NetworkParams {
    /// Attach the instance to the default network (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// `POST /instances` body: hypeman's InstanceCreateParams subset plus forkvm
/// extras. Unknown fields are ignored so hypeman clients can send theirs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct InstanceCreateParams {
    /// Lowercase letters, digits and dashes; not starting or ending with a dash; ≤ 63.
    pub name: String,
    /// Guest image; default "default".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Base memory, human-readable: "256MB", "1GB", "512MiB", "2G".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// forkvm: memory in MiB (alternative to `size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// argv prefix; the guest runs `entrypoint ++ cmd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Only "qemu" is available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkParams>,
}

impl InstanceCreateParams {
    /// Validate and convert into the core's request.
    pub fn into_core(self) -> Result<core::CreateRequest, ApiError> {
        core::validate_name(&self.name)?;
        if self.vcpus == Some(0) {
            return Err(ApiError::invalid("vcpus must be at least 1"));
        }
        if let Some(h) = &self.hypervisor
            && h != "qemu"
        {
            return Err(ApiError::invalid(format!(
                "hypervisor {h:?} is not available: forkvm runs \"qemu\" only"
            )));
        }
        let from_size = self
            .size
            .as_deref()
            .map(parse_size_mb)
            .transpose()
            .map_err(ApiError::invalid)?;
        let memory_mb = match (from_size, self.memory_mb) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::invalid(format!(
                    "size ({a} MiB) and memory_mb ({b}) disagree"
                )));
            }
            (_, Some(0)) => return Err(ApiError::invalid("memory_mb must be at least 1")),
            (a, b) => a.or(b),
        };
        let mut argv = self.entrypoint.unwrap_or_default();
        argv.extend(self.cmd.unwrap_or_default());
        Ok(core::CreateRequest {
            name: self.name,
            image: self.image,
            vcpus: self.vcpus,
            memory_mb,
            env: self.env.unwrap_or_default(),
            entrypoint: argv,
            network_enabled: self.network.and_then(|n| n.enabled),
        })
    }
}

/// Optional body of `POST /instances/{id}/start` (hypeman's InstanceStartParams).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct InstanceStartParams {
    /// Not supported yet: overriding the command on start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Not supported yet: overriding the entrypoint on start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
}

/// Final state of a fork.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ForkTargetState {
    Stopped,
    Standby,
    Running,
}

impl From<ForkTargetState> for core::InstanceState {
    fn from(s: ForkTargetState) -> Self {
        match s {
            ForkTargetState::Stopped => Self::Stopped,
            ForkTargetState::Standby => Self::Standby,
            ForkTargetState::Running => Self::Running,
        }
    }
}

/// Most forks one request may ask for.
pub const MAX_FORK_COUNT: u32 = 64;

/// `POST /instances/{id}/fork` body: hypeman's InstanceForkParams plus the
/// forkvm extras `count` and `wait_for_network`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct InstanceForkParams {
    /// Name of the new instance; with `count`, forks are named `name-1` … `name-N`.
    pub name: String,
    /// Allow forking a running source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_running: Option<bool>,
    /// Final state of the fork (default: the source's state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_state: Option<ForkTargetState>,
    /// forkvm: make this many forks (1–64). The response is then an array of
    /// [`ForkOutcome`], one per fork, instead of a single instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub count: Option<u32>,
    /// forkvm: return only once the fork answers on its new address (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_network: Option<bool>,
    /// forkvm: fastest handoff path to try (default `mailbox`, falling back
    /// to `rpc`, then `exec`); `rpc` or `exec` skip the faster ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffPath>,
}

impl InstanceForkParams {
    /// Validate and convert into the core's request.
    pub fn into_core(self) -> Result<core::ForkRequest, ApiError> {
        validate_fork(&self.name, self.count)?;
        Ok(core::ForkRequest {
            name: self.name,
            from_running: self.from_running.unwrap_or(false),
            target_state: self.target_state.map(Into::into),
            count: self.count,
            wait_for_network: self.wait_for_network,
            handoff: self.handoff.map(Into::into),
        })
    }
}

/// The name and count rules shared by both fork endpoints: `count` in
/// 1..=64 and every derived name (`name-N`) a valid instance name.
fn validate_fork(name: &str, count: Option<u32>) -> Result<(), ApiError> {
    core::validate_name(name)?;
    if let Some(n) = count {
        if !(1..=MAX_FORK_COUNT).contains(&n) {
            return Err(ApiError::invalid(format!(
                "count must be between 1 and {MAX_FORK_COUNT}, got {n}"
            )));
        }
        // The longest derived name is the last one.
        core::validate_name(&format!("{name}-{n}"))?;
    }
    Ok(())
}

/// One entry of a batch fork's response: the new instance, or why that fork failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ForkOutcome {
    Created(Box<Instance>),
    Failed(ForkFailure),
}

impl ForkOutcome {
    /// The fork's name, whether it succeeded or not.
    pub fn name(&self) -> &str {
        match self {
            Self::Created(i) => &i.name,
            Self::Failed(f) => &f.name,
        }
    }
}

/// Body of a 201 from a fork endpoint: one instance without `count`, an
/// array with one entry per fork with `count`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ForkResponse {
    One(Box<Instance>),
    Many(Vec<ForkOutcome>),
}

/// A fork of a batch that failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForkFailure {
    /// The name the fork would have had.
    #[schema(example = "web-fork-3")]
    pub name: String,
    pub error: ErrorBody,
}

/// Snapshot kind (hypeman's SnapshotKind). forkvm snapshots are always
/// `Standby` (memory and device state of a running VM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum SnapshotKind {
    Standby,
    Stopped,
}

/// `POST /instances/{id}/snapshots` body (hypeman's SnapshotCreateParams).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SnapshotCreateParams {
    /// Only `Standby` is supported; `Stopped` is answered with 400 `unsupported`.
    pub kind: SnapshotKind,
    /// Lowercase letters, digits and dashes; ≤ 63.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Not supported yet: non-empty tags are answered with 501.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// Not supported: `{"enabled": true}` is answered with 400 `unsupported`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub compression: Option<serde_json::Value>,
}

impl SnapshotCreateParams {
    /// Validate; returns the snapshot name to pass to the core.
    pub fn validate(self) -> Result<Option<String>, ApiError> {
        if let Some(n) = &self.name {
            core::validate_name(n)?;
        }
        if self.kind == SnapshotKind::Stopped {
            return Err(ApiError::unsupported(
                "\"Stopped\" snapshots (disk only) are not supported yet: use kind \"Standby\"",
            ));
        }
        if self.tags.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::unsupported("snapshot tags are not supported yet"));
        }
        reject_compression(self.compression.as_ref())?;
        Ok(self.name)
    }
}

/// Snapshot compression (hypeman's SnapshotCompressionConfig) is accepted
/// when it asks for nothing; enabling it gets a 400 `unsupported` rather than
/// being ignored.
pub fn reject_compression(c: Option<&serde_json::Value>) -> Result<(), ApiError> {
    if c.and_then(|c| c.get("enabled"))
        .and_then(serde_json::Value::as_bool)
        == Some(true)
    {
        return Err(ApiError::unsupported(
            "snapshot compression is not supported",
        ));
    }
    Ok(())
}

/// Optional body of `POST /instances/{id}/standby` (hypeman's
/// InstanceStandbyParams; its client always sends at least `{}`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct InstanceStandbyParams {
    /// Not supported: `{"enabled": true}` is answered with 400 `unsupported`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub compression: Option<serde_json::Value>,
    /// Accepted and ignored (there is no compression to delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_delay: Option<String>,
}

/// `POST /snapshots/{snapshot_id}/fork` body: hypeman's SnapshotForkParams
/// plus the forkvm extras `count` and `wait_for_network`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct SnapshotForkParams {
    /// Name of the new instance; with `count`, forks are named `name-1` … `name-N`.
    pub name: String,
    /// Only "qemu" (the snapshot's own hypervisor) is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_hypervisor: Option<String>,
    /// Final state of the fork (default Running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_state: Option<ForkTargetState>,
    /// forkvm: make this many forks (1–64); the response is then an array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub count: Option<u32>,
    /// forkvm: return only once the fork answers on its new address (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_network: Option<bool>,
    /// forkvm: fastest handoff path to try (default `mailbox`, falling back
    /// to `rpc`, then `exec`); `rpc` or `exec` skip the faster ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffPath>,
}

impl SnapshotForkParams {
    /// Validate and convert into the core's request.
    pub fn into_core(self) -> Result<core::ForkRequest, ApiError> {
        validate_fork(&self.name, self.count)?;
        if let Some(h) = &self.target_hypervisor
            && h != "qemu"
        {
            return Err(ApiError::invalid(format!(
                "target_hypervisor {h:?} is not available: forkvm snapshots fork on \"qemu\" only"
            )));
        }
        Ok(core::ForkRequest {
            name: self.name,
            from_running: false,
            target_state: self.target_state.map(Into::into),
            count: self.count,
            wait_for_network: self.wait_for_network,
            handoff: self.handoff.map(Into::into),
        })
    }
}

/// forkvm: the network identity a snapshot carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotNetwork {
    pub enabled: bool,
    pub ip: Option<String>,
    pub mac: Option<String>,
}

/// A snapshot as returned by the API (hypeman's Snapshot plus forkvm extras).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub id: String,
    pub created_at: DateTime<Utc>,
    /// Always `Standby`: memory and device state of a running VM.
    pub kind: SnapshotKind,
    /// Bytes used on the host (device state plus allocated memory blocks).
    pub size_bytes: u64,
    /// Always "qemu".
    #[schema(example = "qemu")]
    pub source_hypervisor: String,
    pub source_instance_id: String,
    pub source_instance_name: String,
    #[serde(default)]
    pub name: Option<String>,
    /// forkvm: guest image of the source.
    #[serde(default)]
    pub image: String,
    /// forkvm: vCPUs of the source (forks get the same).
    #[serde(default)]
    pub vcpus: u32,
    /// forkvm: memory of the source in MiB (forks get the same).
    #[serde(default)]
    pub memory_mb: u32,
    /// forkvm: the source's network identity at snapshot time.
    #[serde(default)]
    pub network: SnapshotNetwork,
    /// forkvm: set when this is the state of an instance in Standby (it
    /// goes away when that instance is restored or deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_of: Option<String>,
}

impl From<&core::Snapshot> for Snapshot {
    fn from(s: &core::Snapshot) -> Self {
        Self {
            id: s.id.clone(),
            created_at: s.created_at,
            kind: SnapshotKind::Standby,
            size_bytes: s.size_bytes,
            source_hypervisor: "qemu".into(),
            source_instance_id: s.source_instance_id.clone(),
            source_instance_name: s.source_instance_name.clone(),
            name: s.name.clone(),
            image: s.image.clone(),
            vcpus: s.vcpus,
            memory_mb: s.memory_mb,
            network: SnapshotNetwork {
                enabled: s.network.enabled,
                ip: s.network.ip.map(|ip| ip.to_string()),
                mac: s.network.mac.map(|m| m.to_string()),
            },
            standby_of: s.standby_of.clone(),
        }
    }
}

/// Query of `GET /snapshots` (hypeman's SnapshotListParams; `tags` is ignored).
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SnapshotListQuery {
    /// Only snapshots of this kind.
    pub kind: Option<SnapshotKind>,
    /// Only snapshots with this name.
    pub name: Option<String>,
    /// Only snapshots of this source instance (id).
    pub source_instance_id: Option<String>,
}

impl SnapshotListQuery {
    pub fn matches(&self, s: &Snapshot) -> bool {
        self.kind.is_none_or(|k| k == s.kind)
            && self
                .name
                .as_ref()
                .is_none_or(|n| s.name.as_ref() == Some(n))
            && self
                .source_instance_id
                .as_ref()
                .is_none_or(|id| *id == s.source_instance_id)
    }
}

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
    /// Kill the command after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
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

/// Query of `GET /instances`.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only instances in this state.
    pub state: Option<InstanceState>,
}

/// Query of `GET /instances/{id}/logs`.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Number of lines to return from the end.
    pub tail: Option<usize>,
    /// Streaming new lines is not supported yet: `true` is answered with 400 `unsupported`.
    pub follow: Option<bool>,
    /// Log source: only "app" (serial console) is available.
    pub source: Option<String>,
}

/// Query of `DELETE /instances/{id}` (accepted, ignored: deletion always stops the VM).
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    pub graceful_shutdown: Option<bool>,
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// Parse a human-readable memory size into MiB.
///
/// Accepts an integer followed by an optional unit: none/`B` (bytes),
/// `K`/`KB`/`KiB`, `M`/`MB`/`MiB`, `G`/`GB`/`GiB`, `T`/`TB`/`TiB`, case-insensitive;
/// units are binary like hypeman's. The result must be a whole, non-zero
/// number of MiB that fits in u32. Hand-rolled: the grammar is tiny and a crate
/// would accept more (decimals, SI units) than we want.
pub fn parse_size_mb(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid size {s:?}: use e.g. \"256MB\", \"1GB\", \"512MiB\"");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => TIB,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if bytes == 0 {
        return Err(format!("invalid size {s:?}: must be more than zero"));
    }
    if !bytes.is_multiple_of(MIB) {
        return Err(format!("invalid size {s:?}: must be a whole number of MiB"));
    }
    u32::try_from(bytes / MIB).map_err(|_| format!("invalid size {s:?}: too large"))
}

/// Format MiB the way hypeman prints sizes: "1GB" when whole GiB, else "256MB".
pub fn format_size_mb(mb: u32) -> String {
    if mb != 0 && mb.is_multiple_of(1024) {
        format!("{}GB", mb / 1024)
    } else {
        format!("{mb}MB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (s, mb) in [
            ("256MB", 256),
            ("256mb", 256),
            ("1GB", 1024),
            ("2G", 2048),
            ("512MiB", 512),
            ("512 MiB", 512),
            ("1048576", 1),
            ("1024K", 1),
            ("1TiB", 1024 * 1024),
        ] {
            assert_eq!(parse_size_mb(s), Ok(mb), "{s}");
        }
        for s in [
            "",
            "MB",
            "0MB",
            "1.5GB",
            "-1GB",
            "12XB",
            "100",
            "1KB",
            "abc",
            "1 G B",
            "99999999T",
        ] {
            assert!(parse_size_mb(s).is_err(), "{s}");
        }
        assert_eq!(format_size_mb(256), "256MB");
        assert_eq!(format_size_mb(1024), "1GB");
        assert_eq!(format_size_mb(1536), "1536MB");
    }

    #[test]
    fn create_params_conversion() {
        let p: InstanceCreateParams = serde_json::from_str(
            r#"{"name":"web-1","image":"x","size":"1GB","entrypoint":["/bin/sh"],"cmd":["-c","true"],
                "network":{"enabled":false,"bandwidth_upload":"1Gbps"},"tags":{"a":"b"},"ttl":"1h"}"#,
        )
        .unwrap();
        let r = p.into_core().unwrap();
        assert_eq!(r.memory_mb, Some(1024));
        assert_eq!(r.entrypoint, vec!["/bin/sh", "-c", "true"]);
        assert_eq!(r.network_enabled, Some(false));

        let p = InstanceCreateParams {
            name: "a".into(),
            size: Some("256MB".into()),
            memory_mb: Some(512),
            ..Default::default()
        };
        assert!(p.into_core().is_err());
    }
}

#[cfg(test)]
mod shape_tests {
    use super::*;

    /// The exact JSON of an instance; the same text is fed to the hypeman
    /// Python client's `Instance` model in the compatibility check.
    #[test]
    fn instance_json_shape() {
        let core_inst = core::Instance {
            id: "i-1".into(),
            name: "web-1".into(),
            image: "default".into(),
            state: core::InstanceState::Running,
            state_error: None,
            vcpus: 2,
            memory_mb: 1024,
            env: [("A".to_string(), "1".to_string())].into(),
            entrypoint: vec!["sleep".into(), "9".into()],
            network: core::NetworkInfo {
                enabled: true,
                ip: "10.88.0.2".parse().ok(),
                mac: "02:fc:00:00:00:02".parse().ok(),
                tap: Some("fvtap0".into()),
                gateway: "10.88.0.1".parse().ok(),
                prefix_len: Some(16),
                bridge: Some("forkvm0".into()),
            },
            created_at: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            started_at: None,
            stopped_at: None,
            pid: Some(42),
            accel: Some("tcg".into()),
            snapshot_id: None,
            forked_from: None,
            pending_handoff: false,
            handoff: None,
            cmdline: None,
            mailbox: None,
        };
        let v = serde_json::to_value(Instance::from(&core_inst)).unwrap();
        let expected: serde_json::Value = serde_json::from_str(
            r#"{"id":"i-1","name":"web-1","image":"default","state":"Running","state_error":null,
                "created_at":"2026-01-01T00:00:00Z","started_at":null,"stopped_at":null,
                "env":{"A":"1"},"vcpus":2,"size":"1GB","hypervisor":"qemu","has_snapshot":false,
                "network":{"enabled":true,"ip":"10.88.0.2","mac":"02:fc:00:00:00:02","name":"default",
                           "tap":"fvtap0","gateway":"10.88.0.1","prefix_len":16,"bridge":"forkvm0"},
                "memory_mb":1024,"command":["sleep","9"],"pid":42,"accel":"tcg"}"#,
        )
        .unwrap();
        assert_eq!(v, expected);
        // and it reads back (the CLI deserializes it)
        let back: Instance = serde_json::from_value(v).unwrap();
        assert_eq!(back.network.name.as_deref(), Some("default"));
    }

    /// A forked core instance, built from JSON so that fields the core adds
    /// later (with serde defaults) don't break this test.
    fn sample_core() -> core::Instance {
        serde_json::from_value(serde_json::json!({
            "id": "i-2", "name": "web-fork", "image": "default", "state": "Running",
            "state_error": null, "vcpus": 1, "memory_mb": 256, "env": {}, "entrypoint": [],
            "network": {"enabled": true, "ip": "10.88.0.3", "mac": "02:fc:00:00:00:03",
                        "tap": null, "gateway": null, "prefix_len": null, "bridge": null},
            "created_at": "2026-01-01T00:00:00Z", "started_at": null, "stopped_at": null,
            "pid": null, "accel": null, "snapshot_id": "s-1", "forked_from": "i-1",
            "pending_handoff": false,
            "handoff": {"path": "mailbox", "fallback_reason": null, "error": null,
                        "stages_ms": {"network_ready": 12.5, "total": 80.0}}
        }))
        .expect("core::Instance JSON")
    }

    /// Fork extras appear only when set, `has_snapshot` follows `snapshot_id`.
    #[test]
    fn fork_extras() {
        let v = serde_json::to_value(Instance::from(&sample_core())).unwrap();
        assert_eq!(v["has_snapshot"], true);
        assert_eq!(v["snapshot_id"], "s-1");
        assert_eq!(v["forked_from"], "i-1");
        assert_eq!(
            v["handoff"],
            serde_json::json!({"path":"mailbox","fallback_reason":null,"error":null,
                               "stages_ms":{"network_ready":12.5,"total":80.0}})
        );
        let back: Instance = serde_json::from_value(v).unwrap();
        assert_eq!(back.handoff.unwrap().path, Some(HandoffPath::Mailbox));
    }

    /// A batch response distinguishes instances from failures on read-back.
    #[test]
    fn fork_response_shapes() {
        let ok = Instance::from(&sample_core());
        let many = ForkResponse::Many(vec![
            ForkOutcome::Created(Box::new(ok.clone())),
            ForkOutcome::Failed(ForkFailure {
                name: "web-fork-2".into(),
                error: ErrorBody {
                    code: "exhausted".into(),
                    message: "no free address".into(),
                },
            }),
        ]);
        let v = serde_json::to_value(&many).unwrap();
        assert_eq!(v[0]["id"], "i-2");
        assert_eq!(
            v[1],
            serde_json::json!({"name":"web-fork-2","error":{"code":"exhausted","message":"no free address"}})
        );
        let back: ForkResponse = serde_json::from_value(v).unwrap();
        assert_eq!(back, many);
        let one: ForkResponse = serde_json::from_value(serde_json::to_value(&ok).unwrap()).unwrap();
        assert_eq!(one, ForkResponse::One(Box::new(ok)));
    }

    #[test]
    fn fork_params_validation() {
        let p = |name: &str, count: Option<u32>| InstanceForkParams {
            name: name.into(),
            count,
            ..Default::default()
        };
        let r = p("web", Some(64)).into_core().unwrap();
        assert_eq!(r.count, Some(64));
        assert!(!r.from_running);
        for bad in [
            p("web", Some(0)),
            p("web", Some(65)),
            p("Web", None),
            p("", None),
        ] {
            assert!(bad.into_core().is_err());
        }
        // the derived names must be valid too: 61 chars + "-10" is too long
        assert!(p(&"a".repeat(61), Some(9)).into_core().is_ok());
        assert!(p(&"a".repeat(61), Some(10)).into_core().is_err());

        let s: SnapshotForkParams = serde_json::from_str(
            r#"{"name":"f","target_hypervisor":"qemu","target_state":"Standby"}"#,
        )
        .unwrap();
        let r = s.into_core().unwrap();
        assert_eq!(r.target_state, Some(core::InstanceState::Standby));
        let s: SnapshotForkParams =
            serde_json::from_str(r#"{"name":"f","target_hypervisor":"firecracker"}"#).unwrap();
        assert_eq!(s.into_core().unwrap_err().status.as_u16(), 400);
    }

    #[test]
    fn snapshot_shape_parses_as_hypeman_snapshot() {
        let core_snap = core::Snapshot {
            id: "s-1".into(),
            name: Some("warm".into()),
            source_instance_id: "i-1".into(),
            source_instance_name: "web-1".into(),
            created_at: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            image: "default".into(),
            vcpus: 1,
            memory_mb: 256,
            env: Default::default(),
            entrypoint: vec![],
            cmdline: "console=ttyS0".into(),
            network: core::NetworkInfo {
                enabled: true,
                ip: "10.88.0.2".parse().ok(),
                mac: "02:fc:00:00:00:02".parse().ok(),
                tap: Some("fvtap0".into()),
                gateway: None,
                prefix_len: None,
                bridge: None,
            },
            size_bytes: 4096,
            standby_of: None,
            mailbox: None,
        };
        let v = serde_json::to_value(Snapshot::from(&core_snap)).unwrap();
        let expected: serde_json::Value = serde_json::from_str(
            r#"{"id":"s-1","created_at":"2026-01-01T00:00:00Z","kind":"Standby","size_bytes":4096,
                "source_hypervisor":"qemu","source_instance_id":"i-1","source_instance_name":"web-1",
                "name":"warm","image":"default","vcpus":1,"memory_mb":256,
                "network":{"enabled":true,"ip":"10.88.0.2","mac":"02:fc:00:00:00:02"}}"#,
        )
        .unwrap();
        assert_eq!(v, expected);
        let q = SnapshotListQuery {
            source_instance_id: Some("i-9".into()),
            ..Default::default()
        };
        assert!(!q.matches(&Snapshot::from(&core_snap)));
        assert!(SnapshotListQuery::default().matches(&Snapshot::from(&core_snap)));
    }
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

impl From<HandoffPath> for core::HandoffPath {
    fn from(p: HandoffPath) -> Self {
        match p {
            HandoffPath::Mailbox => core::HandoffPath::Mailbox,
            HandoffPath::Rpc => core::HandoffPath::Rpc,
            HandoffPath::Exec => core::HandoffPath::Exec,
        }
    }
}
