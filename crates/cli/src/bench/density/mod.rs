//! `forkvm bench density`: what copy-on-write forks cost when the source
//! has touched a lot of memory, and how many of them one host runs at once.
//!
//! Two scenarios against one private daemon ([`BenchEnv`]):
//! - [`compare`]: the same `count: k` fork request from a running source
//!   that filled `--touch-mib` of its memory with random data, and from a
//!   fresh one; per fork the host memory it costs, request→ready and the
//!   source's pause, and the ratios touched/fresh;
//! - [`target`]: the touched source put in Standby once (its memory becomes
//!   one base) and forked in batches until `--target` forks run at once,
//!   each checked over HTTP on its own address.
//!
//! [`goals`] checks the goals against the figures; [`render`]
//! prints the tables.

pub mod compare;
pub mod goals;
mod render;
pub mod target;

use super::harness::{BenchEnv, outcomes};
use super::host::Machine;
use super::{BenchDensityArgs, BenchError};
use crate::client::{Client, ClientError};
use chrono::{DateTime, Utc};
use compare::Comparison;
use forkvm_api::wire::{ExecParams, ForkOutcome, Instance, InstanceForkParams};
use forkvm_core::Stage;
pub use render::render_density;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;
use target::TargetResult;

/// What `forkvm bench density --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct DensityReport {
    pub machine: Machine,
    pub density: Density,
    pub failures: Vec<String>,
    pub wall_s: f64,
}

/// The density run: its settings and both scenarios.
#[derive(Debug, Clone, Serialize)]
pub struct Density {
    pub size_mib: u32,
    pub touch_mib: u32,
    /// Forks per request in the comparison.
    pub forks: u32,
    /// Forks the fan-out aims to run at once (0: skipped).
    pub target: u32,
    /// Forks per request in the fan-out.
    pub batch: u32,
    /// The daemon's capacity settings this run passed on (null: default).
    pub max_guest_memory_mb: Option<u64>,
    pub cow_reserve_percent: Option<u32>,
    /// The host's MemTotal, bytes.
    pub mem_total_bytes: Option<f64>,
    pub compare: Comparison,
    pub fanout: Option<TargetResult>,
    /// The goals against this run ([`goals::goals`]).
    pub goals: Vec<goals::Goal>,
}

impl Density {
    pub(super) fn settings(a: &BenchDensityArgs, compare: Comparison) -> Self {
        Self {
            size_mib: a.size_mib,
            touch_mib: a.touch_mib,
            forks: a.forks,
            target: a.target,
            batch: a.batch,
            max_guest_memory_mb: a.max_guest_memory_mb,
            cow_reserve_percent: a.cow_reserve_percent,
            mem_total_bytes: super::host::mem_total(),
            compare,
            fanout: None,
            goals: vec![],
        }
    }
}

/// The guest's own view of its memory after the fill: the `Mem:` row of
/// busybox `free -k`, column name → bytes (`used`, `shared`, ...). The fill
/// lives on the guest's RAM-backed root filesystem, so it shows as
/// `shared`/`buff/cache`.
pub type GuestMemory = BTreeMap<String, u64>;

/// Fills `mib` MiB of `src`'s memory with random data in a file on its root
/// filesystem (the initramfs, a tmpfs: RAM), then reads `free -k`; returns
/// the guest's memory and how long the fill took.
pub(super) async fn fill(
    c: &Client,
    src: &Instance,
    mib: u32,
) -> Result<(GuestMemory, f64), BenchError> {
    let script = if mib == 0 {
        "free -k".to_string()
    } else {
        // The root filesystem is the initramfs's tmpfs, capped at half the
        // guest's RAM: raise the cap first.
        format!(
            "mount -o remount,size=95% / && \
             dd if=/dev/urandom of=/root/fill bs=1M count={mib} 2>&1 && sync && free -k"
        )
    };
    let t = Instant::now();
    let r = c
        .exec(
            &src.id,
            &ExecParams {
                command: vec!["sh".into(), "-c".into(), script],
                timeout_s: Some(600),
                ..Default::default()
            },
        )
        .await?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if r.exit_code != 0 {
        return Err(BenchError::Unexpected(format!(
            "filling {mib} MiB in {} exited {}: {}{}",
            src.name, r.exit_code, r.stdout, r.stderr
        )));
    }
    let mem = parse_free(&r.stdout).ok_or_else(|| {
        BenchError::Unexpected(format!("no `Mem:` row in the guest's free: {}", r.stdout))
    })?;
    Ok((mem, ms))
}

/// The `Mem:` row of `free -k` (busybox or procps), column → bytes.
fn parse_free(out: &str) -> Option<GuestMemory> {
    let mut lines = out.lines().map(str::trim);
    let header: Vec<&str> = lines
        .by_ref()
        .find(|l| l.starts_with("total"))?
        .split_whitespace()
        .collect();
    let row = lines.find(|l| l.starts_with("Mem:"))?;
    let values = row.trim_start_matches("Mem:").split_whitespace();
    let mem: GuestMemory = header
        .into_iter()
        .zip(values)
        .filter_map(|(k, v)| Some((k.to_string(), v.parse::<u64>().ok()? * 1024)))
        .collect();
    (!mem.is_empty()).then_some(mem)
}

/// One fork request as the client saw it.
pub(super) struct Request {
    /// Wall clock when it was sent (compared with the forks' `created_at`).
    pub sent: DateTime<Utc>,
    /// Client-measured round trip, ms.
    pub ms: f64,
    pub result: Result<Vec<ForkOutcome>, ClientError>,
}

/// `POST /instances/{src}/fork` for `count` forks named `name-1..count`.
pub(super) async fn fork_request(
    c: &Client,
    src: &str,
    name: &str,
    count: u32,
    from_running: bool,
) -> Request {
    let sent = Utc::now();
    let t = Instant::now();
    let result = c
        .fork(
            src,
            &InstanceForkParams {
                name: name.into(),
                from_running: Some(from_running),
                count: Some(count),
                ..Default::default()
            },
        )
        .await
        .map(outcomes);
    Request {
        sent,
        ms: t.elapsed().as_secs_f64() * 1000.0,
        result,
    }
}

/// Per fork, request→ready on the client's clock: from the request being
/// sent to the fork answering on its address. The fork's record is created
/// when it gets its slot (`created_at`, the start of `stages.total`), so
/// this is `created_at − sent + total`: it includes the source's capture and
/// the wait for a slot (the daemon forks two at a time), like the daemon's
/// own `queued + total`, plus the request's way to the daemon.
pub(super) fn client_ready_ms(inst: &Instance, sent: DateTime<Utc>) -> Option<f64> {
    let total = inst
        .handoff
        .as_ref()?
        .stages_ms
        .get(Stage::Total.as_str())?;
    let waited = (inst.created_at - sent).num_microseconds()? as f64 / 1000.0;
    Some(waited + total)
}

/// A refusal for capacity: the daemon's 409 `exhausted`.
pub(super) fn is_capacity(code: &str) -> bool {
    code == "exhausted"
}

/// The capacity refusal of a whole request, if it is one.
pub(super) fn capacity_refusal(e: &ClientError) -> Option<String> {
    match e {
        ClientError::Api {
            status,
            code,
            message,
        } if status.as_u16() == 409 && is_capacity(code) => Some(message.clone()),
        _ => None,
    }
}

/// Runs both scenarios against the daemon in `env`; returns the figures
/// and the accelerator the sources ran with.
pub(super) async fn run(
    c: &Client,
    env: &BenchEnv,
    a: &BenchDensityArgs,
    pb: &indicatif::ProgressBar,
    failures: &mut Vec<String>,
) -> Result<(Density, Option<String>), BenchError> {
    let (cmp, touched_src) = compare::run(c, env, a, pb, failures).await?;
    let accel = touched_src.accel.clone();
    let mut d = Density::settings(a, cmp);
    if a.target > 0 {
        pb.set_message(format!("fan-out to {} forks", a.target));
        d.fanout = Some(target::run(c, env, a, &touched_src, pb, failures).await?);
    } else {
        super::harness::delete_quietly(c, &touched_src.id, failures).await;
    }
    pb.inc(1);
    d.goals = goals::goals(&d);
    Ok((d, accel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_busybox_free() {
        let out = "1+0 records in\n600+0 records out\n              total        used        free      shared  buff/cache   available\n\
                   Mem:         996952       30712      320704      623492      645536      334252\n\
                   Swap:             0           0           0\n";
        let m = parse_free(out).unwrap();
        assert_eq!(m["total"], 996952 * 1024);
        assert_eq!(m["shared"], 623492 * 1024);
        assert_eq!(m["available"], 334252 * 1024);
        assert_eq!(m.len(), 6);
        assert_eq!(parse_free("dd: out of space\n"), None);
    }

    #[test]
    fn client_ready_adds_the_wait_for_a_slot() {
        let mut i: Instance = serde_json::from_value(serde_json::json!({
            "id": "i", "name": "f-1", "image": "default", "state": "Running",
            "created_at": "2026-01-01T00:00:01.250Z",
            "handoff": {"stages_ms": {"snapshot": 100.0, "total": 300.5}}
        }))
        .unwrap();
        let sent: DateTime<Utc> = "2026-01-01T00:00:01Z".parse().unwrap();
        assert_eq!(client_ready_ms(&i, sent), Some(550.5));
        i.handoff = None;
        assert_eq!(client_ready_ms(&i, sent), None);
    }

    #[test]
    fn capacity_is_409_exhausted() {
        let e = |status: u16, code: &str| ClientError::Api {
            status: http::StatusCode::from_u16(status).unwrap(),
            code: code.into(),
            message: "not enough guest memory".into(),
        };
        assert_eq!(
            capacity_refusal(&e(409, "exhausted")).as_deref(),
            Some("not enough guest memory")
        );
        assert_eq!(capacity_refusal(&e(409, "conflict")), None);
        assert_eq!(capacity_refusal(&e(500, "exhausted")), None);
    }
}
