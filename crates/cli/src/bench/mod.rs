//! `forkvm bench fork`: measures fork latency per handoff path, fan-out and
//! memory scaling against a private daemon; `forkvm bench density`: what
//! copy-on-write forks of a source with touched memory cost, and how many
//! run at once ([`density`]).
//!
//! The benchmark never touches the machine's own network namespace: it
//! creates `fvbench-<rand>`, runs its own `forkvm serve` inside it (own data
//! directory, memory directory under /dev/shm and socket), and removes all of
//! it on exit, on error and on Ctrl-C/SIGTERM. The guest image is linked in
//! from `$FORKVM_DATA_DIR/images/default`.
//!
//! Figures come from two sides: the client's own clock around each API call,
//! and the per-stage timings the daemon records in every fork's `handoff`.
//!
//! [`harness`] is that private world (namespace, daemon, sources) and the API
//! helpers the scenarios share; [`handoff_paths`], [`fanout`] and
//! [`memory_scaling`] are `bench fork`'s three scenarios; [`sample`] turns
//! one fork into a measurement, [`stats`] summarises measurements, [`host`]
//! reads figures from the host, [`footprint`] is what a set of forks costs
//! in host memory, and [`report`] is the result, printed as a table or JSON.

mod density;
mod fanout;
mod footprint;
mod handoff_paths;
mod harness;
mod host;
mod memory_scaling;
mod report;
mod sample;
mod stats;

use crate::client::{Client, ClientError};
use density::{DensityReport, render_density};
use fanout::bench_fanout;
use handoff_paths::{bench_paths, path_ratios};
use harness::{BenchEnv, create_source, delete_quietly};
use host::machine_record;
use indicatif::{ProgressBar, ProgressStyle};
use memory_scaling::{bench_memory, memory_ratios};
use report::{Report, render};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchForkArgs {
    /// Rounds of the per-path benchmark (one fork per path per round).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub reps: u32,
    /// Fan-out sizes: forks made by one request each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub fanout: Vec<u32>,
    /// Source memory sizes (MiB) for the memory-scaling run.
    #[arg(long, value_delimiter = ',', default_value = "256,1024",
          value_parser = clap::value_parser!(u32).range(128..=65536))]
    pub sizes: Vec<u32>,
    /// Keep the benchmark's data directory (daemon log, console logs).
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchDensityArgs {
    /// Memory of the sources (MiB).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(128..=65536))]
    pub size_mib: u32,
    /// Memory the touched source's guest fills with random data (MiB); must
    /// leave the guest at least 256 MiB.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub touch_mib: u32,
    /// Forks per request in the touched/fresh comparison.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub forks: u32,
    /// Rounds of the comparison (one request per source each, interleaved).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Forks to run at once in the fan-out (0 skips it).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub target: u32,
    /// Forks per request in the fan-out.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub batch: u32,
    /// The daemon's guest memory budget (MiB; FORKVM_MAX_GUEST_MEMORY_MB)
    /// [default: the daemon's, 90 % of RAM].
    #[arg(long)]
    pub max_guest_memory_mb: Option<u64>,
    /// Share of its size (percent) the daemon charges a copy-on-write fork
    /// (FORKVM_COW_RESERVE_PERCENT) [default: the daemon's, 25].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub cow_reserve_percent: Option<u32>,
    /// Keep the benchmark's data directory (daemon log, console logs).
    #[arg(long)]
    pub keep: bool,
}

impl BenchDensityArgs {
    /// Settings clap cannot check alone.
    fn check(&self) -> Result<(), BenchError> {
        if u64::from(self.touch_mib) + 256 > u64::from(self.size_mib) {
            return Err(BenchError::Unexpected(format!(
                "--touch-mib {} leaves the {} MiB guest less than 256 MiB",
                self.touch_mib, self.size_mib
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("guest image missing at {}: run scripts/setup.sh", .0.display())]
    ImageMissing(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("benchmark daemon: {0} (log: {1})")]
    Daemon(String, PathBuf),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Unexpected(String),
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// Runs the scenarios in order against a fresh daemon in `env`.
async fn bench(c: &Client, env: &mut BenchEnv, a: &BenchForkArgs) -> Result<Report, BenchError> {
    let started = Instant::now();
    let pb = progress(1 + 3 * a.reps as u64 + a.fanout.len() as u64 + a.sizes.len() as u64);
    pb.set_message("starting the benchmark daemon");
    env.spawn_daemon()?;
    env.wait_ready(c).await?;
    let mut failures = vec![];

    pb.set_message("booting the 256 MiB source");
    let (src, source_boot_ms) = create_source(c, env, "src", 256).await?;
    pb.inc(1);
    let machine = machine_record(&env.image, src.accel.clone());
    let paths = bench_paths(c, env, &src, a.reps, &pb, &mut failures).await?;

    let mut fanout = vec![];
    for &k in &a.fanout {
        pb.set_message(format!("fan-out {k}"));
        fanout.push(bench_fanout(c, env, &src, k, &mut failures).await?);
        pb.inc(1);
    }
    delete_quietly(c, &src.id, &mut failures).await;

    let mut memory = vec![];
    for &size in &a.sizes {
        pb.set_message(format!("memory {size} MiB"));
        memory.push(bench_memory(c, env, size, &mut failures).await?);
        pb.inc(1);
    }
    memory_ratios(&mut memory);
    pb.finish_and_clear();

    Ok(Report {
        machine,
        reps: a.reps,
        source_boot_ms,
        ratios: path_ratios(&paths),
        paths,
        fanout,
        memory,
        failures,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// `forkvm bench fork`: exit 1 when any fork failed, took another path than
/// requested, or did not answer.
pub async fn fork(json: bool, a: &BenchForkArgs) -> anyhow::Result<ExitCode> {
    let env = BenchEnv::create(a.keep)?;
    let report = in_env(env, async |c, env| bench(c, env, a).await).await?;
    if json {
        crate::output::print_json(&report)?;
    } else {
        print!("{}", render(&report));
    }
    Ok(exit_code(&report.failures))
}

/// `forkvm bench density`: exit 1 when any fork failed or did not answer
/// (a refusal for capacity is a finding, not a failure).
pub async fn density(json: bool, a: &BenchDensityArgs) -> anyhow::Result<ExitCode> {
    a.check()?;
    let mut env = BenchEnv::create(a.keep)?;
    if let Some(mb) = a.max_guest_memory_mb {
        env.set_daemon_env("FORKVM_MAX_GUEST_MEMORY_MB", mb.to_string());
    }
    if let Some(p) = a.cow_reserve_percent {
        env.set_daemon_env("FORKVM_COW_RESERVE_PERCENT", p.to_string());
    }
    let report = in_env(env, async |c, env| bench_density(c, env, a).await).await?;
    if json {
        crate::output::print_json(&report)?;
    } else {
        print!("{}", render_density(&report));
    }
    Ok(exit_code(&report.failures))
}

/// Runs the density scenarios against a fresh daemon in `env`.
async fn bench_density(
    c: &Client,
    env: &mut BenchEnv,
    a: &BenchDensityArgs,
) -> Result<DensityReport, BenchError> {
    let started = Instant::now();
    let pb = progress(2 + 2 * u64::from(a.rounds));
    pb.set_message("starting the benchmark daemon");
    env.spawn_daemon()?;
    env.wait_ready(c).await?;
    let mut failures = vec![];
    let (density, accel) = density::run(c, env, a, &pb, &mut failures).await?;
    pb.finish_and_clear();
    Ok(DensityReport {
        machine: machine_record(&env.image, accel),
        density,
        failures,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

fn progress(steps: u64) -> ProgressBar {
    let pb = ProgressBar::new(steps);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

fn exit_code(failures: &[String]) -> ExitCode {
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `body` against the daemon world `env` until it ends, fails or the
/// process gets SIGTERM/SIGINT; tears `env` down before returning. A failure
/// names the daemon log, and its last lines go to stderr.
async fn in_env<R>(
    mut env: BenchEnv,
    body: impl AsyncFnOnce(&Client, &mut BenchEnv) -> Result<R, BenchError>,
) -> anyhow::Result<R> {
    use tokio::signal::unix::{SignalKind, signal};
    let c = Client::new(&env.socket);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let res = tokio::select! {
        r = body(&c, &mut env) => r,
        _ = term.recv() => Err(BenchError::Interrupted("SIGTERM")),
        _ = int.recv() => Err(BenchError::Interrupted("SIGINT")),
    };
    let res = res.map_err(|e| match e {
        BenchError::Daemon(..) | BenchError::Interrupted(_) => e,
        e => BenchError::Unexpected(format!("{e} (daemon log: {})", env.log_path().display())),
    });
    // Tear down before printing so a slow terminal never delays cleanup.
    let log_tail = res.is_err().then(|| {
        std::fs::read_to_string(env.log_path())
            .map(|s| {
                let lines: Vec<&str> = s.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            })
            .unwrap_or_default()
    });
    drop(env);
    res.map_err(|e| {
        if let Some(t) = log_tail.filter(|t| !t.is_empty()) {
            eprintln!("last daemon log lines:\n{t}");
        }
        e.into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn density_leaves_the_guest_room() {
        let a = |size_mib, touch_mib| BenchDensityArgs {
            size_mib,
            touch_mib,
            forks: 4,
            rounds: 3,
            target: 64,
            batch: 4,
            max_guest_memory_mb: None,
            cow_reserve_percent: None,
            keep: false,
        };
        assert!(a(1024, 600).check().is_ok());
        assert!(a(1024, 768).check().is_ok());
        assert!(a(1024, 769).check().is_err());
        assert!(a(256, 1).check().is_err());
    }
}
