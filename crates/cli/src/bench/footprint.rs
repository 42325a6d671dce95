//! What a set of forks costs the host in memory: the drop of the host's
//! `MemAvailable` across the forks, per fork, and each fork QEMU's `Pss` and
//! `Private_Dirty` (`/proc/<pid>/smaps_rollup`), and of that what the guest
//! wrote into its RAM (`Private_Dirty` of the base's mapping in
//! `/proc/<pid>/smaps`).
//!
//! A copy-on-write fork has no memory file of its own: its guest RAM is a
//! private mapping of its base, so its cost is what it writes (private
//! dirty pages) plus QEMU's own memory (heap, TCG's translated code). Pages
//! it only reads are the base's page cache, counted in `Pss` divided among
//! every process that maps them.

use super::host::{ProcessMemory, bytes_allocated, mem_available, process_memory};
use super::stats::{Summary, summarize};
use forkvm_api::wire::Instance;
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

/// How long after the forks run their memory is measured (part of the
/// metrics' definition, not a readiness wait): the guests' first writes
/// after resume and QEMU's start-up allocations have landed by then.
pub(super) const SETTLE: Duration = Duration::from_secs(5);

/// The host memory a set of forks costs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Footprint {
    /// Forks measured (the divisor of the per-fork figures).
    pub forks: usize,
    /// Host `MemAvailable` right before the fork request(s), bytes.
    pub mem_available_before_bytes: Option<f64>,
    /// Host `MemAvailable` [`SETTLE`] after the forks ran, bytes.
    pub mem_available_after_bytes: Option<f64>,
    /// (before − after) / forks, bytes: everything the forks made the host
    /// hold, including a base the request captured.
    pub mem_available_drop_per_fork_bytes: Option<f64>,
    /// Allocated bytes of the base the request captured from a running
    /// source (0 when the forks map an existing base).
    pub new_base_bytes: Option<f64>,
    /// (before − after − new base) / forks, bytes: the forks' own cost.
    pub mem_available_drop_per_fork_excl_base_bytes: Option<f64>,
    /// Each fork QEMU's Pss, bytes.
    pub pss_bytes: Option<Summary>,
    /// Each fork QEMU's Private_Dirty, bytes.
    pub private_dirty_bytes: Option<Summary>,
    /// Each fork QEMU's Private_Clean + Private_Dirty, bytes.
    pub private_bytes: Option<Summary>,
    /// Of each fork QEMU's Private_Dirty, its guest RAM: the base pages the
    /// guest wrote since the fork (copied on write), bytes. The rest is
    /// QEMU's own (heap, TCG's translated code).
    pub guest_ram_private_dirty_bytes: Option<Summary>,
    /// Each fork's figures, for aggregating several requests.
    #[serde(skip)]
    pub procs: Vec<ProcessMemory>,
}

/// The figures from measured values: the host's `MemAvailable` before and
/// after, the new base's size and each fork QEMU's memory.
pub(super) fn footprint(
    before: Option<f64>,
    after: Option<f64>,
    new_base: Option<f64>,
    forks: usize,
    procs: &[ProcessMemory],
) -> Footprint {
    let drop = match (before, after) {
        (Some(b), Some(a)) if forks > 0 => Some(b - a),
        _ => None,
    };
    let col = |f: fn(&ProcessMemory) -> f64| summarize(&procs.iter().map(f).collect::<Vec<_>>());
    Footprint {
        forks,
        mem_available_before_bytes: before,
        mem_available_after_bytes: after,
        mem_available_drop_per_fork_bytes: drop.map(|d| d / forks as f64),
        new_base_bytes: new_base,
        mem_available_drop_per_fork_excl_base_bytes: drop
            .zip(new_base)
            .map(|(d, b)| (d - b) / forks as f64),
        pss_bytes: col(|m| m.pss),
        private_dirty_bytes: col(|m| m.private_dirty),
        private_bytes: col(ProcessMemory::private),
        guest_ram_private_dirty_bytes: summarize(
            &procs
                .iter()
                .filter_map(|m| m.file_private_dirty)
                .collect::<Vec<_>>(),
        ),
        procs: procs.to_vec(),
    }
}

/// Waits [`SETTLE`], then measures `forks` against `before` (the host's
/// `MemAvailable` before they were requested). `new_base` names the base
/// their request captured, if it did; a fork whose QEMU cannot be read is
/// recorded in `failures`. Each fork's guest RAM is the mapping of its
/// `base`.
pub(super) async fn measure(
    mem_dir: &Path,
    before: Option<f64>,
    forks: &[Instance],
    new_base: Option<&str>,
    failures: &mut Vec<String>,
) -> Footprint {
    tokio::time::sleep(SETTLE).await;
    let after = mem_available();
    let mut procs = vec![];
    for f in forks {
        let base = f.base.as_deref().map(|id| base_file(mem_dir, id));
        match f.pid.and_then(|pid| process_memory(pid, base.as_deref())) {
            Some(m) => procs.push(m),
            None => failures.push(format!("{}: no smaps_rollup for pid {:?}", f.name, f.pid)),
        }
    }
    let new_base = match new_base {
        Some(id) => bytes_allocated(&base_file(mem_dir, id)),
        None => Some(0.0),
    };
    footprint(before, after, new_base, forks.len(), &procs)
}

/// The file of base `id` in the daemon's memory directory.
pub(super) fn base_file(mem_dir: &Path, id: &str) -> std::path::PathBuf {
    mem_dir.join("bases").join(format!("{id}.mem"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    #[test]
    fn per_fork_figures() {
        let p = |pss, dirty| ProcessMemory {
            pss: pss * MIB,
            private_clean: MIB,
            private_dirty: dirty * MIB,
            file_private_dirty: Some(dirty / 10.0 * MIB),
        };
        let f = footprint(
            Some(10_000.0 * MIB),
            Some(9_000.0 * MIB),
            Some(600.0 * MIB),
            4,
            &[p(80.0, 60.0), p(90.0, 61.0), p(70.0, 59.0), p(100.0, 70.0)],
        );
        assert_eq!(f.mem_available_drop_per_fork_bytes, Some(250.0 * MIB));
        assert_eq!(
            f.mem_available_drop_per_fork_excl_base_bytes,
            Some(100.0 * MIB)
        );
        assert_eq!(f.pss_bytes.unwrap().median, 85.0 * MIB);
        assert_eq!(f.private_dirty_bytes.unwrap().median, 60.5 * MIB);
        assert_eq!(f.private_bytes.unwrap().median, 61.5 * MIB);
        assert_eq!(f.guest_ram_private_dirty_bytes.unwrap().median, 6.05 * MIB);
        assert_eq!(f.procs.len(), 4);
    }

    #[test]
    fn missing_figures_stay_missing() {
        let f = footprint(None, Some(1.0), Some(0.0), 3, &[]);
        assert_eq!(f.mem_available_drop_per_fork_bytes, None);
        assert_eq!(f.mem_available_drop_per_fork_excl_base_bytes, None);
        assert_eq!(f.pss_bytes, None);
        let f = footprint(Some(2.0), Some(1.0), None, 0, &[]);
        assert_eq!(f.mem_available_drop_per_fork_bytes, None);
        // A host that gained memory meanwhile gives a negative drop, kept as is.
        let f = footprint(Some(1.0 * MIB), Some(3.0 * MIB), None, 2, &[]);
        assert_eq!(f.mem_available_drop_per_fork_bytes, Some(-MIB));
        assert_eq!(f.mem_available_drop_per_fork_excl_base_bytes, None);
    }
}
