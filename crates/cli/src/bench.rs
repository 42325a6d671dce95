//! `forkvm bench fork`: measures fork latency per handoff path, fan-out and
//! memory scaling against a private daemon.
//!
//! The benchmark never touches the machine's own network namespace: it
//! creates `fvbench-<rand>`, runs its own `forkvm serve` inside it (own data
//! directory, memory directory under /dev/shm and socket), and removes all of
//! it on exit, on error and on Ctrl-C/SIGTERM. The guest image is linked in
//! from `$FORKVM_DATA_DIR/images/default`.
//!
//! Figures come from two sides: the client's own clock around each API call,
//! and the per-stage timings the daemon records in every fork's `handoff`.

use crate::client::{Client, ClientError};
use forkvm_api::wire::{
    ExecParams, ForkOutcome, ForkResponse, HandoffPath, Instance, InstanceCreateParams,
    InstanceForkParams,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The three handoff paths, fastest first.
const PATHS: [HandoffPath; 3] = [HandoffPath::Mailbox, HandoffPath::Rpc, HandoffPath::Exec];
/// Page every benchmark source serves; a fork answering with it is reachable.
const PAGE: &str = "forkvm-bench-ok";
const BRIDGE: &str = "fvb0";
const SUBNET: &str = "10.66.0.0/16";
/// How long after the forks run their memory is measured (part of the
/// metric's definition, not a readiness wait).
const MEMORY_SETTLE: Duration = Duration::from_secs(2);

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

// ---------------------------------------------------------------------------
// statistics

/// Distribution of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
}

/// Median, p90 (nearest rank) and max of the finite values; `None` if none.
pub fn summarize(xs: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        n,
        min: v[0],
        median,
        p90: nearest_rank(&v, 90.0),
        max: v[n - 1],
    })
}

/// Nearest-rank percentile of a sorted, non-empty slice: always an observed value.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `a / b`, or `None` when either is missing or `b` is not positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
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

fn fmt_mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn median_of(xs: &[f64]) -> Option<f64> {
    summarize(xs).map(|s| s.median)
}

// ---------------------------------------------------------------------------
// records

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub date: String,
    pub cores: usize,
    pub cpu: String,
    pub accel: Option<String>,
    pub qemu_version: String,
    pub host_kernel: String,
    pub guest_kernel: Option<String>,
}

/// One measured fork.
#[derive(Debug, Clone, Serialize)]
pub struct ForkSample {
    pub name: String,
    pub requested: Option<&'static str>,
    pub path: Option<String>,
    pub fallback_reason: Option<String>,
    /// Client-measured API round trip (only for single-fork requests).
    pub api_ms: Option<f64>,
    /// stages.snapshot + stages.total: from the daemon starting the request
    /// to the fork answering on its new address.
    pub request_to_ready_ms: Option<f64>,
    /// stages.network_ready: from `cont` to ack / RPC success.
    pub resume_to_ready_ms: Option<f64>,
    pub stages_ms: BTreeMap<String, f64>,
    /// Reached over HTTP from the namespace on its new address.
    pub verified: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub path: &'static str,
    pub api_ms: Option<Summary>,
    pub request_to_ready_ms: Option<Summary>,
    pub resume_to_ready_ms: Option<Summary>,
    /// Median of every stage the daemon recorded.
    pub stage_medians_ms: BTreeMap<String, f64>,
    /// RPC counters of the first round's fork (inherited from the source + its own).
    pub agent_rpc_counts: Option<BTreeMap<String, u64>>,
    pub samples: Vec<ForkSample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub k: u32,
    pub ok: usize,
    pub request_ms: f64,
    pub snapshot_ms: Option<f64>,
    pub resume_to_ready_ms: Option<Summary>,
    pub total_ms: Option<Summary>,
    pub request_to_ready_ms: Option<Summary>,
    pub verified: usize,
}

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

// ---------------------------------------------------------------------------
// environment: namespace, directories, daemon

fn run_cmd(cmd: &mut Command) -> Result<String, BenchError> {
    let out = cmd.output().map_err(io(format!("spawning {cmd:?}")))?;
    if !out.status.success() {
        return Err(BenchError::Command {
            cmd: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The benchmark's private world; dropping it tears everything down.
struct BenchEnv {
    netns: String,
    root: PathBuf,
    data_dir: PathBuf,
    mem_dir: PathBuf,
    socket: PathBuf,
    image: PathBuf,
    daemon: Option<Child>,
    netns_created: bool,
    keep: bool,
}

impl BenchEnv {
    fn create(keep: bool) -> Result<Self, BenchError> {
        let base = std::env::var_os("FORKVM_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/forkvm"));
        let image = base.join("images").join("default");
        if !image.join("manifest.json").exists() {
            return Err(BenchError::ImageMissing(image));
        }
        let tag = format!("{:08x}", rand::random::<u32>());
        let root = std::env::temp_dir().join(format!("forkvm-bench-{tag}"));
        let mut env = Self {
            netns: format!("fvbench-{tag}"),
            data_dir: root.join("data"),
            socket: root.join("forkvm.sock"),
            root,
            mem_dir: PathBuf::from(format!("/dev/shm/forkvm-bench-{tag}")),
            image,
            daemon: None,
            netns_created: false,
            keep,
        };
        run_cmd(Command::new("ip").args(["netns", "add", &env.netns]))?;
        // From here on, Drop deletes the namespace and directories.
        env.netns_created = true;
        run_cmd(Command::new("ip").args(["-n", &env.netns, "link", "set", "lo", "up"]))?;
        let images = env.data_dir.join("images");
        std::fs::create_dir_all(&images).map_err(io("creating the data directory"))?;
        std::fs::create_dir_all(&env.mem_dir).map_err(io("creating the memory directory"))?;
        std::os::unix::fs::symlink(&env.image, images.join("default"))
            .map_err(io("linking the guest image"))?;
        Ok(env)
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("daemon.log")
    }

    fn spawn_daemon(&mut self) -> Result<(), BenchError> {
        let exe = std::env::current_exe().map_err(io("locating the forkvm executable"))?;
        let log = std::fs::File::create(self.log_path()).map_err(io("creating daemon.log"))?;
        let log2 = log.try_clone().map_err(io("daemon.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(exe)
            .arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--bridge", BRIDGE, "--subnet", SUBNET])
            .env("FORKVM_MEM_DIR", &self.mem_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io("spawning the benchmark daemon"))?;
        tracing::info!(pid = child.id(), netns = %self.netns, "benchmark daemon started");
        self.daemon = Some(child);
        Ok(())
    }

    /// Poll `GET /health` until it answers, the daemon dies, or 60 s pass.
    async fn wait_ready(&mut self, c: &Client) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if c.health().await.is_ok() {
                return Ok(());
            }
            if let Some(child) = self.daemon.as_mut()
                && let Ok(Some(st)) = child.try_wait()
            {
                return Err(BenchError::Daemon(
                    format!("exited during start-up ({st})"),
                    self.log_path(),
                ));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Daemon(
                    "not ready within 60 s".into(),
                    self.log_path(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn in_netns(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).args(args);
        c
    }

    /// HTTP GET of a fork's page from the namespace.
    fn http_ok(&self, ip: &str) -> bool {
        self.in_netns(&["curl", "-sS", "--max-time", "5", &format!("http://{ip}/")])
            .stderr(Stdio::null())
            .output()
            .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(PAGE))
            .unwrap_or(false)
    }

    fn qemu_pids(&self) -> Vec<i32> {
        let needle = self.data_dir.to_string_lossy().into_owned();
        let mut pids = vec![];
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                    let cmd = String::from_utf8_lossy(&cmd);
                    if cmd.contains("qemu-system") && cmd.contains(&needle) {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }

    fn cleanup(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if let Some(mut child) = self.daemon.take() {
            // `ip netns exec` execs the daemon: the child pid is the daemon.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.qemu_pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.netns_created {
            match Command::new("ip")
                .args(["netns", "del", &self.netns])
                .status()
            {
                Ok(s) if s.success() => self.netns_created = false,
                other => {
                    tracing::warn!(netns = %self.netns, result = ?other, "deleting the namespace failed")
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.mem_dir);
        if self.keep {
            eprintln!("kept {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        self.cleanup();
    }
}

// ---------------------------------------------------------------------------
// helpers over the API

fn sample(inst: &Instance, requested: Option<HandoffPath>, api_ms: Option<f64>) -> ForkSample {
    let h = inst.handoff.clone().unwrap_or_default();
    let st = &h.stages_ms;
    let request_to_ready = match (st.get("snapshot"), st.get("total")) {
        (Some(s), Some(t)) => Some(s + t),
        _ => None,
    };
    ForkSample {
        name: inst.name.clone(),
        requested: requested.map(|p| p.as_str()),
        path: h.path.map(|p| p.as_str().to_string()),
        fallback_reason: h.fallback_reason.clone(),
        api_ms,
        request_to_ready_ms: request_to_ready,
        resume_to_ready_ms: st.get("network_ready").copied(),
        stages_ms: h.stages_ms,
        verified: None,
    }
}

fn outcomes(resp: ForkResponse) -> Vec<ForkOutcome> {
    match resp {
        ForkResponse::One(i) => vec![ForkOutcome::Created(i)],
        ForkResponse::Many(v) => v,
    }
}

/// Create a Running source serving [`PAGE`] with busybox httpd.
async fn create_source(
    c: &Client,
    env: &BenchEnv,
    name: &str,
    memory_mb: u32,
) -> Result<(Instance, f64), BenchError> {
    let t = Instant::now();
    let src = c
        .create(&InstanceCreateParams {
            name: name.into(),
            memory_mb: Some(memory_mb),
            ..Default::default()
        })
        .await?;
    let boot_ms = t.elapsed().as_secs_f64() * 1000.0;
    let script = format!(
        "mkdir -p /var/www && echo {PAGE} > /var/www/index.html && httpd -p 80 -h /var/www"
    );
    let r = c
        .exec(
            &src.id,
            &ExecParams {
                command: vec!["sh".into(), "-c".into(), script],
                timeout_s: Some(30),
                ..Default::default()
            },
        )
        .await?;
    if r.exit_code != 0 {
        return Err(BenchError::Unexpected(format!(
            "starting httpd in {name} exited {}: {}",
            r.exit_code, r.stderr
        )));
    }
    let ip = src.network.ip.clone().unwrap_or_default();
    // httpd daemonizes before it binds: poll until the page answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.http_ok(&ip) {
        if Instant::now() > deadline {
            return Err(BenchError::Unexpected(format!(
                "source {name} does not serve HTTP on {ip}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!(source = %src.id, memory_mb, boot_ms, "benchmark source running");
    Ok((src, boot_ms))
}

async fn delete_quietly(c: &Client, id: &str, failures: &mut Vec<String>) {
    if let Err(e) = c.delete(id).await {
        failures.push(format!("deleting {id}: {e}"));
    }
}

fn bytes_allocated(path: &Path) -> Option<f64> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.blocks() * 512) as f64)
}

/// Private_Clean + Private_Dirty of a process, in bytes.
fn private_bytes(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_private_kb(&text).map(|kb| (kb * 1024) as f64)
}

fn parse_private_kb(smaps_rollup: &str) -> Option<u64> {
    let mut sum = None;
    for line in smaps_rollup.lines() {
        if let Some(rest) = line
            .strip_prefix("Private_Clean:")
            .or_else(|| line.strip_prefix("Private_Dirty:"))
        {
            let kb = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()?;
            sum = Some(sum.unwrap_or(0) + kb);
        }
    }
    sum
}

fn machine_record(image: &Path, accel: Option<String>) -> Machine {
    let qemu_version = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into());
    let guest_kernel = std::fs::read(image.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["kernel_version"].as_str().map(str::to_string));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        accel,
        qemu_version,
        host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        guest_kernel,
    }
}

// ---------------------------------------------------------------------------
// the phases

/// Order of the paths in round `r`: rotated so no path always goes first.
pub fn round_order(r: usize) -> [HandoffPath; 3] {
    let mut o = PATHS;
    o.rotate_left(r % PATHS.len());
    o
}

async fn bench_paths(
    c: &Client,
    env: &BenchEnv,
    src: &Instance,
    reps: u32,
    pb: &ProgressBar,
    failures: &mut Vec<String>,
) -> Result<Vec<PathResult>, BenchError> {
    let mut samples: BTreeMap<&'static str, Vec<ForkSample>> = BTreeMap::new();
    let mut rpc_counts: BTreeMap<&'static str, BTreeMap<String, u64>> = BTreeMap::new();
    for r in 0..reps as usize {
        for path in round_order(r) {
            pb.set_message(format!("round {}/{reps}: {}", r + 1, path.as_str()));
            let name = format!("bp{}-{}", r + 1, path.as_str());
            let t = Instant::now();
            let resp = c
                .fork(
                    &src.id,
                    &InstanceForkParams {
                        name: name.clone(),
                        from_running: Some(true),
                        handoff: Some(path),
                        ..Default::default()
                    },
                )
                .await;
            let api_ms = t.elapsed().as_secs_f64() * 1000.0;
            pb.inc(1);
            let inst = match resp.map(outcomes) {
                Ok(mut v) if v.len() == 1 => match v.remove(0) {
                    ForkOutcome::Created(i) => *i,
                    ForkOutcome::Failed(f) => {
                        failures.push(format!("{name}: {}", f.error.message));
                        continue;
                    }
                },
                Ok(v) => {
                    failures.push(format!("{name}: expected one fork, got {}", v.len()));
                    continue;
                }
                Err(e) => {
                    failures.push(format!("{name}: fork failed: {e}"));
                    continue;
                }
            };
            let mut s = sample(&inst, Some(path), Some(api_ms));
            if s.path.as_deref() != Some(path.as_str()) {
                failures.push(format!(
                    "{name}: requested path {} but the fork took {:?} (fallback: {:?})",
                    path.as_str(),
                    s.path,
                    s.fallback_reason
                ));
            }
            let ip = inst.network.ip.clone().unwrap_or_default();
            let ok = env.http_ok(&ip);
            if !ok {
                failures.push(format!("{name}: no HTTP answer on {ip}"));
            }
            s.verified = Some(ok);
            if r < PATHS.len() && !rpc_counts.contains_key(path.as_str()) {
                match c.agent(&inst.id).await {
                    Ok(h) => {
                        rpc_counts.insert(path.as_str(), h.rpc_counts);
                    }
                    Err(e) => failures.push(format!("{name}: agent health: {e}")),
                }
            }
            tracing::debug!(fork = %name, api_ms, stages = ?s.stages_ms, "fork measured");
            samples.entry(path.as_str()).or_default().push(s);
            delete_quietly(c, &inst.id, failures).await;
        }
    }
    Ok(PATHS
        .iter()
        .map(|p| {
            let v = samples.remove(p.as_str()).unwrap_or_default();
            path_result(p.as_str(), v, rpc_counts.remove(p.as_str()))
        })
        .collect())
}

fn path_result(
    path: &'static str,
    samples: Vec<ForkSample>,
    agent_rpc_counts: Option<BTreeMap<String, u64>>,
) -> PathResult {
    let col = |f: &dyn Fn(&ForkSample) -> Option<f64>| -> Vec<f64> {
        samples.iter().filter_map(f).collect()
    };
    let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in &samples {
        for (k, v) in &s.stages_ms {
            stages.entry(k.clone()).or_default().push(*v);
        }
    }
    PathResult {
        path,
        api_ms: summarize(&col(&|s| s.api_ms)),
        request_to_ready_ms: summarize(&col(&|s| s.request_to_ready_ms)),
        resume_to_ready_ms: summarize(&col(&|s| s.resume_to_ready_ms)),
        stage_medians_ms: stages
            .into_iter()
            .filter_map(|(k, v)| median_of(&v).map(|m| (k, m)))
            .collect(),
        agent_rpc_counts,
        samples,
    }
}

fn path_ratios(paths: &[PathResult]) -> BTreeMap<String, Option<f64>> {
    let get = |name: &str, f: &dyn Fn(&PathResult) -> Option<Summary>| {
        paths
            .iter()
            .find(|p| p.path == name)
            .and_then(f)
            .map(|s| s.median)
    };
    let ready = |n: &str| get(n, &|p| p.resume_to_ready_ms);
    let req = |n: &str| get(n, &|p| p.request_to_ready_ms);
    BTreeMap::from([
        (
            "mailbox_over_rpc".to_string(),
            ratio(ready("mailbox"), ready("rpc")),
        ),
        (
            "mailbox_over_exec".to_string(),
            ratio(ready("mailbox"), ready("exec")),
        ),
        (
            "rpc_over_exec".to_string(),
            ratio(ready("rpc"), ready("exec")),
        ),
        (
            "request_mailbox_over_rpc".to_string(),
            ratio(req("mailbox"), req("rpc")),
        ),
        (
            "request_mailbox_over_exec".to_string(),
            ratio(req("mailbox"), req("exec")),
        ),
        (
            "request_rpc_over_exec".to_string(),
            ratio(req("rpc"), req("exec")),
        ),
    ])
}

async fn bench_fanout(
    c: &Client,
    env: &BenchEnv,
    src: &Instance,
    k: u32,
    failures: &mut Vec<String>,
) -> Result<FanoutResult, BenchError> {
    let name = format!("fo{k}");
    let t = Instant::now();
    let resp = c
        .fork(
            &src.id,
            &InstanceForkParams {
                name: name.clone(),
                from_running: Some(true),
                count: Some(k),
                ..Default::default()
            },
        )
        .await;
    let request_ms = t.elapsed().as_secs_f64() * 1000.0;
    let outs = match resp {
        Ok(r) => outcomes(r),
        Err(e) => {
            failures.push(format!("fan-out {k}: {e}"));
            vec![]
        }
    };
    let mut samples = vec![];
    let mut verified = 0;
    for o in outs {
        match o {
            ForkOutcome::Created(inst) => {
                if env.http_ok(inst.network.ip.as_deref().unwrap_or_default()) {
                    verified += 1;
                } else {
                    failures.push(format!("{}: no HTTP answer", inst.name));
                }
                samples.push(sample(&inst, None, None));
                delete_quietly(c, &inst.id, failures).await;
            }
            ForkOutcome::Failed(f) => {
                failures.push(format!("{}: {}", f.name, f.error.message));
            }
        }
    }
    let col = |f: &dyn Fn(&ForkSample) -> Option<f64>| -> Vec<f64> {
        samples.iter().filter_map(f).collect()
    };
    Ok(FanoutResult {
        k,
        ok: samples.len(),
        request_ms,
        snapshot_ms: samples
            .first()
            .and_then(|s| s.stages_ms.get("snapshot").copied()),
        resume_to_ready_ms: summarize(&col(&|s| s.resume_to_ready_ms)),
        total_ms: summarize(&col(&|s| s.stages_ms.get("total").copied())),
        request_to_ready_ms: summarize(&col(&|s| s.request_to_ready_ms)),
        verified,
    })
}

async fn bench_memory(
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
        totals.extend(s.stages_ms.get("total").copied());
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
fn memory_ratios(mem: &mut [MemoryResult]) {
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

async fn bench(c: &Client, env: &mut BenchEnv, a: &BenchForkArgs) -> Result<Report, BenchError> {
    let started = Instant::now();
    let steps = 1 + 3 * a.reps as u64 + a.fanout.len() as u64 + a.sizes.len() as u64;
    let pb = ProgressBar::new(steps);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
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

// ---------------------------------------------------------------------------
// output

fn table(rows: &[Vec<String>]) -> String {
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

/// The human report.
pub fn render(r: &Report) -> String {
    let m = &r.machine;
    let mut out = format!(
        "forkvm bench fork — {}\nmachine: {} cores ({}), accel {}, {}, host kernel {}, guest kernel {}\n\
         source boot (256 MiB, create → Running): {} ms; wall time {:.0} s\n\n",
        m.date,
        m.cores,
        m.cpu,
        m.accel.as_deref().unwrap_or("?"),
        m.qemu_version,
        m.host_kernel,
        m.guest_kernel.as_deref().unwrap_or("?"),
        fmt_ms(r.source_boot_ms),
        r.wall_s,
    );
    out.push_str(&format!(
        "Handoff paths ({} rounds, one fork per path per round, interleaved; ms)\n",
        r.reps
    ));
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

    out.push_str("\nStage medians (ms)\n");
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

    out.push_str("\nRatios of medians\n");
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

    out.push_str("\nFan-out (one request, count k, default path; ms; per-fork med/p90/max)\n");
    let mmm = |s: &Option<Summary>| {
        s.map_or("-".into(), |s| {
            format!("{}/{}/{}", fmt_ms(s.median), fmt_ms(s.p90), fmt_ms(s.max))
        })
    };
    let mut rows = vec![vec![
        "k".to_string(),
        "ok".into(),
        "request".into(),
        "snapshot".into(),
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

    out.push_str(
        "\nMemory scaling (3 forks per size, one request; medians; ratios vs the smallest size)\n",
    );
    let mut rows = vec![vec![
        "size".to_string(),
        "boot".into(),
        "fork total".into(),
        "request→ready".into(),
        "mem file/fork".into(),
        "QEMU private/fork".into(),
        "source mem file".into(),
        "time ratio".into(),
        "mem ratio (file/private)".into(),
    ]];
    for m in &r.memory {
        rows.push(vec![
            format!("{} MiB", m.size_mb),
            format!("{} ms", fmt_ms(m.source_boot_ms)),
            m.median_total_ms
                .map_or("-".into(), |v| format!("{} ms", fmt_ms(v))),
            m.median_request_to_ready_ms
                .map_or("-".into(), |v| format!("{} ms", fmt_ms(v))),
            m.median_mem_file_bytes.map_or("-".into(), fmt_mib),
            m.median_qemu_private_bytes.map_or("-".into(), fmt_mib),
            m.source_mem_file_bytes.map_or("-".into(), fmt_mib),
            fmt_ratio(m.fork_time_ratio),
            format!(
                "{}/{}",
                fmt_ratio(m.mem_file_ratio),
                fmt_ratio(m.qemu_private_ratio)
            ),
        ]);
    }
    out.push_str(&table(&rows));

    if r.failures.is_empty() {
        out.push_str("\nFailures: none\n");
    } else {
        out.push_str(&format!("\nFailures ({}):\n", r.failures.len()));
        for f in &r.failures {
            out.push_str(&format!("  - {f}\n"));
        }
    }
    out
}

/// Pipeline order of the stages, for display.
fn stage_rank(s: &str) -> (usize, String) {
    const ORDER: [&str; 11] = [
        "snapshot",
        "allocate",
        "memory_prepare",
        "allocate_tap",
        "mailbox_prepare",
        "vmm_start",
        "state_load",
        "resume",
        "guest_signal_to_applied",
        "network_ready",
        "total",
    ];
    (
        ORDER.iter().position(|o| *o == s).unwrap_or(ORDER.len()),
        s.to_string(),
    )
}

/// `forkvm bench fork`: exit 1 when any fork failed, took another path than
/// requested, or did not answer.
pub async fn fork(json: bool, a: &BenchForkArgs) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut env = BenchEnv::create(a.keep)?;
    let c = Client::new(&env.socket);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let res = tokio::select! {
        r = bench(&c, &mut env, a) => r,
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
    let report = match res {
        Ok(r) => r,
        Err(e) => {
            if let Some(t) = log_tail.filter(|t| !t.is_empty()) {
                eprintln!("last daemon log lines:\n{t}");
            }
            return Err(e.into());
        }
    };
    if json {
        crate::output::print_json(&report)?;
    } else {
        print!("{}", render(&report));
    }
    Ok(if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_and_even_samples() {
        let s = summarize(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            (s.n, s.min, s.median, s.p90, s.max),
            (3, 1.0, 3.0, 5.0, 5.0)
        );
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.p90, 4.0);
        assert_eq!(summarize(&[7.5]).unwrap().p90, 7.5);
    }

    #[test]
    fn p90_is_nearest_rank() {
        let xs: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = summarize(&xs).unwrap();
        assert_eq!(s.median, 5.5);
        assert_eq!(s.p90, 9.0);
        assert_eq!(s.max, 10.0);
        let xs: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(summarize(&xs).unwrap().p90, 18.0);
        let xs: Vec<f64> = (1..=11).map(f64::from).collect();
        // ceil(0.9 * 11) = 10
        assert_eq!(summarize(&xs).unwrap().p90, 10.0);
    }

    #[test]
    fn empty_and_non_finite_samples() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[f64::NAN, f64::INFINITY]), None);
        let s = summarize(&[f64::NAN, 2.0]).unwrap();
        assert_eq!((s.n, s.median), (1, 2.0));
    }

    #[test]
    fn ratios_and_their_format() {
        assert_eq!(ratio(Some(30.0), Some(10.0)), Some(3.0));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
        assert_eq!(fmt_ratio(Some(0.4213)), "0.42x");
        assert_eq!(fmt_ratio(Some(12.345)), "12.3x");
        assert_eq!(fmt_ratio(None), "n/a");
        assert_eq!(fmt_ms(1.234), "1.23");
        assert_eq!(fmt_ms(12.34), "12.3");
        assert_eq!(fmt_ms(1234.5), "1234");
    }

    #[test]
    fn rounds_rotate_the_path_order() {
        use HandoffPath::*;
        assert_eq!(round_order(0), [Mailbox, Rpc, Exec]);
        assert_eq!(round_order(1), [Rpc, Exec, Mailbox]);
        assert_eq!(round_order(2), [Exec, Mailbox, Rpc]);
        assert_eq!(round_order(3), round_order(0));
    }

    fn fake(path: &str, ready: f64, total: f64) -> ForkSample {
        ForkSample {
            name: "f".into(),
            requested: None,
            path: Some(path.into()),
            fallback_reason: None,
            api_ms: Some(total + 5.0),
            request_to_ready_ms: Some(total + 10.0),
            resume_to_ready_ms: Some(ready),
            stages_ms: BTreeMap::from([("network_ready".into(), ready), ("total".into(), total)]),
            verified: Some(true),
        }
    }

    #[test]
    fn path_ratios_use_medians() {
        let paths = vec![
            path_result(
                "mailbox",
                vec![
                    fake("mailbox", 20.0, 200.0),
                    fake("mailbox", 40.0, 220.0),
                    fake("mailbox", 1000.0, 990.0),
                ],
                None,
            ),
            path_result("rpc", vec![fake("rpc", 80.0, 290.0)], None),
            path_result("exec", vec![], None),
        ];
        assert_eq!(paths[0].stage_medians_ms["network_ready"], 40.0);
        let r = path_ratios(&paths);
        assert_eq!(r["mailbox_over_rpc"], Some(0.5));
        // request→ready = total + 10: 230 / 300
        let q = r["request_mailbox_over_rpc"].unwrap();
        assert!((q - 230.0 / 300.0).abs() < 1e-9, "{q}");
        assert_eq!(r["mailbox_over_exec"], None);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["mailbox_over_rpc"], 0.5);
        assert!(v["mailbox_over_exec"].is_null());
    }

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

    #[test]
    fn parses_smaps_rollup() {
        let text = "00400000-7ffd [rollup]\nRss:  9000 kB\nPrivate_Clean:   120 kB\nPrivate_Dirty:  2048 kB\nSwap: 0 kB\n";
        assert_eq!(parse_private_kb(text), Some(2168));
        assert_eq!(parse_private_kb("Rss: 1 kB\n"), None);
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
        let mem = |size_mb, t: f64, b: f64| MemoryResult {
            size_mb,
            source_boot_ms: 1500.0,
            forks: 3,
            median_total_ms: Some(t),
            median_request_to_ready_ms: Some(t + 10.0),
            median_mem_file_bytes: Some(b),
            median_qemu_private_bytes: (size_mb < 1024).then_some(b / 2.0),
            source_mem_file_bytes: Some(b * 4.0),
            fork_time_ratio: None,
            request_to_ready_ratio: None,
            mem_file_ratio: None,
            qemu_private_ratio: None,
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
size      boot     fork total  request→ready  mem file/fork  QEMU private/fork  source mem file  time ratio  mem ratio (file/private)
256 MiB   1500 ms  120 ms      130 ms         8.0 MiB        4.0 MiB            32.0 MiB         1.00x       1.00x/1.00x
1024 MiB  1500 ms  150 ms      160 ms         9.5 MiB        -                  38.0 MiB         1.25x       1.19x/n/a

Failures (1):
  - fo4-4: no free address
";

    #[test]
    fn report_text_layout() {
        assert_eq!(render(&fixture_report()), FIXTURE_TEXT);
    }
}
