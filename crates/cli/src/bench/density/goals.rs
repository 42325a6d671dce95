//! The density issue's goals, checked against one run's figures.

use super::Density;
use serde::Serialize;

const MIB: f64 = 1024.0 * 1024.0;

/// One goal and whether this run met it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Goal {
    /// Stable name: `touched_fork_memory_mib`, `touched_fork_pss_mib`,
    /// `fanout_fork_memory_mib`, `request_to_ready_ratio`, `pause_ratio`,
    /// `pause_ms`, `forks_answering`.
    pub key: &'static str,
    /// The goal in words.
    pub goal: &'static str,
    /// This run's figure (null when not measured).
    pub value: Option<f64>,
    /// The bound the figure must stay within.
    pub limit: f64,
    /// `true`: the figure must reach the limit; `false`: stay at or below it.
    pub at_least: bool,
    /// Null when the figure is missing.
    pub met: Option<bool>,
}

fn goal(
    key: &'static str,
    text: &'static str,
    value: Option<f64>,
    limit: f64,
    at_least: bool,
) -> Goal {
    Goal {
        key,
        goal: text,
        value,
        limit,
        at_least,
        met: value.map(|v| if at_least { v >= limit } else { v <= limit }),
    }
}

/// Every goal of the issue against `d`.
pub fn goals(d: &Density) -> Vec<Goal> {
    let t = &d.compare.touched;
    let fo = d.fanout.as_ref();
    vec![
        goal(
            "touched_fork_memory_mib",
            "host memory per fork (touched source, MemAvailable drop less the captured base) ≤ 64 MiB",
            t.mem_available_drop_per_fork_excl_base_bytes
                .map(|s| s.median / MIB),
            64.0,
            false,
        ),
        goal(
            "touched_fork_pss_mib",
            "QEMU Pss per fork (touched source) ≤ 64 MiB",
            t.pss_bytes.map(|s| s.median / MIB),
            64.0,
            false,
        ),
        goal(
            "fanout_fork_memory_mib",
            "host memory per fork at the fan-out (MemAvailable drop / fork, shared base) ≤ 64 MiB",
            fo.and_then(|f| f.footprint.mem_available_drop_per_fork_bytes)
                .map(|b| b / MIB),
            64.0,
            false,
        ),
        goal(
            "request_to_ready_ratio",
            "request→ready touched / fresh ≤ 1.2",
            d.compare.ratios.get("request_to_ready").copied().flatten(),
            1.2,
            false,
        ),
        goal(
            "pause_ratio",
            "source pause touched / fresh ≤ 1.2",
            d.compare.ratios.get("pause").copied().flatten(),
            1.2,
            false,
        ),
        goal(
            "pause_ms",
            "source pause with memory touched ≤ 50 ms",
            t.pause_ms.map(|s| s.median),
            50.0,
            false,
        ),
        goal(
            "forks_answering",
            "forks running at once, each answering HTTP ≥ 64",
            fo.map(|f| f.answered as f64),
            64.0,
            true,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn met_follows_the_bound() {
        assert_eq!(goal("k", "g", Some(64.0), 64.0, false).met, Some(true));
        assert_eq!(goal("k", "g", Some(64.1), 64.0, false).met, Some(false));
        assert_eq!(goal("k", "g", Some(63.0), 64.0, true).met, Some(false));
        assert_eq!(goal("k", "g", Some(64.0), 64.0, true).met, Some(true));
        assert_eq!(goal("k", "g", None, 64.0, true).met, None);
    }
}
