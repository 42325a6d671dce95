//! Forks: the bodies of both fork endpoints (`POST /instances/{id}/fork`
//! and `POST /snapshots/{snapshot_id}/fork`), their shared validation, and
//! the one-or-many response.

use super::error::ErrorBody;
use super::handoff::HandoffPath;
use super::instance::Instance;
use super::ports::PublishedPort;
use crate::error::ApiError;
use forkvm_core as core;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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
pub use forkvm_core::MAX_FORK_COUNT;

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
    /// forkvm: ports published for the fork (single forks only). A fork
    /// never inherits its source's published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PublishedPort>,
    /// Fields forkvm does not support: 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "super::Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: super::Unsupported,
}

impl InstanceForkParams {
    /// Validate and convert into the core's request.
    pub fn into_core(self) -> Result<core::ForkRequest, ApiError> {
        self.unsupported.refuse("fork")?;
        validate_fork(&self.name, self.count)?;
        Ok(core::ForkRequest {
            name: self.name,
            from_running: self.from_running.unwrap_or(false),
            target_state: self.target_state.map(Into::into),
            count: self.count,
            wait_for_network: self.wait_for_network,
            handoff: self.handoff.map(Into::into),
            ports: self.ports.into_iter().map(Into::into).collect(),
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
    /// forkvm: ports published for the fork (single forks only). A fork
    /// never inherits its source's published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PublishedPort>,
    /// Fields forkvm does not support: 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "super::Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: super::Unsupported,
}

impl SnapshotForkParams {
    /// Validate and convert into the core's request.
    pub fn into_core(self) -> Result<core::ForkRequest, ApiError> {
        self.unsupported.refuse("snapshot fork")?;
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
            ports: self.ports.into_iter().map(Into::into).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
