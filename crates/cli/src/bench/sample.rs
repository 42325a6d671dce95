//! One measured fork: the client's clock around the API call plus the
//! per-stage timings the daemon recorded in the fork's `handoff`.

use forkvm_api::wire::{HandoffPath, Instance};
use forkvm_core::Stage;
use serde::Serialize;
use std::collections::BTreeMap;

/// One measured fork.
#[derive(Debug, Clone, Serialize)]
pub struct ForkSample {
    pub name: String,
    pub requested: Option<&'static str>,
    pub path: Option<String>,
    pub fallback_reason: Option<String>,
    /// Client-measured API round trip (only for single-fork requests).
    pub api_ms: Option<f64>,
    /// stages.queued + stages.total: from the daemon starting the request
    /// to the fork answering on its new address (the capture, unless the
    /// fork started during it, and the wait for a slot included; daemons
    /// before `queued` existed: snapshot + total).
    pub request_to_ready_ms: Option<f64>,
    /// stages.network_ready: from `cont` to ack / RPC success.
    pub resume_to_ready_ms: Option<f64>,
    pub stages_ms: BTreeMap<String, f64>,
    /// Reached over HTTP from the namespace on its new address.
    pub verified: Option<bool>,
}

/// What `inst`'s handoff record says about its fork; the caller fills in
/// `verified`.
pub(super) fn sample(
    inst: &Instance,
    requested: Option<HandoffPath>,
    api_ms: Option<f64>,
) -> ForkSample {
    let h = inst.handoff.clone().unwrap_or_default();
    let st = &h.stages_ms;
    let before = st
        .get(Stage::Queued.as_str())
        .or_else(|| st.get(Stage::Snapshot.as_str()));
    let request_to_ready = match (before, st.get(Stage::Total.as_str())) {
        (Some(s), Some(t)) => Some(s + t),
        _ => None,
    };
    ForkSample {
        name: inst.name.clone(),
        requested: requested.map(|p| p.as_str()),
        path: h.path.map(|p| p.as_str().to_string()),
        fallback_reason: h.fallback_reason.clone(),
        api_ms,
        request_to_ready_ms: request_to_ready,
        resume_to_ready_ms: st.get(Stage::NetworkReady.as_str()).copied(),
        stages_ms: h.stages_ms,
        verified: None,
    }
}

/// One figure of every sample that has it.
pub(super) fn column(samples: &[ForkSample], f: impl Fn(&ForkSample) -> Option<f64>) -> Vec<f64> {
    samples.iter().filter_map(f).collect()
}

/// A verified sample on `path` with `network_ready` = `ready` and `total`;
/// the API and request times follow from `total`.
#[cfg(test)]
pub(super) fn fake(path: &str, ready: f64, total: f64) -> ForkSample {
    ForkSample {
        name: "f".into(),
        requested: None,
        path: Some(path.into()),
        fallback_reason: None,
        api_ms: Some(total + 5.0),
        request_to_ready_ms: Some(total + 10.0),
        resume_to_ready_ms: Some(ready),
        stages_ms: BTreeMap::from([("network_ready".into(), ready), ("total".into(), total)]),
        verified: Some(true),
    }
}
