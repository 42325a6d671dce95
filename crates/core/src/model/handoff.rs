//! How a fork (or restore) reached readiness: the handoff path taken and the
//! time spent in each stage of the pipeline.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

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

impl HandoffPath {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Mailbox => "mailbox",
            Self::Rpc => "rpc",
            Self::Exec => "exec",
        }
    }
}

/// One timed stage of the fork/restore pipeline. The declaration order is the
/// pipeline's order; the snake_case names are the keys of `stages_ms` in the
/// API and the benchmark's JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The capture of a running source (forks from a running source).
    Snapshot,
    /// Of that, the time the source's vCPUs were stopped.
    SourcePause,
    /// From the request's start to this fork's start: the capture (unless
    /// the fork started during it) and the wait for a parallelism slot.
    Queued,
    /// Record, IPv4 and MAC claimed.
    Allocate,
    /// The fork's guest memory made ready from the base.
    MemoryPrepare,
    /// The fork's own writable-disk layer made over the frozen one (image
    /// instances only).
    DiskPrepare,
    /// TAP created on the bridge.
    AllocateTap,
    /// QEMU launched, waiting for device state.
    VmmStart,
    /// A fork started during the capture of its running source: its VMM
    /// waiting for the capture to end.
    BaseWait,
    /// Device state loaded; the VM is paused.
    StateLoad,
    /// Identity written into the paused fork's mailbox page.
    MailboxPrepare,
    /// vCPUs continued.
    Resume,
    /// The guest's own report: its resume signal to identity applied.
    GuestSignalToApplied,
    /// Resume to the fork answering on its new address.
    NetworkReady,
    /// This fork's own pipeline, from its start (see `Queued`) to ready.
    Total,
}

impl Stage {
    /// Every stage in pipeline order.
    pub const ALL: [Stage; 15] = [
        Self::Snapshot,
        Self::SourcePause,
        Self::Queued,
        Self::Allocate,
        Self::MemoryPrepare,
        Self::DiskPrepare,
        Self::AllocateTap,
        Self::VmmStart,
        Self::BaseWait,
        Self::StateLoad,
        Self::MailboxPrepare,
        Self::Resume,
        Self::GuestSignalToApplied,
        Self::NetworkReady,
        Self::Total,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::SourcePause => "source_pause",
            Self::Queued => "queued",
            Self::Allocate => "allocate",
            Self::MemoryPrepare => "memory_prepare",
            Self::DiskPrepare => "disk_prepare",
            Self::AllocateTap => "allocate_tap",
            Self::VmmStart => "vmm_start",
            Self::BaseWait => "base_wait",
            Self::StateLoad => "state_load",
            Self::MailboxPrepare => "mailbox_prepare",
            Self::Resume => "resume",
            Self::GuestSignalToApplied => "guest_signal_to_applied",
            Self::NetworkReady => "network_ready",
            Self::Total => "total",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// The outcome and timings of one fork's (or restore's) handoff.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HandoffRecord {
    pub path: Option<HandoffPath>,
    /// Why a faster path was not used, when the fork fell back.
    pub fallback_reason: Option<String>,
    /// The error when the handoff failed.
    pub error: Option<String>,
    /// Milliseconds per stage.
    #[serde(deserialize_with = "known_stages")]
    pub stages_ms: BTreeMap<Stage, f64>,
    /// Forged, stale or malformed ack datagrams the host ignored.
    #[serde(default)]
    pub forged_acks: u32,
}

impl HandoffRecord {
    /// Records the time since `since` as `stage`.
    pub fn record(&mut self, stage: Stage, since: Instant) {
        self.set(stage, since.elapsed().as_secs_f64() * 1000.0);
    }

    pub fn set(&mut self, stage: Stage, ms: f64) {
        self.stages_ms.insert(stage, ms);
    }

    pub fn get(&self, stage: Stage) -> Option<f64> {
        self.stages_ms.get(&stage).copied()
    }
}

/// Records written before a stage was renamed or a counter moved out of the
/// map (`forged_acks`) still load: unknown keys are dropped.
fn known_stages<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<Stage, f64>, D::Error> {
    let raw = BTreeMap::<String, f64>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .filter_map(|(k, v)| Stage::parse(&k).map(|s| (s, v)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_are_the_wire_names() {
        for s in Stage::ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
            assert_eq!(Stage::parse(s.as_str()), Some(s));
        }
        let mut sorted = Stage::ALL;
        sorted.sort();
        assert_eq!(sorted, Stage::ALL, "declaration order is pipeline order");
    }

    #[test]
    fn old_records_with_unknown_keys_still_load() {
        let r: HandoffRecord = serde_json::from_str(
            r#"{"path":"mailbox","fallback_reason":null,"error":null,
                "stages_ms":{"resume":2.0,"forged_acks":3.0,"total":90.5}}"#,
        )
        .unwrap();
        assert_eq!(r.get(Stage::Resume), Some(2.0));
        assert_eq!(r.get(Stage::Total), Some(90.5));
        assert_eq!(r.stages_ms.len(), 2);
        assert_eq!(r.forged_acks, 0);
    }

    #[test]
    fn stages_serialise_under_their_names() {
        let mut r = HandoffRecord::default();
        r.set(Stage::NetworkReady, 12.5);
        r.set(Stage::Total, 80.0);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v["stages_ms"],
            serde_json::json!({"network_ready": 12.5, "total": 80.0})
        );
    }
}
