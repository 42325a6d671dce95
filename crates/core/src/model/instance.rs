//! Instances, their network identity and their state transitions.
//!
//! Every change of `state` goes through one of the `to_*` methods below, each
//! setting all the fields that depend on it, so a state can't be reached with
//! half its fields stale. Side effects (stopping QEMU, releasing addresses in
//! the store) stay with the callers; these methods only keep the record
//! consistent.

use super::{HandoffRecord, InstanceState, Memory};
use chrono::{DateTime, Utc};
use forkvm_mailbox::MacAddr;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The network identity of an instance, as stored and shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub enabled: bool,
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<MacAddr>,
    pub tap: Option<String>,
    pub gateway: Option<Ipv4Addr>,
    pub prefix_len: Option<u8>,
    pub bridge: Option<String>,
    /// Its traffic may leave the daemon's namespace (source NAT); the
    /// daemon's own setting can still turn egress off for everyone.
    #[serde(default = "egress_default")]
    pub egress: bool,
}

fn egress_default() -> bool {
    true
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
            egress: true,
        }
    }

    /// The address and TAP went back to the pool (the MAC stays the
    /// instance's: it costs nothing and keeps its identity on start).
    pub fn forget_address(&mut self) {
        self.ip = None;
        self.tap = None;
    }

    /// Every claim went back to the pool.
    pub fn forget_lease(&mut self) {
        self.forget_address();
        self.mac = None;
    }
}

/// Where the guest agent's mailbox page is and how to recognise it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxInfo {
    /// Marker id, 32 hex digits.
    pub marker: String,
    /// Guest-physical address of the page.
    pub gpa: u64,
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
    /// Where the guest RAM of its VMM lives (meaningful while it has one).
    #[serde(default)]
    pub memory: Memory,
    /// Generation of its VMM: a handover starts a new QEMU beside the old
    /// one, with its own sockets and pidfile (`paths::InstancePaths`).
    #[serde(default)]
    pub vmm_gen: u32,
    /// A handover in progress (recorded first, so a restart can finish or
    /// undo it): its own memory file becoming base `base`, VMM generation
    /// `vmm_gen + 1` taking over.
    #[serde(default)]
    pub handover: Option<String>,
    /// A promotion in progress (recorded first): VMM generation
    /// `vmm_gen + 1`, with its own memory file again, taking over by live
    /// migration from the copy-on-write one.
    #[serde(default)]
    pub promoting: bool,
    /// The top layer of its writable disk (`crate::layers`), for instances
    /// of an image with a root filesystem; `None` for the `default` image.
    #[serde(default)]
    pub disk_top: Option<String>,
    /// With `handover`: the new top layer (over `disk_top`) the next VMM
    /// generation writes to.
    #[serde(default)]
    pub handover_disk: Option<String>,
    /// The process it runs from its image's root (OCI images); the agent
    /// starts it at every fresh boot.
    #[serde(default)]
    pub workload: Option<super::Workload>,
    /// Host ports forwarded to it (claimed in the store; never inherited
    /// by its forks).
    #[serde(default)]
    pub ports: Vec<super::PublishedPort>,
    /// The user's key-value tags (`GET /instances?tags[k]=v`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl Instance {
    /// A new record in state Created: no VMM, no network claims yet.
    pub fn created(
        id: String,
        name: String,
        image: String,
        vcpus: u32,
        memory_mb: u32,
        now: DateTime<Utc>,
    ) -> Self {
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
            created_at: now,
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
            memory: Memory::Own,
            vmm_gen: 0,
            handover: None,
            promoting: false,
            disk_top: None,
            handover_disk: None,
            workload: None,
            ports: Vec::new(),
            tags: BTreeMap::new(),
        }
    }

    /// A VMM was launched for this instance (boot, restore or fork).
    pub fn to_initializing(&mut self, pid: u32, accel: &str, now: DateTime<Utc>) {
        self.state = InstanceState::Initializing;
        self.pid = Some(pid);
        self.accel = Some(accel.to_string());
        self.started_at = Some(now);
        self.stopped_at = None;
    }

    /// The guest answers: its agent after a boot or restore, or on its own
    /// address after a fork's handoff.
    pub fn to_running(&mut self) {
        self.state = InstanceState::Running;
        self.state_error = None;
        self.pending_handoff = false;
    }

    /// The memory and device state went into snapshot `sid`; the VMM is
    /// stopped next ([`Instance::vmm_exited`]).
    pub fn to_standby(&mut self, sid: String, now: DateTime<Utc>) {
        self.state = InstanceState::Standby;
        self.snapshot_id = Some(sid);
        self.stopped_at = Some(now);
    }

    /// A restore that failed before the guest ran: its snapshot is intact.
    pub fn back_to_standby(&mut self, error: String) {
        self.state = InstanceState::Standby;
        self.pid = None;
        self.state_error = Some(error);
    }

    /// No VMM any more; `error` says why when it was not asked for. A
    /// stopped instance never has a pending handoff: `start` boots it fresh
    /// with its own identity.
    pub fn to_stopped(&mut self, error: Option<String>, now: DateTime<Utc>) {
        self.state = InstanceState::Stopped;
        self.pid = None;
        self.stopped_at = Some(now);
        self.pending_handoff = false;
        self.state_error = error;
    }

    /// The VMM process is gone (the record keeps its state).
    pub fn vmm_exited(&mut self) {
        self.pid = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst() -> Instance {
        Instance::created(
            "i1".into(),
            "web".into(),
            "default".into(),
            1,
            256,
            Utc::now(),
        )
    }

    #[test]
    fn stopped_clears_every_vmm_field() {
        let mut i = inst();
        i.to_initializing(42, "tcg", Utc::now());
        i.pending_handoff = true;
        i.to_stopped(Some("boom".into()), Utc::now());
        assert_eq!(i.state, InstanceState::Stopped);
        assert_eq!(i.pid, None);
        assert!(!i.pending_handoff);
        assert!(i.stopped_at.is_some());
        assert_eq!(i.state_error.as_deref(), Some("boom"));
        i.to_stopped(None, Utc::now());
        assert_eq!(i.state_error, None, "a requested stop clears the old error");
    }

    #[test]
    fn initializing_then_running() {
        let mut i = inst();
        i.state_error = Some("old".into());
        i.stopped_at = Some(Utc::now());
        i.to_initializing(7, "kvm", Utc::now());
        assert_eq!((i.state, i.pid), (InstanceState::Initializing, Some(7)));
        assert_eq!(i.accel.as_deref(), Some("kvm"));
        assert!(i.stopped_at.is_none() && i.started_at.is_some());
        i.pending_handoff = true;
        i.to_running();
        assert_eq!(i.state, InstanceState::Running);
        assert!(!i.pending_handoff && i.state_error.is_none());
    }

    #[test]
    fn standby_and_back() {
        let mut i = inst();
        i.to_initializing(7, "tcg", Utc::now());
        i.to_standby("s1".into(), Utc::now());
        assert_eq!(i.state, InstanceState::Standby);
        assert_eq!(i.snapshot_id.as_deref(), Some("s1"));
        assert_eq!(i.pid, Some(7), "the VMM is stopped after the commit");
        i.vmm_exited();
        assert_eq!(i.pid, None);
        i.to_initializing(8, "tcg", Utc::now());
        i.back_to_standby("load failed".into());
        assert_eq!((i.state, i.pid), (InstanceState::Standby, None));
        assert_eq!(i.snapshot_id.as_deref(), Some("s1"));
    }

    #[test]
    fn network_forgetting() {
        let mut n = NetworkInfo {
            enabled: true,
            ip: Some(Ipv4Addr::new(10, 0, 0, 2)),
            mac: Some("02:fc:00:00:00:01".parse().unwrap()),
            tap: Some("fvtap".into()),
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            prefix_len: Some(24),
            bridge: Some("br".into()),
            egress: true,
        };
        n.forget_address();
        assert!(n.ip.is_none() && n.tap.is_none() && n.mac.is_some());
        n.forget_lease();
        assert!(n.mac.is_none());
    }

    #[test]
    fn stored_documents_keep_their_shape() {
        let mut i = inst();
        i.network.ip = Some(Ipv4Addr::new(10, 0, 0, 2));
        i.network.mac = Some("02:FC:00:00:00:0A".parse().unwrap());
        let v = serde_json::to_value(&i).unwrap();
        assert_eq!(v["network"]["ip"], "10.0.0.2");
        assert_eq!(v["network"]["mac"], "02:fc:00:00:00:0a");
        let back: Instance = serde_json::from_value(v).unwrap();
        assert_eq!(back, i);
    }
}
