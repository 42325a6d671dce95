//! What the daemon tells the outside about itself: Prometheus [`metrics`]
//! and the [`events`] stream.
//!
//! State transitions are seen where they become true — the store's writes
//! ([`crate::store::Store`] calls [`Observer::instance`] and friends after
//! each successful write) — so no operation can change a state without it
//! being counted and published. Handoff outcomes and pipeline timings are
//! reported by the fork and restore code, which alone knows them.

pub mod events;
pub mod metrics;

use crate::model::{HandoffRecord, Instance, InstanceState, Snapshot};
use events::{EventKind, Events};
use metrics::Metrics;
use std::collections::HashMap;
use std::sync::Mutex;

/// Metrics, events, and the last state seen of every instance.
#[derive(Default)]
pub struct Observer {
    pub metrics: Metrics,
    pub events: Events,
    /// id → (name, state): what the last write said, to tell a transition
    /// from a rewrite of the same state.
    last: Mutex<HashMap<String, (String, InstanceState)>>,
}

impl Observer {
    /// Records what is already there (at start-up) without reporting it.
    pub(crate) fn seed(&self, instances: &[Instance]) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for i in instances {
            last.insert(i.id.clone(), (i.name.clone(), i.state));
        }
    }

    /// An instance record was written: a transition if its state changed.
    pub(crate) fn instance(&self, inst: &Instance) {
        let prev = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            last.insert(inst.id.clone(), (inst.name.clone(), inst.state))
        };
        let from = prev.map(|(_, s)| s);
        if from == Some(inst.state) {
            return;
        }
        self.metrics.transition(from, inst.state);
        self.events.publish(EventKind::InstanceState {
            instance_id: inst.id.clone(),
            instance_name: inst.name.clone(),
            from: from.map(|s| s.as_str().to_string()),
            to: inst.state.as_str().to_string(),
            error: inst.state_error.clone(),
        });
    }

    pub(crate) fn instance_deleted(&self, id: &str) {
        let prev = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some((name, _)) = prev {
            self.events.publish(EventKind::InstanceDeleted {
                instance_id: id.to_string(),
                instance_name: name,
            });
        }
    }

    pub(crate) fn snapshot_created(&self, snap: &Snapshot) {
        self.events.publish(EventKind::SnapshotCreated {
            snapshot_id: snap.id.clone(),
            snapshot_name: snap.name.clone(),
            instance_id: snap.source_instance_id.clone(),
        });
    }

    pub(crate) fn snapshot_deleted(&self, id: &str) {
        self.events.publish(EventKind::SnapshotDeleted {
            snapshot_id: id.to_string(),
        });
    }

    /// A handoff ended: counted, its ignored acks added, published.
    pub(crate) fn handoff(&self, inst: &Instance, rec: &HandoffRecord, error: Option<String>) {
        let path = rec.path.map_or("none", |p| p.as_str());
        self.metrics.handoff(path, error.is_none());
        self.metrics.forged_acks(rec.forged_acks);
        self.events.publish(EventKind::Handoff {
            instance_id: inst.id.clone(),
            instance_name: inst.name.clone(),
            path: rec.path.map(|p| p.as_str().to_string()),
            outcome: if error.is_none() { "ok" } else { "failed" }.to_string(),
            fallback_reason: rec.fallback_reason.clone(),
            error,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_instance(name: &str) -> Instance {
        Instance::created(
            format!("id-{name}"),
            name.into(),
            "default".into(),
            1,
            256,
            chrono::Utc::now(),
        )
    }

    #[tokio::test]
    async fn a_rewrite_of_the_same_state_is_not_a_transition() {
        let o = Observer::default();
        let mut rx = o.events.subscribe();
        let mut i = sample_instance("web");
        i.state = InstanceState::Running;
        o.instance(&i);
        o.instance(&i);
        i.state = InstanceState::Stopped;
        o.instance(&i);
        o.instance_deleted(&i.id);
        let names: Vec<_> = (0..3)
            .map(|_| rx.try_recv().unwrap().kind)
            .map(|k| match k {
                EventKind::InstanceState { from, to, .. } => format!("{from:?}->{to}"),
                other => other.name().to_string(),
            })
            .collect();
        assert_eq!(
            names,
            [
                "None->Running",
                "Some(\"Running\")->Stopped",
                "instance_deleted"
            ]
        );
        assert!(rx.try_recv().is_err());
        let text = o.metrics.encode();
        assert!(
            text.contains(
                r#"forkvm_instance_state_transitions_total{from="Running",to="Stopped"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn seeded_instances_report_only_real_changes() {
        let o = Observer::default();
        let mut i = sample_instance("web");
        i.state = InstanceState::Running;
        o.seed(std::slice::from_ref(&i));
        let mut rx = o.events.subscribe();
        o.instance(&i);
        assert!(rx.try_recv().is_err());
    }
}
