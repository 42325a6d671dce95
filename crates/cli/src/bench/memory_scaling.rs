//! Scenario: memory scaling. For each size, a fresh source is booted and
//! forked three times in one request; fork time and the forks' host memory
//! ([`footprint`](super::footprint)) are compared against the smallest size.

use super::BenchError;
use super::footprint::{Footprint, measure};
use super::harness::{BenchEnv, create_source, delete_quietly, outcomes};
use super::host::{bytes_allocated, mem_available};
use super::sample::sample;
use super::stats::{median_of, ratio};
use crate::client::Client;
use forkvm_api::wire::{ForkOutcome, Instance, InstanceForkParams};
use forkvm_core::Stage;
use serde::Serialize;

/// Forks per size, one request.
const FORKS: u32 = 3;

/// One source size's figures; the ratios are filled in by [`memory_ratios`].
#[derive(Debug, Clone, Serialize)]
pub struct MemoryResult {
    pub size_mb: u32,
    pub source_boot_ms: f64,
    pub forks: usize,
    pub median_total_ms: Option<f64>,
    pub median_request_to_ready_ms: Option<f64>,
    /// Private_Clean + Private_Dirty of each fork's QEMU, median.
    pub median_qemu_private_bytes: Option<f64>,
    /// Private_Dirty of each fork's QEMU, median.
    pub median_qemu_private_dirty_bytes: Option<f64>,
    /// Of that, the guest RAM the fork wrote (copied on write), median.
    pub median_guest_ram_private_dirty_bytes: Option<f64>,
    /// Pss of each fork's QEMU, median.
    pub median_qemu_pss_bytes: Option<f64>,
    /// The host's MemAvailable drop across the request, per fork (includes
    /// the base the request captured).
    pub mem_available_drop_per_fork_bytes: Option<f64>,
    /// The same less the captured base: the forks' own cost.
    pub mem_available_drop_per_fork_excl_base_bytes: Option<f64>,
    /// Allocated bytes of the base captured from the source for the forks.
    pub base_bytes: Option<f64>,
    /// Allocated bytes of the source's own memory file.
    pub source_mem_file_bytes: Option<f64>,
    pub fork_time_ratio: Option<f64>,
    pub request_to_ready_ratio: Option<f64>,
    pub qemu_private_ratio: Option<f64>,
    pub qemu_pss_ratio: Option<f64>,
}

/// Boots a `size` MiB source, forks it [`FORKS`] times in one request,
/// measures the forks' memory and deletes them all.
pub(super) async fn bench_memory(
    c: &Client,
    env: &BenchEnv,
    size: u32,
    failures: &mut Vec<String>,
) -> Result<MemoryResult, BenchError> {
    let (src, boot_ms) = create_source(c, env, &format!("mem{size}"), size).await?;
    let source_mem = bytes_allocated(&env.mem_dir.join(format!("{}.mem", src.id)));
    let before = mem_available();
    let resp = c
        .fork(
            &src.id,
            &InstanceForkParams {
                name: format!("m{size}"),
                from_running: Some(true),
                count: Some(FORKS),
                ..Default::default()
            },
        )
        .await;
    let mut forks: Vec<Instance> = vec![];
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
    let base = forks.first().and_then(|f| f.base.clone());
    let fp = measure(&env.mem_dir, before, &forks, base.as_deref(), failures).await;
    let samples: Vec<_> = forks.iter().map(|f| sample(f, None, None)).collect();
    for f in &forks {
        delete_quietly(c, &f.id, failures).await;
    }
    delete_quietly(c, &src.id, failures).await;
    let totals: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.stages_ms.get(Stage::Total.as_str()).copied())
        .collect();
    let req: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.request_to_ready_ms)
        .collect();
    Ok(memory_result(size, boot_ms, source_mem, &totals, &req, &fp))
}

/// One size's record from its measurements (ratios still empty).
pub(super) fn memory_result(
    size_mb: u32,
    source_boot_ms: f64,
    source_mem_file_bytes: Option<f64>,
    totals: &[f64],
    request_to_ready: &[f64],
    fp: &Footprint,
) -> MemoryResult {
    let med = |s: Option<super::stats::Summary>| s.map(|s| s.median);
    MemoryResult {
        size_mb,
        source_boot_ms,
        forks: fp.forks,
        median_total_ms: median_of(totals),
        median_request_to_ready_ms: median_of(request_to_ready),
        median_qemu_private_bytes: med(fp.private_bytes),
        median_qemu_private_dirty_bytes: med(fp.private_dirty_bytes),
        median_guest_ram_private_dirty_bytes: med(fp.guest_ram_private_dirty_bytes),
        median_qemu_pss_bytes: med(fp.pss_bytes),
        mem_available_drop_per_fork_bytes: fp.mem_available_drop_per_fork_bytes,
        mem_available_drop_per_fork_excl_base_bytes: fp.mem_available_drop_per_fork_excl_base_bytes,
        base_bytes: fp.new_base_bytes,
        source_mem_file_bytes,
        fork_time_ratio: None,
        request_to_ready_ratio: None,
        qemu_private_ratio: None,
        qemu_pss_ratio: None,
    }
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
        m.qemu_private_ratio = ratio(m.median_qemu_private_bytes, base.median_qemu_private_bytes);
        m.qemu_pss_ratio = ratio(m.median_qemu_pss_bytes, base.median_qemu_pss_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_ratios_are_against_the_smallest_size() {
        let m = |size_mb, t: f64, b: f64| {
            let fp = Footprint {
                forks: 3,
                private_bytes: super::super::stats::summarize(&[b / 2.0]),
                pss_bytes: super::super::stats::summarize(&[b]),
                ..Footprint::default()
            };
            memory_result(size_mb, 0.0, None, &[t], &[t + 10.0], &fp)
        };
        let mut v = vec![m(1024, 300.0, 80.0), m(256, 100.0, 40.0)];
        memory_ratios(&mut v);
        assert_eq!(v[0].fork_time_ratio, Some(3.0));
        assert_eq!(v[0].qemu_pss_ratio, Some(2.0));
        assert_eq!(v[0].qemu_private_ratio, Some(2.0));
        assert_eq!(v[0].median_qemu_private_bytes, Some(40.0));
        assert_eq!(v[1].fork_time_ratio, Some(1.0));
        assert_eq!(v[1].request_to_ready_ratio, Some(1.0));
    }
}
