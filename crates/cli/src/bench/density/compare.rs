//! Scenario: touched vs fresh source. The same request — `count: k` forks
//! from the running source — from a source that has not touched its memory
//! and from one whose guest filled `--touch-mib` with random data, in
//! `--rounds` interleaved rounds (the order alternates, so neither source
//! always goes first or meets the same host load); per fork the host memory
//! it costs, request→ready and the source's pause, and their ratios
//! touched/fresh.

use super::{GuestMemory, client_ready_ms, fill, fork_request};
use crate::bench::footprint::{Footprint, SETTLE, measure};
use crate::bench::harness::{BenchEnv, create_source, delete_quietly};
use crate::bench::host::{ProcessMemory, bytes_allocated, mem_available};
use crate::bench::sample::sample;
use crate::bench::stats::{Summary, ratio, summarize};
use crate::bench::{BenchDensityArgs, BenchError};
use crate::client::Client;
use forkvm_api::wire::{ForkOutcome, Instance};
use forkvm_core::Stage;
use indicatif::ProgressBar;
use serde::Serialize;
use std::collections::BTreeMap;

/// One source's requests and their forks, over every round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompareRun {
    /// MiB the guest filled before the forks (0: the fresh source).
    pub touched_mib: u32,
    pub source_boot_ms: f64,
    /// How long the guest's fill took (client clock), ms.
    pub fill_ms: Option<f64>,
    /// The guest's `free -k` `Mem:` row after the fill, bytes per column.
    pub guest_memory_bytes: GuestMemory,
    /// Allocated bytes of the source's own memory file before the first
    /// request: what it touched.
    pub source_mem_file_bytes: Option<f64>,
    /// Forks per request (`count`).
    pub requested: u32,
    /// Requests made (one per round).
    pub requests: usize,
    /// Forks made, over all requests.
    pub ok: usize,
    /// Forks that answered HTTP on their own address.
    pub verified: usize,
    /// Per request: round trip on the client's clock (all forks ready), ms.
    pub request_ms: Option<Summary>,
    /// Per request: the capture of the running source (`stages.snapshot`), ms.
    pub capture_ms: Option<Summary>,
    /// Per request: how long the source's vCPUs were stopped for it
    /// (`stages.source_pause`), ms.
    pub pause_ms: Option<Summary>,
    /// Per fork: request sent → fork ready, client clock ([`client_ready_ms`]).
    pub request_to_ready_ms: Option<Summary>,
    /// Per fork: the daemon's `queued + total` (request start to ready).
    pub daemon_request_to_ready_ms: Option<Summary>,
    /// Per request: allocated bytes of the base it captured.
    pub base_bytes: Option<Summary>,
    /// Per request: the host's MemAvailable drop / forks, bytes.
    pub mem_available_drop_per_fork_bytes: Option<Summary>,
    /// Per request: the same less the captured base, bytes.
    pub mem_available_drop_per_fork_excl_base_bytes: Option<Summary>,
    /// Per fork QEMU: Pss, Private_Dirty, and the guest RAM part of it.
    pub pss_bytes: Option<Summary>,
    pub private_dirty_bytes: Option<Summary>,
    pub guest_ram_private_dirty_bytes: Option<Summary>,
    /// Each request's own measurement, in order.
    pub footprints: Vec<Footprint>,
}

/// Both sources' runs and their ratios.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Rounds of one request per source.
    pub rounds: u32,
    pub fresh: CompareRun,
    pub touched: CompareRun,
    /// touched / fresh of the medians: `request_to_ready` (per fork, client
    /// clock), `request` (the request's round trip), `pause`
    /// (`stages.source_pause`), `mem_available_drop_per_fork`,
    /// `mem_available_drop_per_fork_excl_base`, and per fork QEMU `pss`,
    /// `private_dirty` and `guest_ram_private_dirty`.
    pub ratios: BTreeMap<String, Option<f64>>,
}

/// What one request measured, gathered over the rounds.
#[derive(Default)]
struct Requests {
    request_ms: Vec<f64>,
    capture_ms: Vec<f64>,
    pause_ms: Vec<f64>,
    ready_ms: Vec<f64>,
    daemon_ms: Vec<f64>,
    ok: usize,
    verified: usize,
    footprints: Vec<Footprint>,
}

/// Which source goes first in round `r` (0: fresh, 1: touched).
pub(in crate::bench) fn round_order(r: u32) -> [usize; 2] {
    if r.is_multiple_of(2) { [0, 1] } else { [1, 0] }
}

/// Boots both sources (the touched one filled), runs the rounds and
/// deletes the fresh source. Returns the comparison and the touched
/// source, still running, for the fan-out.
pub(in crate::bench) async fn run(
    c: &Client,
    env: &BenchEnv,
    a: &BenchDensityArgs,
    pb: &ProgressBar,
    failures: &mut Vec<String>,
) -> Result<(Comparison, Instance), BenchError> {
    pb.set_message(format!("booting two {} MiB sources", a.size_mib));
    let mut runs = [CompareRun::default(), CompareRun::default()];
    let mut srcs = vec![];
    for (i, name) in ["fresh", "touched"].into_iter().enumerate() {
        let (src, boot_ms) = create_source(c, env, name, a.size_mib).await?;
        let touch = if i == 0 { 0 } else { a.touch_mib };
        pb.set_message(format!("{name} source: filling {touch} MiB"));
        let (mem, fill_ms) = fill(c, &src, touch).await?;
        runs[i] = CompareRun {
            touched_mib: touch,
            source_boot_ms: boot_ms,
            fill_ms: (touch > 0).then_some(fill_ms),
            guest_memory_bytes: mem,
            source_mem_file_bytes: bytes_allocated(&env.mem_dir.join(format!("{}.mem", src.id))),
            requested: a.forks,
            ..CompareRun::default()
        };
        srcs.push(src);
    }
    pb.inc(1);
    let mut reqs = [Requests::default(), Requests::default()];
    for r in 0..a.rounds {
        for i in round_order(r) {
            pb.set_message(format!("round {}/{}: {}", r + 1, a.rounds, srcs[i].name));
            let name = format!("{}{}", &srcs[i].name[..2], r + 1);
            one_request(c, env, &srcs[i], &name, a.forks, &mut reqs[i], failures).await;
            pb.inc(1);
        }
    }
    delete_quietly(c, &srcs[0].id, failures).await;
    let [fresh, touched] = runs;
    let [rf, rt] = reqs;
    let (fresh, touched) = (summarized(fresh, rf), summarized(touched, rt));
    let ratios = compare_ratios(&touched, &fresh);
    let cmp = Comparison {
        rounds: a.rounds,
        fresh,
        touched,
        ratios,
    };
    Ok((cmp, srcs.swap_remove(1)))
}

/// One request for `k` forks of the running `src`; the forks are measured,
/// checked over HTTP and deleted. Failures are recorded, not raised.
async fn one_request(
    c: &Client,
    env: &BenchEnv,
    src: &Instance,
    name: &str,
    k: u32,
    into: &mut Requests,
    failures: &mut Vec<String>,
) {
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
    let fp = measure(&env.mem_dir, before, &forks, base.as_deref(), failures).await;
    for f in &forks {
        if env.http_ok(f.network.ip.as_deref().unwrap_or_default()) {
            into.verified += 1;
        } else {
            failures.push(format!("{}: no HTTP answer", f.name));
        }
        let s = sample(f, None, None);
        into.daemon_ms.extend(s.request_to_ready_ms);
        into.ready_ms.extend(client_ready_ms(f, req.sent));
        into.ok += 1;
    }
    // One capture per request: every fork carries it.
    let stage = |s: Stage| {
        forks
            .first()
            .and_then(|f| f.handoff.as_ref()?.stages_ms.get(s.as_str()).copied())
    };
    into.capture_ms.extend(stage(Stage::Snapshot));
    into.pause_ms.extend(stage(Stage::SourcePause));
    for f in &forks {
        delete_quietly(c, &f.id, failures).await;
    }
    into.request_ms.push(req.ms);
    into.footprints.push(fp);
}

/// `run` with the summaries of its requests.
fn summarized(run: CompareRun, r: Requests) -> CompareRun {
    let per_request = |f: fn(&Footprint) -> Option<f64>| {
        summarize(&r.footprints.iter().filter_map(f).collect::<Vec<_>>())
    };
    let procs: Vec<ProcessMemory> = r.footprints.iter().flat_map(|f| f.procs.clone()).collect();
    let per_fork = |f: fn(&ProcessMemory) -> Option<f64>| {
        summarize(&procs.iter().filter_map(f).collect::<Vec<_>>())
    };
    CompareRun {
        requests: r.request_ms.len(),
        ok: r.ok,
        verified: r.verified,
        request_ms: summarize(&r.request_ms),
        capture_ms: summarize(&r.capture_ms),
        pause_ms: summarize(&r.pause_ms),
        request_to_ready_ms: summarize(&r.ready_ms),
        daemon_request_to_ready_ms: summarize(&r.daemon_ms),
        base_bytes: per_request(|f| f.new_base_bytes),
        mem_available_drop_per_fork_bytes: per_request(|f| f.mem_available_drop_per_fork_bytes),
        mem_available_drop_per_fork_excl_base_bytes: per_request(|f| {
            f.mem_available_drop_per_fork_excl_base_bytes
        }),
        pss_bytes: per_fork(|m| Some(m.pss)),
        private_dirty_bytes: per_fork(|m| Some(m.private_dirty)),
        guest_ram_private_dirty_bytes: per_fork(|m| m.file_private_dirty),
        footprints: r.footprints,
        ..run
    }
}

/// One figure of a run.
type Figure = fn(&CompareRun) -> Option<Summary>;

/// touched / fresh of every compared figure (see [`Comparison::ratios`]).
pub(in crate::bench) fn compare_ratios(
    touched: &CompareRun,
    fresh: &CompareRun,
) -> BTreeMap<String, Option<f64>> {
    let rows: [(&str, Figure); 8] = [
        ("request_to_ready", |r| r.request_to_ready_ms),
        ("request", |r| r.request_ms),
        ("pause", |r| r.pause_ms),
        ("mem_available_drop_per_fork", |r| {
            r.mem_available_drop_per_fork_bytes
        }),
        ("mem_available_drop_per_fork_excl_base", |r| {
            r.mem_available_drop_per_fork_excl_base_bytes
        }),
        ("pss", |r| r.pss_bytes),
        ("private_dirty", |r| r.private_dirty_bytes),
        ("guest_ram_private_dirty", |r| {
            r.guest_ram_private_dirty_bytes
        }),
    ];
    rows.into_iter()
        .map(|(k, f)| {
            let med = |r: &CompareRun| f(r).map(|s| s.median);
            (k.to_string(), ratio(med(touched), med(fresh)))
        })
        .collect()
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
        requests: 3,
        ok: 12,
        verified: 12,
        request_ms: one(ready + 200.0),
        capture_ms: one(pause + 40.0),
        pause_ms: one(pause),
        request_to_ready_ms: one(ready),
        daemon_request_to_ready_ms: one(ready - 50.0),
        base_bytes: one((100.0 + f64::from(touched_mib)) * MIB),
        mem_available_drop_per_fork_bytes: one(mib * 2.0 * MIB),
        mem_available_drop_per_fork_excl_base_bytes: one(mib * MIB),
        pss_bytes: one(mib * 1.5 * MIB),
        private_dirty_bytes: one(mib * 0.9 * MIB),
        guest_ram_private_dirty_bytes: one(mib * 0.1 * MIB),
        footprints: [mib - 3.0, mib, mib + 30.0]
            .map(|d| Footprint {
                mem_available_drop_per_fork_excl_base_bytes: Some(d * MIB),
                ..Footprint::default()
            })
            .to_vec(),
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
        near("guest_ram_private_dirty", 1.2);
        let mut none = fake_run(0, 500.0, 80.0, 50.0);
        none.pause_ms = None;
        assert_eq!(round_order(0), [0, 1]);
        assert_eq!(round_order(1), [1, 0]);
        assert_eq!(round_order(2), [0, 1]);
        assert_eq!(
            compare_ratios(&fake_run(600, 1.0, 1.0, 1.0), &none)["pause"],
            None
        );
    }
}
