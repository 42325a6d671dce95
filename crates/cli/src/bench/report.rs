//! The benchmark's result: the [`Report`] record (printed as JSON with
//! `--json`) and the human tables.

use super::fanout::FanoutResult;
use super::handoff_paths::PathResult;
use super::host::Machine;
use super::memory_scaling::MemoryResult;
use super::stats::Summary;
use forkvm_core::Stage;
use serde::Serialize;
use std::collections::BTreeMap;

/// Everything one run measured; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub reps: u32,
    pub source_boot_ms: f64,
    pub paths: Vec<PathResult>,
    pub ratios: BTreeMap<String, Option<f64>>,
    pub fanout: Vec<FanoutResult>,
    pub memory: Vec<MemoryResult>,
    pub failures: Vec<String>,
    pub wall_s: f64,
}

/// The human report.
pub fn render(r: &Report) -> String {
    let mut out = render_header(r);
    out.push_str(&render_paths(r));
    out.push_str(&render_stages(r));
    out.push_str(&render_ratios(r));
    out.push_str(&render_fanout(r));
    out.push_str(&render_memory(r));
    out.push_str(&render_failures(&r.failures));
    out
}

/// Title, machine and source boot time.
fn render_header(r: &Report) -> String {
    format!(
        "forkvm bench fork — {}\n{}\nsource boot (256 MiB, create → Running): {} ms; wall time {:.0} s\n\n",
        r.machine.date,
        machine_line(&r.machine),
        fmt_ms(r.source_boot_ms),
        r.wall_s,
    )
}

/// The `machine: ...` line of a report header.
pub fn machine_line(m: &Machine) -> String {
    format!(
        "machine: {} cores ({}), accel {}, {}, host kernel {}, guest kernel {}",
        m.cores,
        m.cpu,
        m.accel.as_deref().unwrap_or("?"),
        m.qemu_version,
        m.host_kernel,
        m.guest_kernel.as_deref().unwrap_or("?"),
    )
}

/// Per path: API round trip, request→ready and resume→ready.
fn render_paths(r: &Report) -> String {
    let mut out = format!(
        "Handoff paths ({} rounds, one fork per path per round, interleaved; ms)\n",
        r.reps
    );
    let mut rows = vec![vec![
        "path".to_string(),
        "metric".into(),
        "n".into(),
        "median".into(),
        "p90".into(),
        "max".into(),
    ]];
    for p in &r.paths {
        for (i, (label, s)) in [
            ("api round trip", &p.api_ms),
            ("request→ready", &p.request_to_ready_ms),
            ("resume→ready", &p.resume_to_ready_ms),
        ]
        .into_iter()
        .enumerate()
        {
            let mut row = vec![
                if i == 0 {
                    p.path.to_string()
                } else {
                    String::new()
                },
                label.to_string(),
            ];
            row.extend(summary_cells(s));
            rows.push(row);
        }
    }
    out.push_str(&table(&rows));
    out
}

/// Stage medians, one column per path, stages in pipeline order.
fn render_stages(r: &Report) -> String {
    let mut out = "\nStage medians (ms)\n".to_string();
    let mut stage_names: Vec<&String> = r
        .paths
        .iter()
        .flat_map(|p| p.stage_medians_ms.keys())
        .collect();
    stage_names.sort_by_key(|s| stage_rank(s));
    stage_names.dedup();
    let mut rows = vec![
        std::iter::once("stage".to_string())
            .chain(r.paths.iter().map(|p| p.path.to_string()))
            .collect::<Vec<_>>(),
    ];
    for st in stage_names {
        let mut row = vec![st.clone()];
        for p in &r.paths {
            row.push(
                p.stage_medians_ms
                    .get(st)
                    .map_or("-".into(), |v| fmt_ms(*v)),
            );
        }
        rows.push(row);
    }
    out.push_str(&table(&rows));
    out
}

/// Ratios of the paths' medians.
fn render_ratios(r: &Report) -> String {
    let mut out = "\nRatios of medians\n".to_string();
    let rr = |k: &str| fmt_ratio(r.ratios.get(k).copied().flatten());
    out.push_str(&format!(
        "  resume→ready:   mailbox/rpc {}  mailbox/exec {}  rpc/exec {}\n",
        rr("mailbox_over_rpc"),
        rr("mailbox_over_exec"),
        rr("rpc_over_exec")
    ));
    out.push_str(&format!(
        "  request→ready:  mailbox/rpc {}  mailbox/exec {}  rpc/exec {}\n",
        rr("request_mailbox_over_rpc"),
        rr("request_mailbox_over_exec"),
        rr("request_rpc_over_exec")
    ));
    out
}

/// One row per fan-out size.
fn render_fanout(r: &Report) -> String {
    let mut out =
        "\nFan-out (one request, count k, default path; ms; per-fork med/p90/max)\n".to_string();
    let mmm = |s: &Option<Summary>| {
        s.map_or("-".into(), |s| {
            format!("{}/{}/{}", fmt_ms(s.median), fmt_ms(s.p90), fmt_ms(s.max))
        })
    };
    let mut rows = vec![vec![
        "k".to_string(),
        "ok".into(),
        "request".into(),
        Stage::Snapshot.as_str().into(),
        "resume→ready".into(),
        "fork total".into(),
        "request→ready".into(),
        "http ok".into(),
    ]];
    for f in &r.fanout {
        rows.push(vec![
            f.k.to_string(),
            f.ok.to_string(),
            fmt_ms(f.request_ms),
            f.snapshot_ms.map_or("-".into(), fmt_ms),
            mmm(&f.resume_to_ready_ms),
            mmm(&f.total_ms),
            mmm(&f.request_to_ready_ms),
            f.verified.to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

/// One row per source memory size.
fn render_memory(r: &Report) -> String {
    let mut out =
        "\nMemory scaling (3 forks per size, one request; medians; ratios vs the smallest size)\n"
            .to_string();
    let mib = |v: Option<f64>| v.map_or("-".into(), fmt_mib);
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{} ms", fmt_ms(v)));
    let mut rows = vec![vec![
        "size".to_string(),
        "boot".into(),
        "fork total".into(),
        "request→ready".into(),
        "base".into(),
        "MemAvailable drop/fork (excl. base)".into(),
        "QEMU Pss/fork".into(),
        "QEMU private dirty/fork (guest RAM)".into(),
        "time ratio".into(),
        "mem ratio (Pss/private)".into(),
    ]];
    for m in &r.memory {
        rows.push(vec![
            format!("{} MiB", m.size_mb),
            format!("{} ms", fmt_ms(m.source_boot_ms)),
            ms(m.median_total_ms),
            ms(m.median_request_to_ready_ms),
            mib(m.base_bytes),
            format!(
                "{} ({})",
                mib(m.mem_available_drop_per_fork_bytes),
                mib(m.mem_available_drop_per_fork_excl_base_bytes)
            ),
            mib(m.median_qemu_pss_bytes),
            format!(
                "{} ({})",
                mib(m.median_qemu_private_dirty_bytes),
                mib(m.median_guest_ram_private_dirty_bytes)
            ),
            fmt_ratio(m.fork_time_ratio),
            format!(
                "{}/{}",
                fmt_ratio(m.qemu_pss_ratio),
                fmt_ratio(m.qemu_private_ratio)
            ),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

/// Every failure, one per line.
pub fn render_failures(failures: &[String]) -> String {
    if failures.is_empty() {
        return "\nFailures: none\n".into();
    }
    let mut out = format!("\nFailures ({}):\n", failures.len());
    for f in failures {
        out.push_str(&format!("  - {f}\n"));
    }
    out
}

/// Sort key of a stage: its place in the core's pipeline ([`Stage::ALL`]),
/// then its name (stages this build does not know go last).
fn stage_rank(s: &str) -> (usize, String) {
    let place = Stage::ALL.iter().position(|st| st.as_str() == s);
    (place.unwrap_or(Stage::ALL.len()), s.to_string())
}

/// Rows as left-aligned columns two spaces apart, trailing spaces trimmed.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The n, median, p90 and max cells of a summary; "0" and dashes without one.
fn summary_cells(s: &Option<Summary>) -> [String; 4] {
    match s {
        Some(s) => [
            s.n.to_string(),
            fmt_ms(s.median),
            fmt_ms(s.p90),
            fmt_ms(s.max),
        ],
        None => ["0".into(), "-".into(), "-".into(), "-".into()],
    }
}

/// "0.42x", "12.3x"; "n/a" when the ratio is unknown.
pub fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r < 10.0 => format!("{r:.2}x"),
        Some(r) => format!("{r:.1}x"),
        None => "n/a".into(),
    }
}

/// Milliseconds with a precision that suits their size.
pub fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

pub fn fmt_mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::footprint::Footprint;
    use crate::bench::memory_scaling::{memory_ratios, memory_result};
    use crate::bench::sample::fake;
    use crate::bench::stats::summarize;

    #[test]
    fn number_formats() {
        assert_eq!(fmt_ratio(Some(0.4213)), "0.42x");
        assert_eq!(fmt_ratio(Some(12.345)), "12.3x");
        assert_eq!(fmt_ratio(None), "n/a");
        assert_eq!(fmt_ms(1.234), "1.23");
        assert_eq!(fmt_ms(12.34), "12.3");
        assert_eq!(fmt_ms(1234.5), "1234");
    }

    #[test]
    fn stages_display_in_pipeline_order() {
        let mut v = vec!["total", "resume", "snapshot", "zzz", "network_ready"];
        v.sort_by_key(|s| stage_rank(s));
        assert_eq!(v, ["snapshot", "resume", "network_ready", "total", "zzz"]);
    }

    /// A report with every kind of row: two measured paths and one without
    /// samples, stages the display order knows and one it does not, a
    /// fan-out, two memory sizes and a failure.
    fn fixture_report() -> Report {
        let sum = |n, median: f64| {
            Some(Summary {
                n,
                min: median / 2.0,
                median,
                p90: median * 1.5,
                max: median * 2.0,
            })
        };
        let path = |path, n, ready: f64, stages: &[(&str, f64)]| PathResult {
            path,
            api_ms: sum(n, ready + 100.0),
            request_to_ready_ms: sum(n, ready + 50.0),
            resume_to_ready_ms: sum(n, ready),
            stage_medians_ms: stages.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            agent_rpc_counts: None,
            samples: vec![],
        };
        let mut mailbox = path(
            "mailbox",
            2,
            7.25,
            &[
                ("total", 90.0),
                ("zzz_new", 1.0),
                ("snapshot", 30.5),
                ("resume", 2.0),
            ],
        );
        mailbox.agent_rpc_counts = Some(BTreeMap::from([("Health".to_string(), 3)]));
        mailbox.samples.push(fake("mailbox", 7.25, 90.0));
        let mem = |size_mb, t: f64, b: f64| {
            let one = |v: f64| summarize(&[v]);
            let fp = Footprint {
                forks: 3,
                mem_available_drop_per_fork_bytes: Some(b * 3.0),
                mem_available_drop_per_fork_excl_base_bytes: Some(b * 2.0),
                new_base_bytes: Some(b * 4.0),
                pss_bytes: one(b),
                private_dirty_bytes: (size_mb < 1024).then(|| one(b / 2.0)).flatten(),
                private_bytes: (size_mb < 1024).then(|| one(b / 2.0)).flatten(),
                guest_ram_private_dirty_bytes: one(b / 8.0),
                ..Footprint::default()
            };
            memory_result(size_mb, 1500.0, Some(b * 5.0), &[t], &[t + 10.0], &fp)
        };
        let mut memory = vec![
            mem(256, 120.0, 8.0 * 1048576.0),
            mem(1024, 150.0, 9.5 * 1048576.0),
        ];
        memory_ratios(&mut memory);
        Report {
            machine: Machine {
                date: "2026-01-01T00:00:00Z".into(),
                cores: 2,
                cpu: "Test CPU".into(),
                accel: Some("kvm".into()),
                qemu_version: "QEMU emulator version 7.2.0".into(),
                host_kernel: "6.1.0".into(),
                guest_kernel: None,
            },
            reps: 2,
            source_boot_ms: 1234.5,
            paths: vec![
                mailbox,
                path("rpc", 1, 55.0, &[("total", 140.0), ("network_ready", 55.0)]),
                PathResult {
                    api_ms: None,
                    request_to_ready_ms: None,
                    resume_to_ready_ms: None,
                    ..path("exec", 0, 0.0, &[])
                },
            ],
            ratios: BTreeMap::from([
                ("mailbox_over_rpc".to_string(), Some(0.1318)),
                ("mailbox_over_exec".to_string(), None),
                ("request_rpc_over_exec".to_string(), Some(12.0)),
            ]),
            fanout: vec![FanoutResult {
                k: 4,
                ok: 3,
                request_ms: 480.0,
                snapshot_ms: Some(25.0),
                resume_to_ready_ms: sum(3, 9.0),
                total_ms: None,
                request_to_ready_ms: sum(3, 300.0),
                verified: 2,
            }],
            memory,
            failures: vec!["fo4-4: no free address".into()],
            wall_s: 61.4,
        }
    }

    /// What [`render`] prints for [`fixture_report`].
    const FIXTURE_TEXT: &str = "\
forkvm bench fork — 2026-01-01T00:00:00Z
machine: 2 cores (Test CPU), accel kvm, QEMU emulator version 7.2.0, host kernel 6.1.0, guest kernel ?
source boot (256 MiB, create → Running): 1234 ms; wall time 61 s

Handoff paths (2 rounds, one fork per path per round, interleaved; ms)
path     metric          n  median  p90   max
mailbox  api round trip  2  107     161   214
         request→ready   2  57.2    85.9  114
         resume→ready    2  7.25    10.9  14.5
rpc      api round trip  1  155     232   310
         request→ready   1  105     158   210
         resume→ready    1  55.0    82.5  110
exec     api round trip  0  -       -     -
         request→ready   0  -       -     -
         resume→ready    0  -       -     -

Stage medians (ms)
stage          mailbox  rpc   exec
snapshot       30.5     -     -
resume         2.00     -     -
network_ready  -        55.0  -
total          90.0     140   -
zzz_new        1.00     -     -

Ratios of medians
  resume→ready:   mailbox/rpc 0.13x  mailbox/exec n/a  rpc/exec n/a
  request→ready:  mailbox/rpc n/a  mailbox/exec n/a  rpc/exec 12.0x

Fan-out (one request, count k, default path; ms; per-fork med/p90/max)
k  ok  request  snapshot  resume→ready    fork total  request→ready  http ok
4  3   480      25.0      9.00/13.5/18.0  -           300/450/600    2

Memory scaling (3 forks per size, one request; medians; ratios vs the smallest size)
size      boot     fork total  request→ready  base      MemAvailable drop/fork (excl. base)  QEMU Pss/fork  QEMU private dirty/fork (guest RAM)  time ratio  mem ratio (Pss/private)
256 MiB   1500 ms  120 ms      130 ms         32.0 MiB  24.0 MiB (16.0 MiB)                  8.0 MiB        4.0 MiB (1.0 MiB)                    1.00x       1.00x/1.00x
1024 MiB  1500 ms  150 ms      160 ms         38.0 MiB  28.5 MiB (19.0 MiB)                  9.5 MiB        - (1.2 MiB)                          1.25x       1.19x/n/a

Failures (1):
  - fo4-4: no free address
";

    #[test]
    fn report_text_layout() {
        assert_eq!(render(&fixture_report()), FIXTURE_TEXT);
    }
}
