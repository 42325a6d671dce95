//! The event stream: instance and snapshot state transitions and handoff
//! outcomes, as they happen, for `GET /events` and `forkvm events`.
//!
//! In memory only: a subscriber sees what happens while it listens (no
//! replay); one that falls behind by more than [`CAPACITY`] events is told how
//! many it lost instead of slowing the daemon down.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::broadcast;

/// Events a slow subscriber may lag behind before it loses some.
pub const CAPACITY: usize = 1024;

/// One thing that happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing from 1 since the daemon started (the SSE `id`).
    pub seq: u64,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened. `type` on the wire, which is also the SSE event name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// An instance changed state (`from` is absent for a new instance).
    InstanceState {
        instance_id: String,
        instance_name: String,
        from: Option<String>,
        to: String,
        /// Why, when it stopped with an error.
        error: Option<String>,
    },
    /// An instance's record is gone.
    InstanceDeleted {
        instance_id: String,
        instance_name: String,
    },
    /// A fork or restore reached the network (or failed to).
    Handoff {
        instance_id: String,
        instance_name: String,
        /// `mailbox`, `rpc`, `exec`; absent when it failed before any path worked.
        path: Option<String>,
        /// `ok` or `failed`.
        outcome: String,
        fallback_reason: Option<String>,
        error: Option<String>,
    },
    SnapshotCreated {
        snapshot_id: String,
        snapshot_name: Option<String>,
        instance_id: String,
    },
    SnapshotDeleted {
        snapshot_id: String,
    },
}

impl EventKind {
    /// The instance the event is about, if any (the `instance` filter).
    pub fn instance_id(&self) -> Option<&str> {
        match self {
            Self::InstanceState { instance_id, .. }
            | Self::InstanceDeleted { instance_id, .. }
            | Self::Handoff { instance_id, .. }
            | Self::SnapshotCreated { instance_id, .. } => Some(instance_id),
            Self::SnapshotDeleted { .. } => None,
        }
    }

    /// The instance's name, for filters given by name.
    pub fn instance_name(&self) -> Option<&str> {
        match self {
            Self::InstanceState { instance_name, .. }
            | Self::InstanceDeleted { instance_name, .. }
            | Self::Handoff { instance_name, .. } => Some(instance_name),
            _ => None,
        }
    }

    /// The wire name of the variant (`type`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::InstanceState { .. } => "instance_state",
            Self::InstanceDeleted { .. } => "instance_deleted",
            Self::Handoff { .. } => "handoff",
            Self::SnapshotCreated { .. } => "snapshot_created",
            Self::SnapshotDeleted { .. } => "snapshot_deleted",
        }
    }
}

/// The broadcast behind the stream.
pub struct Events {
    tx: broadcast::Sender<Event>,
    seq: AtomicU64,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
            seq: AtomicU64::new(0),
        }
    }
}

impl Events {
    /// Sends to whoever listens now (nobody is fine).
    pub fn publish(&self, kind: EventKind) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.tx.send(Event {
            seq,
            at: Utc::now(),
            kind,
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Streams open now.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_their_type_and_fields_flat() {
        let e = Event {
            seq: 7,
            at: DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            kind: EventKind::InstanceState {
                instance_id: "i1".into(),
                instance_name: "web".into(),
                from: Some("Created".into()),
                to: "Running".into(),
                error: None,
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "instance_state");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["instance_name"], "web");
        assert_eq!(v["to"], "Running");
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        assert_eq!(e.kind.name(), "instance_state");
    }

    #[tokio::test]
    async fn subscribers_get_events_in_order_with_increasing_seq() {
        let ev = Events::default();
        let mut rx = ev.subscribe();
        ev.publish(EventKind::SnapshotDeleted {
            snapshot_id: "a".into(),
        });
        ev.publish(EventKind::SnapshotDeleted {
            snapshot_id: "b".into(),
        });
        let (a, b) = (rx.recv().await.unwrap(), rx.recv().await.unwrap());
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(
            b.kind,
            EventKind::SnapshotDeleted {
                snapshot_id: "b".into()
            }
        );
    }
}
