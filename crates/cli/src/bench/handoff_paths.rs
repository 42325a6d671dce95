//! Scenario: handoff paths. Each round forks the running source once per
//! path (mailbox, rpc, exec), interleaved and rotated so no path always goes
//! first; every fork must take the path it asked for and answer over HTTP.

use super::BenchError;
use super::harness::{BenchEnv, delete_quietly, outcomes};
use super::sample::{ForkSample, column, sample};
use super::stats::{Summary, median_of, ratio, summarize};
use crate::client::{Client, ClientError};
use forkvm_api::wire::{ForkOutcome, ForkResponse, HandoffPath, Instance, InstanceForkParams};
use indicatif::ProgressBar;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// The three handoff paths, fastest first.
const PATHS: [HandoffPath; 3] = [HandoffPath::Mailbox, HandoffPath::Rpc, HandoffPath::Exec];

/// One handoff path's figures over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub path: &'static str,
    pub api_ms: Option<Summary>,
    pub request_to_ready_ms: Option<Summary>,
    pub resume_to_ready_ms: Option<Summary>,
    /// Median of every stage the daemon recorded.
    pub stage_medians_ms: BTreeMap<String, f64>,
    /// RPC counters of the first round's fork (inherited from the source + its own).
    pub agent_rpc_counts: Option<BTreeMap<String, u64>>,
    pub samples: Vec<ForkSample>,
}

/// Order of the paths in round `r`: rotated so no path always goes first.
pub fn round_order(r: usize) -> [HandoffPath; 3] {
    let mut o = PATHS;
    o.rotate_left(r % PATHS.len());
    o
}

/// `reps` rounds of one fork of `src` per path; each fork is checked, then
/// deleted.
pub(super) async fn bench_paths(
    c: &Client,
    env: &BenchEnv,
    src: &Instance,
    reps: u32,
    pb: &ProgressBar,
    failures: &mut Vec<String>,
) -> Result<Vec<PathResult>, BenchError> {
    let mut samples: BTreeMap<&'static str, Vec<ForkSample>> = BTreeMap::new();
    let mut rpc_counts: BTreeMap<&'static str, BTreeMap<String, u64>> = BTreeMap::new();
    for r in 0..reps as usize {
        for path in round_order(r) {
            pb.set_message(format!("round {}/{reps}: {}", r + 1, path.as_str()));
            let name = format!("bp{}-{}", r + 1, path.as_str());
            let t = Instant::now();
            let resp = c
                .fork(
                    &src.id,
                    &InstanceForkParams {
                        name: name.clone(),
                        from_running: Some(true),
                        handoff: Some(path),
                        ..Default::default()
                    },
                )
                .await;
            let api_ms = t.elapsed().as_secs_f64() * 1000.0;
            pb.inc(1);
            let Some(inst) = single_fork(&name, resp, failures) else {
                continue;
            };
            let mut s = sample(&inst, Some(path), Some(api_ms));
            check_fork(env, &name, path, &inst, &mut s, failures);
            if r < PATHS.len() && !rpc_counts.contains_key(path.as_str()) {
                match c.agent(&inst.id).await {
                    Ok(h) => {
                        rpc_counts.insert(path.as_str(), h.rpc_counts);
                    }
                    Err(e) => failures.push(format!("{name}: agent health: {e}")),
                }
            }
            tracing::debug!(fork = %name, api_ms, stages = ?s.stages_ms, "fork measured");
            samples.entry(path.as_str()).or_default().push(s);
            delete_quietly(c, &inst.id, failures).await;
        }
    }
    Ok(PATHS
        .iter()
        .map(|p| {
            let v = samples.remove(p.as_str()).unwrap_or_default();
            path_result(p.as_str(), v, rpc_counts.remove(p.as_str()))
        })
        .collect())
}

/// The instance a single-fork request made, or `None` with the reason in
/// `failures`.
fn single_fork(
    name: &str,
    resp: Result<ForkResponse, ClientError>,
    failures: &mut Vec<String>,
) -> Option<Instance> {
    match resp.map(outcomes) {
        Ok(mut v) if v.len() == 1 => match v.remove(0) {
            ForkOutcome::Created(i) => Some(*i),
            ForkOutcome::Failed(f) => {
                failures.push(format!("{name}: {}", f.error.message));
                None
            }
        },
        Ok(v) => {
            failures.push(format!("{name}: expected one fork, got {}", v.len()));
            None
        }
        Err(e) => {
            failures.push(format!("{name}: fork failed: {e}"));
            None
        }
    }
}

/// A fork must have taken the requested path and answer over HTTP on its
/// new address; records `verified` and any failure.
fn check_fork(
    env: &BenchEnv,
    name: &str,
    path: HandoffPath,
    inst: &Instance,
    s: &mut ForkSample,
    failures: &mut Vec<String>,
) {
    if s.path.as_deref() != Some(path.as_str()) {
        failures.push(format!(
            "{name}: requested path {} but the fork took {:?} (fallback: {:?})",
            path.as_str(),
            s.path,
            s.fallback_reason
        ));
    }
    let ip = inst.network.ip.clone().unwrap_or_default();
    let ok = env.http_ok(&ip);
    if !ok {
        failures.push(format!("{name}: no HTTP answer on {ip}"));
    }
    s.verified = Some(ok);
}

/// Summaries of one path's samples.
pub(super) fn path_result(
    path: &'static str,
    samples: Vec<ForkSample>,
    agent_rpc_counts: Option<BTreeMap<String, u64>>,
) -> PathResult {
    let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in &samples {
        for (k, v) in &s.stages_ms {
            stages.entry(k.clone()).or_default().push(*v);
        }
    }
    PathResult {
        path,
        api_ms: summarize(&column(&samples, |s| s.api_ms)),
        request_to_ready_ms: summarize(&column(&samples, |s| s.request_to_ready_ms)),
        resume_to_ready_ms: summarize(&column(&samples, |s| s.resume_to_ready_ms)),
        stage_medians_ms: stages
            .into_iter()
            .filter_map(|(k, v)| median_of(&v).map(|m| (k, m)))
            .collect(),
        agent_rpc_counts,
        samples,
    }
}

/// Ratios between the paths' resume→ready and request→ready medians.
pub(super) fn path_ratios(paths: &[PathResult]) -> BTreeMap<String, Option<f64>> {
    let get = |name: &str, f: &dyn Fn(&PathResult) -> Option<Summary>| {
        paths
            .iter()
            .find(|p| p.path == name)
            .and_then(f)
            .map(|s| s.median)
    };
    let ready = |n: &str| get(n, &|p| p.resume_to_ready_ms);
    let req = |n: &str| get(n, &|p| p.request_to_ready_ms);
    BTreeMap::from([
        (
            "mailbox_over_rpc".to_string(),
            ratio(ready("mailbox"), ready("rpc")),
        ),
        (
            "mailbox_over_exec".to_string(),
            ratio(ready("mailbox"), ready("exec")),
        ),
        (
            "rpc_over_exec".to_string(),
            ratio(ready("rpc"), ready("exec")),
        ),
        (
            "request_mailbox_over_rpc".to_string(),
            ratio(req("mailbox"), req("rpc")),
        ),
        (
            "request_mailbox_over_exec".to_string(),
            ratio(req("mailbox"), req("exec")),
        ),
        (
            "request_rpc_over_exec".to_string(),
            ratio(req("rpc"), req("exec")),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::sample::fake;

    #[test]
    fn rounds_rotate_the_path_order() {
        use HandoffPath::*;
        assert_eq!(round_order(0), [Mailbox, Rpc, Exec]);
        assert_eq!(round_order(1), [Rpc, Exec, Mailbox]);
        assert_eq!(round_order(2), [Exec, Mailbox, Rpc]);
        assert_eq!(round_order(3), round_order(0));
    }

    #[test]
    fn path_ratios_use_medians() {
        let paths = vec![
            path_result(
                "mailbox",
                vec![
                    fake("mailbox", 20.0, 200.0),
                    fake("mailbox", 40.0, 220.0),
                    fake("mailbox", 1000.0, 990.0),
                ],
                None,
            ),
            path_result("rpc", vec![fake("rpc", 80.0, 290.0)], None),
            path_result("exec", vec![], None),
        ];
        assert_eq!(paths[0].stage_medians_ms["network_ready"], 40.0);
        let r = path_ratios(&paths);
        assert_eq!(r["mailbox_over_rpc"], Some(0.5));
        // request→ready = total + 10: 230 / 300
        let q = r["request_mailbox_over_rpc"].unwrap();
        assert!((q - 230.0 / 300.0).abs() < 1e-9, "{q}");
        assert_eq!(r["mailbox_over_exec"], None);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["mailbox_over_rpc"], 0.5);
        assert!(v["mailbox_over_exec"].is_null());
    }
}
