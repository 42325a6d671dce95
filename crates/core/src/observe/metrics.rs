//! Prometheus metrics (`GET /metrics`), through `prometheus-client` with a
//! registry of our own (no global state: every daemon, and every test, has
//! its own).
//!
//! Every label takes values from a closed set (stage and state names, handoff
//! paths, fallback codes, route templates), so the series stay bounded
//! whatever the guests or the API clients do.

use crate::model::{HandoffRecord, InstanceState, Stage};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    /// `fork` or `restore`.
    kind: &'static str,
    stage: &'static str,
    /// `mailbox`, `rpc`, `exec`, or `none` (no handoff: a Standby fork, a
    /// restore without network, or a failed one).
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandoffLabels {
    path: &'static str,
    /// `ok` or `failed`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The route template (`/instances/{id}/fork`), never the raw path.
    route: String,
    status: u16,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 1 ms to ~65 s, doubling: fork stages span sub-millisecond (allocate) to
/// tens of seconds (a TCG boot behind a fallback).
fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Memory and capacity figures, MiB, set before each scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapacityFigures {
    pub budget_mb: u64,
    pub used_mb: u64,
    pub reserved_mb: u64,
    pub mem_dir_capacity_mb: Option<u64>,
    pub mem_dir_used_mb: u64,
}

/// Every series forkvm exports.
pub struct Metrics {
    registry: Registry,
    stages: HistogramFamily<StageLabels>,
    handoffs: Family<HandoffLabels, Counter>,
    fallbacks: Family<ReasonLabels, Counter>,
    forged_acks: Counter,
    instances: Family<StateLabels, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    requests: HistogramFamily<RequestLabels>,
    budget: Gauge,
    used: Gauge,
    reserved: Gauge,
    mem_dir_capacity: Gauge,
    mem_dir_used: Gauge,
    subscribers: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("forkvm"),
            stages: Family::new_with_constructor(duration_buckets),
            handoffs: Family::default(),
            fallbacks: Family::default(),
            forged_acks: Counter::default(),
            instances: Family::default(),
            transitions: Family::default(),
            requests: Family::new_with_constructor(duration_buckets),
            budget: Gauge::default(),
            used: Gauge::default(),
            reserved: Gauge::default(),
            mem_dir_capacity: Gauge::default(),
            mem_dir_used: Gauge::default(),
            subscribers: Gauge::default(),
        };
        m.register();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "fork_stage_duration_seconds",
            "Time per stage of each fork and restore pipeline, by handoff path",
            self.stages.clone(),
        );
        r.register(
            "handoffs",
            "Network handoffs of forks and restores by path and outcome",
            self.handoffs.clone(),
        );
        r.register(
            "handoff_fallbacks",
            "Mailbox handoffs not used, by reason (the fork fell back to RPC or exec)",
            self.fallbacks.clone(),
        );
        r.register(
            "forged_acks",
            "Forged, stale or malformed mailbox ack datagrams ignored",
            self.forged_acks.clone(),
        );
        r.register("instances", "Instances by state", self.instances.clone());
        r.register(
            "instance_state_transitions",
            "Instance state changes (from `none`: a new instance)",
            self.transitions.clone(),
        );
        r.register(
            "api_request_duration_seconds",
            "API requests by method, route template and status",
            self.requests.clone(),
        );
        r.register(
            "memory_budget_mib",
            "Guest memory budget (--max-guest-memory-mb)",
            self.budget.clone(),
        );
        r.register(
            "memory_used_mib",
            "Guest memory charged to VMs and bases",
            self.used.clone(),
        );
        r.register(
            "memory_reserved_mib",
            "Guest memory held by requests in flight",
            self.reserved.clone(),
        );
        r.register(
            "mem_dir_capacity_mib",
            "Usable size of the memory directory's filesystem (-1: unknown)",
            self.mem_dir_capacity.clone(),
        );
        r.register(
            "mem_dir_used_mib",
            "Memory-directory space promised to memory files and bases",
            self.mem_dir_used.clone(),
        );
        r.register(
            "event_subscribers",
            "Event streams (GET /events) open now",
            self.subscribers.clone(),
        );
    }

    /// One finished fork or restore pipeline: every stage it timed.
    pub fn pipeline(&self, kind: &'static str, rec: &HandoffRecord) {
        let path = rec.path.map_or("none", |p| p.as_str());
        for (stage, ms) in &rec.stages_ms {
            self.stage(kind, *stage, path, *ms);
        }
    }

    fn stage(&self, kind: &'static str, stage: Stage, path: &'static str, ms: f64) {
        self.stages
            .get_or_create(&StageLabels {
                kind,
                stage: stage.as_str(),
                path,
            })
            .observe(ms / 1000.0);
    }

    /// A handoff's outcome (`path` `none` when it failed before any worked).
    pub fn handoff(&self, path: &'static str, ok: bool) {
        self.handoffs
            .get_or_create(&HandoffLabels {
                path,
                outcome: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    pub fn fallback(&self, reason: &'static str) {
        self.fallbacks.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn forged_acks(&self, n: u32) {
        self.forged_acks.inc_by(u64::from(n));
    }

    pub fn transition(&self, from: Option<InstanceState>, to: InstanceState) {
        self.transitions
            .get_or_create(&TransitionLabels {
                from: from.map_or("none", |s| s.as_str()),
                to: to.as_str(),
            })
            .inc();
    }

    pub fn request(&self, method: &str, route: &str, status: u16, secs: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .observe(secs);
    }

    /// Sets the gauges read from the store (every state, zeros included,
    /// so a state that emptied shows 0 rather than its last count).
    pub fn set_instances(&self, states: impl IntoIterator<Item = InstanceState>) {
        let mut counts = [0i64; InstanceState::ALL.len()];
        for s in states {
            if let Some(i) = InstanceState::ALL.iter().position(|x| *x == s) {
                counts[i] += 1;
            }
        }
        for (s, n) in InstanceState::ALL.iter().zip(counts) {
            self.instances
                .get_or_create(&StateLabels { state: s.as_str() })
                .set(n);
        }
    }

    pub fn set_capacity(&self, c: CapacityFigures) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.budget.set(g(c.budget_mb));
        self.used.set(g(c.used_mb));
        self.reserved.set(g(c.reserved_mb));
        self.mem_dir_capacity
            .set(c.mem_dir_capacity_mb.map_or(-1, g));
        self.mem_dir_used.set(g(c.mem_dir_used_mb));
    }

    pub fn set_subscribers(&self, n: usize) {
        self.subscribers.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The exposition text (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HandoffPath;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn a_pipeline_is_one_observation_per_stage_labelled_by_path() {
        let m = Metrics::new();
        let mut rec = HandoffRecord {
            path: Some(HandoffPath::Mailbox),
            ..Default::default()
        };
        rec.set(Stage::Total, 250.0);
        rec.set(Stage::VmmStart, 40.0);
        m.pipeline("fork", &rec);
        m.pipeline("fork", &rec);
        let text = m.encode();
        let count = line(
            &text,
            r#"forkvm_fork_stage_duration_seconds_count{kind="fork",stage="total",path="mailbox"}"#,
        )
        .expect(&text);
        assert!(count.ends_with(" 2"), "{count}");
        let sum = line(
            &text,
            r#"forkvm_fork_stage_duration_seconds_sum{kind="fork",stage="total",path="mailbox"}"#,
        )
        .expect(&text);
        assert!(sum.ends_with(" 0.5"), "{sum}");
    }

    #[test]
    fn instance_gauges_cover_every_state_and_drop_to_zero() {
        let m = Metrics::new();
        m.set_instances([InstanceState::Running, InstanceState::Running]);
        let text = m.encode();
        assert!(
            text.contains(r#"forkvm_instances{state="Running"} 2"#),
            "{text}"
        );
        m.set_instances([InstanceState::Standby]);
        let text = m.encode();
        assert!(
            text.contains(r#"forkvm_instances{state="Running"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"forkvm_instances{state="Standby"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn counters_end_in_total_and_requests_use_the_route_template() {
        let m = Metrics::new();
        m.handoff("rpc", true);
        m.fallback("no_armed_mailbox");
        m.forged_acks(3);
        m.transition(None, InstanceState::Running);
        m.request("POST", "/instances/{id}/fork", 201, 0.2);
        let text = m.encode();
        for want in [
            r#"forkvm_handoffs_total{path="rpc",outcome="ok"} 1"#,
            r#"forkvm_handoff_fallbacks_total{reason="no_armed_mailbox"} 1"#,
            "forkvm_forged_acks_total 3",
            r#"forkvm_instance_state_transitions_total{from="none",to="Running"} 1"#,
            r#"forkvm_api_request_duration_seconds_count{method="POST",route="/instances/{id}/fork",status="201"} 1"#,
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
