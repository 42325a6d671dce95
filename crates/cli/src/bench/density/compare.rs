//! Scenario: touched vs fresh source. The same request — `count: k` forks
//! from the running source — once from a source that has not touched its
//! memory and once from one whose guest filled `--touch-mib` with random
//! data; per fork the host memory it costs, request→ready and the source's
//! pause, and their ratios touched/fresh.

use super::{GuestMemory, client_ready_ms, fill, fork_request};
use crate::bench::footprint::{Footprint, SETTLE, measure};
use crate::bench::harness::{BenchEnv, create_source, delete_quietly};
use crate::bench::host::{bytes_allocated, mem_available};
use crate::bench::sample::sample;
use crate::bench::stats::{Summary, ratio, summarize};
use crate::bench::{BenchDensityArgs, BenchError};
use crate::client::Client;
use forkvm_api::wire::{ForkOutcome, Instance};
use forkvm_core::Stage;
use indicatif::ProgressBar;
use serde::Serialize;
use std::collections::BTreeMap;

/// One source's request and its forks.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRun {
    /// MiB the guest filled before the forks (0: the fresh source).
    pub touched_mib: u32,
    pub source_boot_ms: f64,
    /// How long the guest's fill took (client clock), ms.
    pub fill_ms: Option<f64>,
    /// The guest's `free -k` `Mem:` row after the fill, bytes per column.
    pub guest_memory_bytes: GuestMemory,
    /// Allocated bytes of the source's own memory file: what it touched.
    pub source_mem_file_bytes: Option<f64>,
    /// Forks requested (`count`).
    pub requested: u32,
    /// Forks made.
    pub ok: usize,
    /// Forks that answered HTTP on their own address.
    pub verified: usize,
    /// The request's round trip on the client's clock (all forks ready), ms.
    pub request_ms: f64,
    /// The source's pause for the capture (`stages.snapshot`), ms.
    pub snapshot_ms: Option<f64>,
    /// Per fork: request sent → fork ready, client clock ([`client_ready_ms`]).
    pub request_to_ready_ms: Option<Summary>,
    /// Per fork: the daemon's `snapshot + total` (no wait for a slot).
    pub daemon_request_to_ready_ms: Option<Summary>,
    pub footprint: Footprint,
}

/// Both runs and their ratios.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub fresh: CompareRun,
    pub touched: CompareRun,
    /// touched / fresh of: `request_to_ready` (median per fork, client
    /// clock), `request` (the request's round trip), `pause`
    /// (`stages.snapshot`), `mem_available_drop_per_fork`,
    /// `mem_available_drop_per_fork_excl_base`, `pss` and `private_dirty`
    /// (medians per fork QEMU).
    pub ratios: BTreeMap<String, Option<f64>>,
}

/// The fresh source's run, then the touched one's. Returns the comparison
/// and the touched source, still running, for the fan-out.
pub(in crate::bench) async fn run(
    c: &Client,
    env: &BenchEnv,
    a: &BenchDensityArgs,
    pb: &ProgressBar,
    failures: &mut Vec<String>,
) -> Result<(Comparison, Instance), BenchError> {
    pb.set_message(format!("fresh {} MiB source", a.size_mib));
    let (src, boot_ms) = create_source(c, env, "fresh", a.size_mib).await?;
    let (mem, _) = fill(c, &src, 0).await?;
    let mut fresh = forks_of(c, env, &src, "fr", a.forks, failures).await;
    (fresh.source_boot_ms, fresh.guest_memory_bytes) = (boot_ms, mem);
    delete_quietly(c, &src.id, failures).await;
    pb.inc(1);

    pb.set_message(format!("touched source: filling {} MiB", a.touch_mib));
    let (src, boot_ms) = create_source(c, env, "touched", a.size_mib).await?;
    let (mem, fill_ms) = fill(c, &src, a.touch_mib).await?;
    pb.set_message(format!("touched source: {} forks", a.forks));
    let mut touched = forks_of(c, env, &src, "to", a.forks, failures).await;
    touched.touched_mib = a.touch_mib;
    touched.fill_ms = Some(fill_ms);
    (touched.source_boot_ms, touched.guest_memory_bytes) = (boot_ms, mem);
    pb.inc(1);
    let ratios = compare_ratios(&touched, &fresh);
    Ok((
        Comparison {
            fresh,
            touched,
            ratios,
        },
        src,
    ))
}

/// One request for `k` forks of the running `src`; the forks are measured,
/// checked over HTTP and deleted. Failures are recorded, not raised.
async fn forks_of(
    c: &Client,
    env: &BenchEnv,
    src: &Instance,
    name: &str,
    k: u32,
    failures: &mut Vec<String>,
) -> CompareRun {
    let source_mem = bytes_allocated(&env.mem_dir.join(format!("{}.mem", src.id)));
    // The same quiet period before as after, so both readings see a
    // settled host.
    tokio::time::sleep(SETTLE).await;
    let before = mem_available();
    let req = fork_request(c, &src.id, name, k, true).await;
    let mut forks = vec![];
    match req.result {
        Ok(outs) => {
            for o in outs {
                match o {
                    ForkOutcome::Created(i) => forks.push(*i),
                    ForkOutcome::Failed(f) => {
                        failures.push(format!("{}: {}", f.name, f.error.message))
                    }
                }
            }
        }
        Err(e) => failures.push(format!("{name}: fork of {} failed: {e}", src.name)),
    }
    let base = forks.first().and_then(|f| f.base.clone());
    let footprint = measure(&env.mem_dir, before, &forks, base.as_deref(), failures).await;
    let mut verified = 0;
    for f in &forks {
        if env.http_ok(f.network.ip.as_deref().unwrap_or_default()) {
            verified += 1;
        } else {
            failures.push(format!("{}: no HTTP answer", f.name));
        }
    }
    let samples: Vec<_> = forks.iter().map(|f| sample(f, None, None)).collect();
    for f in &forks {
        delete_quietly(c, &f.id, failures).await;
    }
    CompareRun {
        touched_mib: 0,
        source_boot_ms: 0.0,
        fill_ms: None,
        guest_memory_bytes: GuestMemory::new(),
        source_mem_file_bytes: source_mem,
        requested: k,
        ok: forks.len(),
        verified,
        request_ms: req.ms,
        snapshot_ms: samples
            .first()
            .and_then(|s| s.stages_ms.get(Stage::Snapshot.as_str()).copied()),
        request_to_ready_ms: summarize(
            &forks
                .iter()
                .filter_map(|f| client_ready_ms(f, req.sent))
                .collect::<Vec<_>>(),
        ),
        daemon_request_to_ready_ms: summarize(
            &samples
                .iter()
                .filter_map(|s| s.request_to_ready_ms)
                .collect::<Vec<_>>(),
        ),
        footprint,
    }
}

/// touched / fresh of every compared figure (see [`Comparison::ratios`]).
pub(in crate::bench) fn compare_ratios(
    touched: &CompareRun,
    fresh: &CompareRun,
) -> BTreeMap<String, Option<f64>> {
    let med = |s: Option<Summary>| s.map(|s| s.median);
    let pair = |f: &dyn Fn(&CompareRun) -> Option<f64>| ratio(f(touched), f(fresh));
    BTreeMap::from([
        (
            "request_to_ready".to_string(),
            pair(&|r| med(r.request_to_ready_ms)),
        ),
        ("request".to_string(), pair(&|r| Some(r.request_ms))),
        ("pause".to_string(), pair(&|r| r.snapshot_ms)),
        (
            "mem_available_drop_per_fork".to_string(),
            pair(&|r| r.footprint.mem_available_drop_per_fork_bytes),
        ),
        (
            "mem_available_drop_per_fork_excl_base".to_string(),
            pair(&|r| r.footprint.drop_per_fork_excl_base_bytes),
        ),
        ("pss".to_string(), pair(&|r| med(r.footprint.pss_bytes))),
        (
            "private_dirty".to_string(),
            pair(&|r| med(r.footprint.private_dirty_bytes)),
        ),
    ])
}

/// A run with the given medians, for tests.
#[cfg(test)]
pub(in crate::bench) fn fake_run(touched_mib: u32, ready: f64, pause: f64, mib: f64) -> CompareRun {
    const MIB: f64 = 1024.0 * 1024.0;
    let one = |v: f64| summarize(&[v]);
    CompareRun {
        touched_mib,
        source_boot_ms: 3000.0,
        fill_ms: (touched_mib > 0).then_some(20_000.0),
        guest_memory_bytes: GuestMemory::from([("shared".to_string(), 1 << 20)]),
        source_mem_file_bytes: Some((100.0 + f64::from(touched_mib)) * MIB),
        requested: 4,
        ok: 4,
        verified: 4,
        request_ms: ready + 200.0,
        snapshot_ms: Some(pause),
        request_to_ready_ms: one(ready),
        daemon_request_to_ready_ms: one(ready - 50.0),
        footprint: Footprint {
            forks: 4,
            mem_available_drop_per_fork_bytes: Some(mib * 2.0 * MIB),
            drop_per_fork_excl_base_bytes: Some(mib * MIB),
            new_base_bytes: Some((100.0 + f64::from(touched_mib)) * MIB),
            pss_bytes: one(mib * 1.5 * MIB),
            private_dirty_bytes: one(mib * 0.9 * MIB),
            private_bytes: one(mib * MIB),
            ..Footprint::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_touched_over_fresh() {
        let r = compare_ratios(
            &fake_run(600, 600.0, 400.0, 60.0),
            &fake_run(0, 500.0, 80.0, 50.0),
        );
        let near = |k: &str, want: f64| {
            let got = r[k].unwrap();
            assert!((got - want).abs() < 1e-9, "{k}: {got} != {want}");
        };
        near("request_to_ready", 1.2);
        near("request", 800.0 / 700.0);
        near("pause", 5.0);
        near("mem_available_drop_per_fork", 1.2);
        near("mem_available_drop_per_fork_excl_base", 1.2);
        near("pss", 1.2);
        near("private_dirty", 1.2);
        let mut none = fake_run(0, 500.0, 80.0, 50.0);
        none.snapshot_ms = None;
        assert_eq!(
            compare_ratios(&fake_run(600, 1.0, 1.0, 1.0), &none)["pause"],
            None
        );
    }
}
