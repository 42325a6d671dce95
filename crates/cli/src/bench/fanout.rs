//! Scenario: fan-out. One request forks `k` copies of the source (default
//! handoff path); each fork is checked over HTTP.

use super::BenchError;
use super::harness::{BenchEnv, delete_quietly, outcomes};
use super::sample::{column, sample};
use super::stats::{Summary, summarize};
use crate::client::Client;
use forkvm_api::wire::{ForkOutcome, Instance, InstanceForkParams};
use forkvm_core::Stage;
use serde::Serialize;
use std::time::Instant;

/// One fan-out size's figures (per-fork summaries over the batch).
#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub k: u32,
    pub ok: usize,
    pub request_ms: f64,
    pub snapshot_ms: Option<f64>,
    pub resume_to_ready_ms: Option<Summary>,
    pub total_ms: Option<Summary>,
    pub request_to_ready_ms: Option<Summary>,
    pub verified: usize,
}

/// One request for `k` forks of `src`; every fork is checked over HTTP and
/// deleted.
pub(super) async fn bench_fanout(
    c: &Client,
    env: &BenchEnv,
    src: &Instance,
    k: u32,
    failures: &mut Vec<String>,
) -> Result<FanoutResult, BenchError> {
    let name = format!("fo{k}");
    let t = Instant::now();
    let resp = c
        .fork(
            &src.id,
            &InstanceForkParams {
                name: name.clone(),
                from_running: Some(true),
                count: Some(k),
                ..Default::default()
            },
        )
        .await;
    let request_ms = t.elapsed().as_secs_f64() * 1000.0;
    let outs = match resp {
        Ok(r) => outcomes(r),
        Err(e) => {
            failures.push(format!("fan-out {k}: {e}"));
            vec![]
        }
    };
    let mut samples = vec![];
    let mut verified = 0;
    for o in outs {
        match o {
            ForkOutcome::Created(inst) => {
                if env.http_ok(inst.network.ip.as_deref().unwrap_or_default()) {
                    verified += 1;
                } else {
                    failures.push(format!("{}: no HTTP answer", inst.name));
                }
                samples.push(sample(&inst, None, None));
                delete_quietly(c, &inst.id, failures).await;
            }
            ForkOutcome::Failed(f) => {
                failures.push(format!("{}: {}", f.name, f.error.message));
            }
        }
    }
    Ok(FanoutResult {
        k,
        ok: samples.len(),
        request_ms,
        snapshot_ms: samples
            .first()
            .and_then(|s| s.stages_ms.get(Stage::Snapshot.as_str()).copied()),
        resume_to_ready_ms: summarize(&column(&samples, |s| s.resume_to_ready_ms)),
        total_ms: summarize(&column(&samples, |s| {
            s.stages_ms.get(Stage::Total.as_str()).copied()
        })),
        request_to_ready_ms: summarize(&column(&samples, |s| s.request_to_ready_ms)),
        verified,
    })
}
