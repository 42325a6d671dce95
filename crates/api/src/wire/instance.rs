//! Instances: the instance as returned by the API, its state and network
//! identity, and the bodies and queries of the instance endpoints (create,
//! start, list, delete).

use super::handoff::Handoff;
use super::ports::{EgressParam, PublishedPort};
use super::size::{format_size_mb, parse_size_mb};
use super::unknown::Unsupported;
use crate::error::ApiError;
use chrono::{DateTime, Utc};
use forkvm_core as core;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

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

impl From<InstanceState> for core::InstanceState {
    fn from(s: InstanceState) -> Self {
        use core::InstanceState as C;
        match s {
            InstanceState::Created => C::Created,
            InstanceState::Initializing => C::Initializing,
            InstanceState::Running => C::Running,
            InstanceState::Paused => C::Paused,
            InstanceState::Shutdown => C::Shutdown,
            InstanceState::Stopped => C::Stopped,
            InstanceState::Standby => C::Standby,
            InstanceState::Unknown => C::Unknown,
        }
    }
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
    /// forkvm: the instance's traffic may leave the daemon's namespace
    /// (source NAT), unless the daemon runs with egress off.
    #[serde(default = "yes")]
    pub egress: bool,
}

fn yes() -> bool {
    true
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
    /// The user's key-value tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
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
    /// forkvm: the immutable base its memory maps copy-on-write (a fork);
    /// absent when it has its own memory file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// forkvm: host ports forwarded to the instance.
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
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
            tags: i.tags.clone(),
            network: InstanceNetwork {
                enabled: n.enabled,
                ip: n.ip.map(|ip| ip.to_string()),
                mac: n.mac.map(|m| m.to_string()),
                name: n.enabled.then(|| "default".to_string()),
                tap: n.tap.clone(),
                gateway: n.gateway.map(|ip| ip.to_string()),
                prefix_len: n.prefix_len,
                bridge: n.bridge.clone(),
                egress: n.egress,
            },
            ports: i.ports.iter().map(PublishedPort::from).collect(),
            memory_mb: i.memory_mb,
            command: i.entrypoint.clone(),
            pid: i.pid,
            accel: i.accel.clone(),
            snapshot_id: i.snapshot_id.clone(),
            forked_from: i.forked_from.clone(),
            handoff: i.handoff.as_ref().map(Handoff::from),
            base: i
                .state
                .has_vmm()
                .then(|| i.memory.base().map(str::to_string))
                .flatten(),
        }
    }
}

impl From<core::Instance> for Instance {
    fn from(i: core::Instance) -> Self {
        Self::from(&i)
    }
}

/// `network` object of a create request. Other hypeman fields (bandwidth)
/// are refused (400 `unsupported`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct NetworkParams {
    /// Attach the instance to the default network (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// forkvm: `false` keeps the instance's traffic inside the daemon's
    /// namespace (no source NAT); default true. hypeman's mediated-egress
    /// object is accepted and leaves direct egress on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressParam>,
    /// Fields forkvm does not support: 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "super::Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: super::Unsupported,
}

/// `POST /instances` body: hypeman's InstanceCreateParams subset plus forkvm
/// extras. Any other field is refused (400 `unsupported`), never ignored.
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
    /// Writable disk size of an OCI image instance, human-readable
    /// ("10GB"); default 4 GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_size: Option<String>,
    /// Only "qemu" is available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkParams>,
    /// forkvm: host ports forwarded to the instance (`409` when another
    /// instance publishes one of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PublishedPort>,
    /// Key-value tags (filter with `GET /instances?tags[k]=v`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// Fields forkvm does not support (hypeman's `volumes`, `ttl`, …):
    /// answered with 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: Unsupported,
}

impl InstanceCreateParams {
    /// Validate and convert into the core's request.
    pub fn into_core(self) -> Result<core::CreateRequest, ApiError> {
        self.unsupported.refuse("instance create")?;
        if let Some(n) = &self.network {
            n.unsupported.refuse("instance create: network")?;
        }
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
        let overlay_mib = self
            .overlay_size
            .as_deref()
            .map(parse_size_mb)
            .transpose()
            .map_err(ApiError::invalid)?;
        Ok(core::CreateRequest {
            name: self.name,
            image: self.image,
            vcpus: self.vcpus,
            memory_mb,
            env: self.env.unwrap_or_default(),
            entrypoint: self.entrypoint,
            cmd: self.cmd,
            overlay_mib: overlay_mib.map(u64::from),
            network_enabled: self.network.as_ref().and_then(|n| n.enabled),
            egress: self
                .network
                .as_ref()
                .and_then(|n| n.egress.as_ref())
                .map(EgressParam::direct),
            ports: self.ports.into_iter().map(Into::into).collect(),
            tags: self.tags.unwrap_or_default(),
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
    /// Fields forkvm does not support: 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "super::Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: super::Unsupported,
}

/// Query of `GET /instances`.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only instances in this state.
    pub state: Option<InstanceState>,
    /// `tags[key]=value`: only instances with every one of these tags.
    #[serde(flatten)]
    #[param(value_type = Option<Object>)]
    pub tags: BTreeMap<String, String>,
}

/// Query of `DELETE /instances/{id}` (accepted, ignored: deletion always stops the VM).
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    pub graceful_shutdown: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_params_conversion() {
        let p: InstanceCreateParams = serde_json::from_str(
            r#"{"name":"web-1","image":"x","size":"1GB","entrypoint":["/bin/sh"],"cmd":["-c","true"],
                "overlay_size":"2GB",
                "network":{"enabled":false}}"#,
        )
        .unwrap();
        let r = p.into_core().unwrap();
        assert_eq!(r.memory_mb, Some(1024));
        assert_eq!(r.entrypoint, Some(vec!["/bin/sh".to_string()]));
        assert_eq!(r.cmd, Some(vec!["-c".to_string(), "true".to_string()]));
        assert_eq!(r.overlay_mib, Some(2048));
        assert_eq!(r.network_enabled, Some(false));

        let p = InstanceCreateParams {
            name: "a".into(),
            size: Some("256MB".into()),
            memory_mb: Some(512),
            ..Default::default()
        };
        assert!(p.into_core().is_err());
    }

    /// The exact JSON of an instance; the same text is fed to the hypeman
    /// Python client's `Instance` model in the compatibility check.
    #[test]
    fn instance_json_shape() {
        let core_inst = core::Instance {
            tags: Default::default(),
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
                egress: true,
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
            memory: core::Memory::Own,
            vmm_gen: 0,
            handover: None,
            promoting: false,
            disk_top: None,
            handover_disk: None,
            workload: None,
            ports: vec![],
        };
        let v = serde_json::to_value(Instance::from(&core_inst)).unwrap();
        let expected: serde_json::Value = serde_json::from_str(
            r#"{"id":"i-1","name":"web-1","image":"default","state":"Running","state_error":null,
                "created_at":"2026-01-01T00:00:00Z","started_at":null,"stopped_at":null,
                "env":{"A":"1"},"vcpus":2,"size":"1GB","hypervisor":"qemu","has_snapshot":false,
                "network":{"enabled":true,"ip":"10.88.0.2","mac":"02:fc:00:00:00:02","name":"default",
                           "tap":"fvtap0","gateway":"10.88.0.1","prefix_len":16,"bridge":"forkvm0",
                           "egress":true},
                "memory_mb":1024,"command":["sleep","9"],"pid":42,"accel":"tcg","ports":[]}"#,
        )
        .unwrap();
        assert_eq!(v, expected);
        // and it reads back (the CLI deserializes it)
        let back: Instance = serde_json::from_value(v).unwrap();
        assert_eq!(back.network.name.as_deref(), Some("default"));
    }
}
