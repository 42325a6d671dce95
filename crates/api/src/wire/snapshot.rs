//! Snapshots: the snapshot as returned by the API, the create and list
//! parameters, and the compression options snapshot and standby requests
//! accept.

use crate::error::ApiError;
use chrono::{DateTime, Utc};
use forkvm_core as core;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

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
    /// Key-value tags (filter with `GET /snapshots?tags[k]=v`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// Not supported: `{"enabled": true}` is answered with 400 `unsupported`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub compression: Option<serde_json::Value>,
    /// Fields forkvm does not support: 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "super::Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: super::Unsupported,
}

impl SnapshotCreateParams {
    /// Validate; returns the snapshot name and tags to pass to the core.
    pub fn validate(self) -> Result<(Option<String>, BTreeMap<String, String>), ApiError> {
        self.unsupported.refuse("snapshot create")?;
        if let Some(n) = &self.name {
            core::validate_name(n)?;
        }
        if self.kind == SnapshotKind::Stopped {
            return Err(ApiError::unsupported(
                "\"Stopped\" snapshots (disk only) are not supported yet: use kind \"Standby\"",
            ));
        }
        reject_compression(self.compression.as_ref())?;
        Ok((self.name, self.tags.unwrap_or_default()))
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
    /// Accepted (there is no compression to delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_delay: Option<String>,
    /// Fields forkvm does not support: 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "super::Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: super::Unsupported,
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
    /// forkvm: the immutable base holding its memory (shared with forks
    /// and other snapshots of the same state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_id: Option<String>,
    /// The user's key-value tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
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
            base_id: Some(s.base().to_string()),
            tags: s.tags.clone(),
        }
    }
}

/// Every wanted tag is there with its value.
pub fn has_tags(have: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// Query of `GET /snapshots` (hypeman's SnapshotListParams).
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SnapshotListQuery {
    /// Only snapshots of this kind.
    pub kind: Option<SnapshotKind>,
    /// Only snapshots with this name.
    pub name: Option<String>,
    /// Only snapshots of this source instance (id).
    pub source_instance_id: Option<String>,
    /// `tags[key]=value`: only snapshots with every one of these tags.
    #[serde(flatten)]
    #[param(value_type = Option<Object>)]
    pub tags: BTreeMap<String, String>,
}

impl SnapshotListQuery {
    /// The filter as a predicate; a query key that is not a field or
    /// `tags[k]` is a 400.
    pub fn filter(&self) -> Result<impl Fn(&Snapshot) -> bool + '_, ApiError> {
        let tags = super::image::tag_filter(&self.tags)?;
        Ok(move |s: &Snapshot| self.matches(s) && has_tags(&s.tags, &tags))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_shape_parses_as_hypeman_snapshot() {
        let core_snap = core::Snapshot {
            tags: [("team".to_string(), "a".to_string())].into(),
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
                egress: true,
            },
            size_bytes: 4096,
            standby_of: None,
            mailbox: None,
            base_id: None,
            disk_layer: None,
            frozen_at: None,
            workload: None,
        };
        let v = serde_json::to_value(Snapshot::from(&core_snap)).unwrap();
        let expected: serde_json::Value = serde_json::from_str(
            r#"{"id":"s-1","created_at":"2026-01-01T00:00:00Z","kind":"Standby","size_bytes":4096,
                "source_hypervisor":"qemu","source_instance_id":"i-1","source_instance_name":"web-1",
                "name":"warm","image":"default","vcpus":1,"memory_mb":256,
                "network":{"enabled":true,"ip":"10.88.0.2","mac":"02:fc:00:00:00:02"},
                "base_id":"s-1","tags":{"team":"a"}}"#,
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

/// `POST /instances/{id}/snapshots/{snapshot_id}/restore` body (optional).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct SnapshotRestoreParams {
    /// Only `Running` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_state: Option<String>,
    /// Only `qemu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_hypervisor: Option<String>,
    /// Fields forkvm does not support: 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "super::Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: super::Unsupported,
}

impl SnapshotRestoreParams {
    /// The target state, checked.
    pub fn validate(self) -> Result<Option<forkvm_core::InstanceState>, ApiError> {
        self.unsupported.refuse("snapshot restore")?;
        if let Some(h) = self.target_hypervisor.as_deref().filter(|h| *h != "qemu") {
            return Err(ApiError::unsupported(format!(
                "target_hypervisor {h:?}: forkvm runs \"qemu\" only"
            )));
        }
        match self.target_state.as_deref() {
            None | Some("Running") => Ok(None),
            Some(s) => Err(ApiError::unsupported(format!(
                "target_state {s:?}: an in-place restore ends Running"
            ))),
        }
    }
}
