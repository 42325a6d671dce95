//! The text report of `forkvm bench density`.

use super::DensityReport;
use super::compare::{CompareRun, Comparison};
use super::goals::Goal;
use super::target::{Stop, TargetResult};
use crate::bench::report::{fmt_mib, fmt_ms, fmt_ratio, machine_line, render_failures, table};
use crate::bench::stats::Summary;

/// The human report.
pub fn render_density(r: &DensityReport) -> String {
    let mut out = render_header(r);
    out.push_str(&render_compare(&r.density.compare, r.density.forks));
    if let Some(f) = &r.density.fanout {
        out.push_str(&render_fanout(f, r.density.target, r.density.batch));
    }
    out.push_str(&render_goals(&r.density.goals));
    out.push_str(&render_failures(&r.failures));
    out
}

fn render_header(r: &DensityReport) -> String {
    let d = &r.density;
    let budget = d
        .max_guest_memory_mb
        .map_or("default (90 % of RAM)".into(), |m| format!("{m} MiB"));
    let cow = d
        .cow_reserve_percent
        .map_or("default (25 %)".into(), |p| format!("{p} %"));
    format!(
        "forkvm bench density — {}\n{}\n\
         source {} MiB, {} MiB touched; host MemTotal {}; wall time {:.0} s\n\
         daemon: guest memory budget {budget}, copy-on-write charge {cow}\n\n",
        r.machine.date,
        machine_line(&r.machine),
        d.size_mib,
        d.touch_mib,
        d.mem_total_bytes.map_or("?".into(), fmt_gib),
        r.wall_s,
    )
}

/// A row of the comparison: label, the cell of one run, the ratio's key in
/// [`Comparison::ratios`] ("" for none).
type CompareRow = (&'static str, fn(&CompareRun) -> String, &'static str);

/// The comparison's rows, top to bottom.
const COMPARE_ROWS: &[CompareRow] = &[
    ("guest fill", fill_cell, ""),
    (
        "guest free: shared",
        |r| mib(r.guest_memory_bytes.get("shared").map(|&b| b as f64)),
        "",
    ),
    ("source memory file", |r| mib(r.source_mem_file_bytes), ""),
    (
        "forks made / answered HTTP",
        |r| format!("{}/{} of {}x{}", r.ok, r.verified, r.requests, r.requested),
        "",
    ),
    ("request round trip (ms)", |r| mmm(&r.request_ms), "request"),
    ("capture, snapshot stage (ms)", |r| mmm(&r.capture_ms), ""),
    ("source pause (ms)", |r| mmm(&r.pause_ms), "pause"),
    (
        "request→ready, client (ms)",
        |r| mmm(&r.request_to_ready_ms),
        "request_to_ready",
    ),
    (
        "request→ready, daemon (ms)",
        |r| mmm(&r.daemon_request_to_ready_ms),
        "",
    ),
    ("captured base", |r| med_mib(r.base_bytes), ""),
    (
        "MemAvailable drop / fork",
        |r| med_mib(r.mem_available_drop_per_fork_bytes),
        "mem_available_drop_per_fork",
    ),
    (
        "  less the captured base",
        |r| med_mib(r.mem_available_drop_per_fork_excl_base_bytes),
        "mem_available_drop_per_fork_excl_base",
    ),
    ("  each request (MiB)", drops_cell, ""),
    ("QEMU Pss / fork", |r| med_mib(r.pss_bytes), "pss"),
    (
        "QEMU Private_Dirty / fork",
        |r| med_mib(r.private_dirty_bytes),
        "private_dirty",
    ),
    (
        "  of it guest RAM written",
        |r| med_mib(r.guest_ram_private_dirty_bytes),
        "guest_ram_private_dirty",
    ),
];

/// Metric rows, one column per source and the ratio.
fn render_compare(c: &Comparison, k: u32) -> String {
    let mut rows = vec![vec![
        "metric".to_string(),
        "fresh".into(),
        "touched".into(),
        "touched/fresh".into(),
    ]];
    for (label, cell, key) in COMPARE_ROWS {
        let ratio = match *key {
            "" => String::new(),
            k => fmt_ratio(c.ratios.get(k).copied().flatten()),
        };
        rows.push(vec![
            label.to_string(),
            cell(&c.fresh),
            cell(&c.touched),
            ratio,
        ]);
    }
    format!(
        "Touched vs fresh source ({} rounds, each one request of {k} forks from each running \
         source; medians, or med/p90/max)\n{}",
        c.rounds,
        table(&rows)
    )
}

fn mib(v: Option<f64>) -> String {
    v.map_or("-".into(), fmt_mib)
}

fn med_mib(s: Option<Summary>) -> String {
    mib(s.map(|s| s.median))
}

/// Every request's MemAvailable drop / fork less its base, in order: how
/// much the host moved meanwhile.
fn drops_cell(r: &CompareRun) -> String {
    let v: Vec<String> = r
        .footprints
        .iter()
        .map(|f| {
            f.mem_available_drop_per_fork_excl_base_bytes
                .map_or("-".into(), |b| format!("{:.0}", b / (1024.0 * 1024.0)))
        })
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(" ")
    }
}

fn fill_cell(r: &CompareRun) -> String {
    match r.fill_ms {
        Some(ms) => format!("{} MiB in {:.1} s", r.touched_mib, ms / 1000.0),
        None => "-".into(),
    }
}

/// The fan-out as metric/value rows.
fn render_fanout(f: &TargetResult, target: u32, batch: u32) -> String {
    let mut out = format!(
        "\nFan-out to {target} forks (source in Standby: one shared base; requests of {batch}; \
         per fork p50/p90/max)\n"
    );
    let stop = match (&f.stop, &f.stop_detail) {
        (Stop::Reached, _) => "reached the target".to_string(),
        (s, Some(d)) => format!("stopped early ({}): {d}", s.as_str()),
        (s, None) => format!("stopped early ({})", s.as_str()),
    };
    let fp = &f.footprint;
    let rows: Vec<Vec<String>> = [
        ("metric", "value".to_string()),
        (
            "running at once / answered HTTP (first try)",
            format!("{} / {} ({})", f.running, f.answered, f.answered_first_try),
        ),
        ("end", stop),
        ("requests", f.requests.to_string()),
        (
            "standby (memory → base)",
            format!("{} ms", fmt_ms(f.standby_ms)),
        ),
        ("shared base", mib(f.base_bytes)),
        (
            "forks wall time (first request → last ready)",
            format!("{:.1} s", f.forks_wall_s),
        ),
        ("request→ready, client (ms)", mmm(&f.request_to_ready_ms)),
        (
            "request→ready, daemon (ms)",
            mmm(&f.daemon_request_to_ready_ms),
        ),
        ("request round trip (ms)", mmm(&f.request_ms)),
        (
            "each request in order (s)",
            f.request_ms_each
                .iter()
                .map(|ms| format!("{:.1}", ms / 1000.0))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        (
            "MemAvailable drop / fork",
            mib(fp.mem_available_drop_per_fork_bytes),
        ),
        (
            "QEMU Pss / fork (median)",
            mib(fp.pss_bytes.map(|s| s.median)),
        ),
        (
            "QEMU Private_Dirty / fork (median)",
            mib(fp.private_dirty_bytes.map(|s| s.median)),
        ),
        (
            "  of it guest RAM written (median)",
            mib(fp.guest_ram_private_dirty_bytes.map(|s| s.median)),
        ),
        (
            "host MemAvailable before / at the end",
            format!(
                "{} / {}",
                fp.mem_available_before_bytes.map_or("?".into(), fmt_gib),
                fp.mem_available_after_bytes.map_or("?".into(), fmt_gib)
            ),
        ),
        ("scenario wall time", format!("{:.0} s", f.wall_s)),
    ]
    .into_iter()
    .map(|(k, v)| vec![k.to_string(), v])
    .collect();
    out.push_str(&table(&rows));
    out
}

fn render_goals(goals: &[Goal]) -> String {
    let mut rows = vec![vec!["goal".to_string(), "this run".into(), "met".into()]];
    for g in goals {
        rows.push(vec![
            g.goal.to_string(),
            g.value.map_or("-".into(), |v| format!("{v:.2}")),
            match g.met {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "n/a".into(),
            },
        ]);
    }
    format!("\nGoals\n{}", table(&rows))
}

/// "med/p90/max" of a summary, "-" without one.
fn mmm(s: &Option<Summary>) -> String {
    s.map_or("-".into(), |s| {
        format!("{}/{}/{}", fmt_ms(s.median), fmt_ms(s.p90), fmt_ms(s.max))
    })
}

fn fmt_gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1024.0 * 1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::density::compare::{compare_ratios, fake_run};
    use crate::bench::density::goals::goals;
    use crate::bench::density::{Density, DensityReport};
    use crate::bench::footprint::Footprint;
    use crate::bench::host::Machine;
    use crate::bench::stats::summarize;

    const MIB: f64 = 1024.0 * 1024.0;

    /// A run with both scenarios; the fan-out stopped for capacity.
    fn fixture() -> DensityReport {
        let touched = fake_run(600, 900.0, 450.0, 70.0);
        let fresh = fake_run(0, 600.0, 75.0, 50.0);
        let ratios = compare_ratios(&touched, &fresh);
        let fanout = TargetResult {
            standby_ms: 95.5,
            base_bytes: Some(700.0 * MIB),
            requests: 10,
            running: 40,
            answered: 39,
            answered_first_try: 37,
            stop: Stop::Capacity,
            stop_detail: Some("not enough guest memory".into()),
            forks_wall_s: 61.25,
            wall_s: 80.4,
            request_to_ready_ms: summarize(&[500.0, 700.0, 1500.0]),
            daemon_request_to_ready_ms: summarize(&[400.0, 450.0, 600.0]),
            request_ms: summarize(&[1000.0, 1200.0]),
            request_ms_each: vec![1000.0, 1200.0],
            footprint: Footprint {
                forks: 40,
                mem_available_before_bytes: Some(20.0 * 1024.0 * MIB),
                mem_available_after_bytes: Some(17.5 * 1024.0 * MIB),
                mem_available_drop_per_fork_bytes: Some(64.0 * MIB),
                new_base_bytes: Some(0.0),
                pss_bytes: summarize(&[80.0 * MIB]),
                private_dirty_bytes: summarize(&[58.5 * MIB]),
                guest_ram_private_dirty_bytes: summarize(&[1.5 * MIB]),
                ..Footprint::default()
            },
        };
        let mut density = Density {
            size_mib: 1024,
            touch_mib: 600,
            forks: 4,
            target: 64,
            batch: 4,
            max_guest_memory_mb: None,
            cow_reserve_percent: Some(10),
            mem_total_bytes: Some(23.5 * 1024.0 * MIB),
            compare: super::Comparison {
                rounds: 3,
                fresh,
                touched,
                ratios,
            },
            fanout: Some(fanout),
            goals: vec![],
        };
        density.goals = goals(&density);
        DensityReport {
            machine: Machine {
                date: "2026-01-01T00:00:00Z".into(),
                cores: 2,
                cpu: "Test CPU".into(),
                accel: Some("tcg".into()),
                qemu_version: "QEMU emulator version 7.2.0".into(),
                host_kernel: "6.1.0".into(),
                guest_kernel: None,
            },
            density,
            failures: vec!["d10-4: no HTTP answer".into()],
            wall_s: 301.2,
        }
    }

    #[test]
    fn report_text_layout() {
        assert_eq!(render_density(&fixture()), FIXTURE_TEXT);
    }

    #[test]
    fn goals_of_the_fixture() {
        let met: Vec<_> = fixture()
            .density
            .goals
            .iter()
            .map(|g| (g.key, g.met))
            .collect();
        assert_eq!(
            met,
            [
                ("touched_fork_memory_mib", Some(false)),
                ("touched_fork_pss_mib", Some(false)),
                ("fanout_fork_memory_mib", Some(true)),
                ("request_to_ready_ratio", Some(false)),
                ("pause_ratio", Some(false)),
                ("pause_ms", Some(false)),
                ("forks_answering", Some(false)),
            ]
        );
    }

    /// What [`render_density`] prints for [`fixture`].
    const FIXTURE_TEXT: &str = "\
forkvm bench density — 2026-01-01T00:00:00Z
machine: 2 cores (Test CPU), accel tcg, QEMU emulator version 7.2.0, host kernel 6.1.0, guest kernel ?
source 1024 MiB, 600 MiB touched; host MemTotal 23.50 GiB; wall time 301 s
daemon: guest memory budget default (90 % of RAM), copy-on-write charge 10 %

Touched vs fresh source (3 rounds, each one request of 4 forks from each running source; medians, or med/p90/max)
metric                        fresh           touched            touched/fresh
guest fill                    -               600 MiB in 20.0 s
guest free: shared            1.0 MiB         1.0 MiB
source memory file            100.0 MiB       700.0 MiB
forks made / answered HTTP    12/12 of 3x4    12/12 of 3x4
request round trip (ms)       800/800/800     1100/1100/1100     1.38x
capture, snapshot stage (ms)  115/115/115     490/490/490
source pause (ms)             75.0/75.0/75.0  450/450/450        6.00x
request→ready, client (ms)    600/600/600     900/900/900        1.50x
request→ready, daemon (ms)    550/550/550     850/850/850
captured base                 100.0 MiB       700.0 MiB
MemAvailable drop / fork      100.0 MiB       140.0 MiB          1.40x
  less the captured base      50.0 MiB        70.0 MiB           1.40x
  each request (MiB)          47 50 80        67 70 100
QEMU Pss / fork               75.0 MiB        105.0 MiB          1.40x
QEMU Private_Dirty / fork     45.0 MiB        63.0 MiB           1.40x
  of it guest RAM written     5.0 MiB         7.0 MiB            1.40x

Fan-out to 64 forks (source in Standby: one shared base; requests of 4; per fork p50/p90/max)
metric                                        value
running at once / answered HTTP (first try)   40 / 39 (37)
end                                           stopped early (capacity): not enough guest memory
requests                                      10
standby (memory → base)                       95.5 ms
shared base                                   700.0 MiB
forks wall time (first request → last ready)  61.2 s
request→ready, client (ms)                    700/1500/1500
request→ready, daemon (ms)                    450/600/600
request round trip (ms)                       1100/1200/1200
each request in order (s)                     1.0 1.2
MemAvailable drop / fork                      64.0 MiB
QEMU Pss / fork (median)                      80.0 MiB
QEMU Private_Dirty / fork (median)            58.5 MiB
  of it guest RAM written (median)            1.5 MiB
host MemAvailable before / at the end         20.00 GiB / 17.50 GiB
scenario wall time                            80 s

Goals
goal                                                                                      this run  met
host memory per fork (touched source, MemAvailable drop less the captured base) ≤ 64 MiB  70.00     NO
QEMU Pss per fork (touched source) ≤ 64 MiB                                               105.00    NO
host memory per fork at the fan-out (MemAvailable drop / fork, shared base) ≤ 64 MiB      64.00     yes
request→ready touched / fresh ≤ 1.2                                                       1.50      NO
source pause touched / fresh ≤ 1.2                                                        6.00      NO
source pause with memory touched ≤ 50 ms                                                  450.00    NO
forks running at once, each answering HTTP ≥ 64                                           39.00     NO

Failures (1):
  - d10-4: no HTTP answer
";
}
