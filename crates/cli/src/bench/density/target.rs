//! Scenario: fan-out to a target. The touched source goes into Standby
//! once — its memory file becomes one immutable base, with no copy — and is
//! forked in batches (`--batch` forks per request) until `--target` forks
//! run at once; then every fork is measured and fetched over HTTP on its own
//! address.
//!
//! Why Standby and not `from_running` each time: every capture of a running
//! source copies its touched memory into a new base (600+ MiB and a pause of
//! the source per request), and forks of different bases share nothing; a
//! fork of a fork would be captured by live migration. One Standby source is
//! the case the density goal is about: many forks on one shared base.
//!
//! The daemon refusing for capacity (409 `exhausted`) or the host running
//! low on memory ends the fan-out early: a finding, not a failure.

use super::{capacity_refusal, client_ready_ms, fork_request, is_capacity};
use crate::bench::footprint::{Footprint, base_file, measure};
use crate::bench::harness::{BenchEnv, delete_quietly};
use crate::bench::host::{bytes_allocated, mem_available};
use crate::bench::sample::sample;
use crate::bench::stats::{Summary, summarize};
use crate::bench::{BenchDensityArgs, BenchError};
use crate::client::Client;
use forkvm_api::wire::{ForkOutcome, Instance};
use indicatif::ProgressBar;
use serde::Serialize;
use std::time::Instant;

/// The fan-out stops before a request when the host has less available.
const MIN_HOST_AVAILABLE_BYTES: f64 = 2.0 * 1024.0 * 1024.0 * 1024.0;

/// Tries of the HTTP check per fork: with every fork running, a guest under
/// TCG on a saturated host can miss one 5 s window.
pub const HTTP_ATTEMPTS: u32 = 3;

/// Why the fan-out stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// `--target` forks run.
    Reached,
    /// The daemon refused a request or a fork for capacity (409 `exhausted`).
    Capacity,
    /// The host's MemAvailable fell below 2 GiB.
    HostMemoryLow,
    /// A request failed, or made no fork, for another reason.
    ForkFailed,
}

impl Stop {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reached => "reached",
            Self::Capacity => "capacity",
            Self::HostMemoryLow => "host_memory_low",
            Self::ForkFailed => "fork_failed",
        }
    }
}

/// The fan-out's figures.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    /// Time to put the source in Standby (its memory becomes the base), ms.
    pub standby_ms: f64,
    /// Allocated bytes of the base every fork maps.
    pub base_bytes: Option<f64>,
    /// Fork requests sent.
    pub requests: usize,
    /// Forks running at once at the end.
    pub running: usize,
    /// Of those, forks that answered HTTP on their own address, within
    /// [`HTTP_ATTEMPTS`] tries of 5 s.
    pub answered: usize,
    /// Forks that answered the first try.
    pub answered_first_try: usize,
    pub stop: Stop,
    /// The daemon's or the bench's words for an early stop.
    pub stop_detail: Option<String>,
    /// First request sent → last request answered, s.
    pub forks_wall_s: f64,
    /// Standby → everything deleted, s.
    pub wall_s: f64,
    /// Per fork: request sent → ready, client clock (includes the wait for
    /// a slot in its batch).
    pub request_to_ready_ms: Option<Summary>,
    /// Per fork: the daemon's `queued + total`.
    pub daemon_request_to_ready_ms: Option<Summary>,
    /// Per request: round trip on the client's clock.
    pub request_ms: Option<Summary>,
    /// Each request's round trip in order, ms: how a fork's cost grows
    /// with the forks already running.
    pub request_ms_each: Vec<f64>,
    /// MemAvailable before the first request → with every fork running;
    /// `mem_available_after_bytes` is the host's MemAvailable at the end.
    pub footprint: Footprint,
}

/// The forks the batches made and how the fan-out ended.
#[derive(Default)]
struct Batches {
    forks: Vec<Instance>,
    ready_ms: Vec<f64>,
    request_ms: Vec<f64>,
    stop: Option<(Stop, Option<String>)>,
}

/// Puts `src` in Standby, forks it to `--target`, measures, checks, and
/// deletes every fork and the source.
pub(in crate::bench) async fn run(
    c: &Client,
    env: &BenchEnv,
    a: &BenchDensityArgs,
    src: &Instance,
    pb: &ProgressBar,
    failures: &mut Vec<String>,
) -> Result<TargetResult, BenchError> {
    let started = Instant::now();
    c.standby(&src.id).await?;
    let standby_ms = started.elapsed().as_secs_f64() * 1000.0;
    let before = mem_available();
    let t = Instant::now();
    let b = batches(c, src, a, pb, failures).await;
    let forks_wall_s = t.elapsed().as_secs_f64();
    pb.set_message(format!("fan-out: measuring {} forks", b.forks.len()));
    let footprint = measure(&env.mem_dir, before, &b.forks, None, failures).await;
    let base_bytes = b
        .forks
        .first()
        .and_then(|f| f.base.as_deref())
        .and_then(|id| bytes_allocated(&base_file(&env.mem_dir, id)));
    pb.set_message(format!("fan-out: HTTP to {} forks", b.forks.len()));
    let (answered, answered_first_try) = check_http(env, &b.forks, failures).await;
    pb.set_message(format!("fan-out: deleting {} forks", b.forks.len()));
    for f in &b.forks {
        delete_quietly(c, &f.id, failures).await;
    }
    delete_quietly(c, &src.id, failures).await;
    let samples: Vec<_> = b.forks.iter().map(|f| sample(f, None, None)).collect();
    let (stop, stop_detail) = b.stop.unwrap_or((Stop::Reached, None));
    Ok(TargetResult {
        standby_ms,
        base_bytes,
        requests: b.request_ms.len(),
        running: b.forks.len(),
        answered,
        answered_first_try,
        stop,
        stop_detail,
        forks_wall_s,
        wall_s: started.elapsed().as_secs_f64(),
        request_to_ready_ms: summarize(&b.ready_ms),
        daemon_request_to_ready_ms: summarize(
            &samples
                .iter()
                .filter_map(|s| s.request_to_ready_ms)
                .collect::<Vec<_>>(),
        ),
        request_ms: summarize(&b.request_ms),
        request_ms_each: b.request_ms,
        footprint,
    })
}

/// Requests of `--batch` forks of the Standby `src` until `--target` run,
/// or the daemon, the host or a request says stop.
async fn batches(
    c: &Client,
    src: &Instance,
    a: &BenchDensityArgs,
    pb: &ProgressBar,
    failures: &mut Vec<String>,
) -> Batches {
    let mut b = Batches::default();
    let target = a.target as usize;
    while b.forks.len() < target {
        if let Some(avail) = mem_available().filter(|&m| m < MIN_HOST_AVAILABLE_BYTES) {
            b.stop = Some((Stop::HostMemoryLow, Some(low_memory(avail))));
            break;
        }
        let n = a.batch.min((target - b.forks.len()) as u32);
        pb.set_message(format!("fan-out: {} of {target} running", b.forks.len()));
        let name = format!("d{}", b.request_ms.len() + 1);
        let req = fork_request(c, &src.id, &name, n, false).await;
        b.request_ms.push(req.ms);
        let outs = match req.result {
            Ok(outs) => outs,
            Err(e) => {
                b.stop = Some(match capacity_refusal(&e) {
                    Some(m) => (Stop::Capacity, Some(m)),
                    None => {
                        failures.push(format!("{name}: {e}"));
                        (Stop::ForkFailed, Some(e.to_string()))
                    }
                });
                break;
            }
        };
        let made = b.forks.len();
        for o in outs {
            match o {
                ForkOutcome::Created(i) => {
                    b.ready_ms.extend(client_ready_ms(&i, req.sent));
                    b.forks.push(*i);
                }
                ForkOutcome::Failed(f) if is_capacity(&f.error.code) => {
                    b.stop = Some((Stop::Capacity, Some(f.error.message)));
                }
                ForkOutcome::Failed(f) => failures.push(format!("{}: {}", f.name, f.error.message)),
            }
        }
        if b.stop.is_none() && b.forks.len() == made {
            b.stop = Some((Stop::ForkFailed, Some(format!("{name}: no fork made"))));
        }
        if b.stop.is_some() {
            break;
        }
    }
    b
}

/// Every fork's page over HTTP, up to [`HTTP_ATTEMPTS`] tries each (1 s
/// apart); returns how many answered at all and how many the first time. A
/// fork that never answers is a failure, with curl's last reason.
async fn check_http(
    env: &BenchEnv,
    forks: &[Instance],
    failures: &mut Vec<String>,
) -> (usize, usize) {
    let (mut answered, mut first) = (0, 0);
    for f in forks {
        let ip = f.network.ip.as_deref().unwrap_or_default();
        let mut last = Ok(());
        for attempt in 1..=HTTP_ATTEMPTS {
            if attempt > 1 {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            last = env.http_get(ip);
            if last.is_ok() {
                answered += 1;
                first += usize::from(attempt == 1);
                break;
            }
        }
        if let Err(e) = last {
            failures.push(format!(
                "{} ({ip}): no HTTP answer in {HTTP_ATTEMPTS} tries: {e}",
                f.name
            ));
        }
    }
    (answered, first)
}

fn low_memory(avail: f64) -> String {
    format!(
        "host MemAvailable {:.0} MiB < {:.0} MiB",
        avail / 1048576.0,
        MIN_HOST_AVAILABLE_BYTES / 1048576.0
    )
}
