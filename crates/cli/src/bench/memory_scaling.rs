//! Scenario: memory scaling. For each size, a fresh source is booted and
//! forked three times in one request; fork time and the forks' memory are
//! compared against the smallest size.

use super::BenchError;
use super::harness::{BenchEnv, create_source, delete_quietly, outcomes};
use super::host::{bytes_allocated, private_bytes};
use super::sample::sample;
use super::stats::{median_of, ratio};
use crate::client::Client;
use forkvm_api::wire::{ForkOutcome, InstanceForkParams};
use forkvm_core::Stage;
use serde::Serialize;
use std::time::Duration;

/// How long after the forks run their memory is measured (part of the
/// metric's definition, not a readiness wait).
const MEMORY_SETTLE: Duration = Duration::from_secs(2);

/// One source size's figures; the ratios are filled in by [`memory_ratios`].
#[derive(Debug, Clone, Serialize)]
pub struct MemoryResult {
    pub size_mb: u32,
    pub source_boot_ms: f64,
    pub forks: usize,
    pub median_total_ms: Option<f64>,
    pub median_request_to_ready_ms: Option<f64>,
    /// Allocated bytes of each fork's memory file (st_blocks * 512), median.
    pub median_mem_file_bytes: Option<f64>,
    /// Private_Clean + Private_Dirty of each fork's QEMU, median.
    pub median_qemu_private_bytes: Option<f64>,
    pub source_mem_file_bytes: Option<f64>,
    pub fork_time_ratio: Option<f64>,
    pub request_to_ready_ratio: Option<f64>,
    pub mem_file_ratio: Option<f64>,
    pub qemu_private_ratio: Option<f64>,
}

/// Boots a `size` MiB source, forks it three times in one request, measures
/// the forks after [`MEMORY_SETTLE`] and deletes them all.
pub(super) async fn bench_memory(
    c: &Client,
    env: &BenchEnv,
    size: u32,
    failures: &mut Vec<String>,
) -> Result<MemoryResult, BenchError> {
    let (src, boot_ms) = create_source(c, env, &format!("mem{size}"), size).await?;
    let source_mem = bytes_allocated(&env.mem_dir.join(format!("{}.mem", src.id)));
    let resp = c
        .fork(
            &src.id,
            &InstanceForkParams {
                name: format!("m{size}"),
                from_running: Some(true),
                count: Some(3),
                ..Default::default()
            },
        )
        .await;
    let mut forks = vec![];
    match resp {
        Ok(r) => {
            for o in outcomes(r) {
                match o {
                    ForkOutcome::Created(i) => forks.push(*i),
                    ForkOutcome::Failed(f) => {
                        failures.push(format!("{}: {}", f.name, f.error.message))
                    }
                }
            }
        }
        Err(e) => failures.push(format!("memory {size} MiB: fork failed: {e}")),
    }
    tokio::time::sleep(MEMORY_SETTLE).await;
    let mut files = vec![];
    let mut private = vec![];
    let mut totals = vec![];
    let mut req = vec![];
    for f in &forks {
        let s = sample(f, None, None);
        totals.extend(s.stages_ms.get(Stage::Total.as_str()).copied());
        req.extend(s.request_to_ready_ms);
        files.extend(bytes_allocated(&env.mem_dir.join(format!("{}.mem", f.id))));
        match f.pid.and_then(private_bytes) {
            Some(b) => private.push(b),
            None => failures.push(format!("{}: no smaps_rollup for pid {:?}", f.name, f.pid)),
        }
    }
    for f in &forks {
        delete_quietly(c, &f.id, failures).await;
    }
    delete_quietly(c, &src.id, failures).await;
    Ok(MemoryResult {
        size_mb: size,
        source_boot_ms: boot_ms,
        forks: forks.len(),
        median_total_ms: median_of(&totals),
        median_request_to_ready_ms: median_of(&req),
        median_mem_file_bytes: median_of(&files),
        median_qemu_private_bytes: median_of(&private),
        source_mem_file_bytes: source_mem,
        fork_time_ratio: None,
        request_to_ready_ratio: None,
        mem_file_ratio: None,
        qemu_private_ratio: None,
    })
}

/// Fill in every size's ratios against the smallest size.
pub(super) fn memory_ratios(mem: &mut [MemoryResult]) {
    let Some(base) = mem.iter().min_by_key(|m| m.size_mb).cloned() else {
        return;
    };
    for m in mem.iter_mut() {
        m.fork_time_ratio = ratio(m.median_total_ms, base.median_total_ms);
        m.request_to_ready_ratio = ratio(
            m.median_request_to_ready_ms,
            base.median_request_to_ready_ms,
        );
        m.mem_file_ratio = ratio(m.median_mem_file_bytes, base.median_mem_file_bytes);
        m.qemu_private_ratio = ratio(m.median_qemu_private_bytes, base.median_qemu_private_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_ratios_are_against_the_smallest_size() {
        let m = |size_mb, t: f64, b: f64| MemoryResult {
            size_mb,
            source_boot_ms: 0.0,
            forks: 3,
            median_total_ms: Some(t),
            median_request_to_ready_ms: Some(t + 10.0),
            median_mem_file_bytes: Some(b),
            median_qemu_private_bytes: Some(b / 2.0),
            source_mem_file_bytes: None,
            fork_time_ratio: None,
            request_to_ready_ratio: None,
            mem_file_ratio: None,
            qemu_private_ratio: None,
        };
        let mut v = vec![m(1024, 300.0, 80.0), m(256, 100.0, 40.0)];
        memory_ratios(&mut v);
        assert_eq!(v[0].fork_time_ratio, Some(3.0));
        assert_eq!(v[0].mem_file_ratio, Some(2.0));
        assert_eq!(v[0].qemu_private_ratio, Some(2.0));
        assert_eq!(v[1].fork_time_ratio, Some(1.0));
    }
}
