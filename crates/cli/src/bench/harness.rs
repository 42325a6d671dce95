//! The benchmark's private world: a network namespace with its own data and
//! memory directories and `forkvm serve` inside, torn down on drop; and the
//! API helpers every scenario uses (sources, fork outcomes, deletion).

use super::{BenchError, io};
use crate::client::Client;
use forkvm_api::wire::{ExecParams, ForkOutcome, ForkResponse, Instance, InstanceCreateParams};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Page every benchmark source serves; a fork answering with it is reachable.
const PAGE: &str = "forkvm-bench-ok";
const BRIDGE: &str = "fvb0";
const SUBNET: &str = "10.66.0.0/16";

/// Runs `cmd` to completion and returns its stdout; a non-zero exit is an
/// error carrying its stderr.
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
pub(super) struct BenchEnv {
    netns: String,
    root: PathBuf,
    data_dir: PathBuf,
    pub(super) mem_dir: PathBuf,
    pub(super) socket: PathBuf,
    pub(super) image: PathBuf,
    daemon: Option<Child>,
    /// Extra environment of the daemon (its capacity settings).
    daemon_env: Vec<(&'static str, String)>,
    netns_created: bool,
    keep: bool,
}

impl BenchEnv {
    pub(super) fn create(keep: bool) -> Result<Self, BenchError> {
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
            daemon_env: vec![],
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

    /// Sets `key=value` in the environment of the daemon started next.
    pub(super) fn set_daemon_env(&mut self, key: &'static str, value: String) {
        self.daemon_env.push((key, value));
    }

    pub(super) fn log_path(&self) -> PathBuf {
        self.root.join("daemon.log")
    }

    pub(super) fn spawn_daemon(&mut self) -> Result<(), BenchError> {
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
            // FORKVM_BENCH_LOG: the daemon's filter (e.g. `info,forkvm_core=debug`).
            .env(
                "RUST_LOG",
                std::env::var("FORKVM_BENCH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
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
    pub(super) async fn wait_ready(&mut self, c: &Client) -> Result<(), BenchError> {
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
    pub(super) fn http_ok(&self, ip: &str) -> bool {
        self.http_get(ip).is_ok()
    }

    /// HTTP GET of a fork's page from the namespace (5 s at most); the
    /// error is curl's reason.
    pub(super) fn http_get(&self, ip: &str) -> Result<(), String> {
        let o = self
            .in_netns(&["curl", "-sS", "--max-time", "5", &format!("http://{ip}/")])
            .output()
            .map_err(|e| format!("running curl: {e}"))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        if !String::from_utf8_lossy(&o.stdout).contains(PAGE) {
            return Err("answered without the benchmark's page".into());
        }
        Ok(())
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

/// The per-fork entries of a fork response, single or batch.
pub(super) fn outcomes(resp: ForkResponse) -> Vec<ForkOutcome> {
    match resp {
        ForkResponse::One(i) => vec![ForkOutcome::Created(i)],
        ForkResponse::Many(v) => v,
    }
}

/// Create a Running source serving [`PAGE`] with busybox httpd.
pub(super) async fn create_source(
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

/// Deletes an instance; a failure is recorded, not raised.
pub(super) async fn delete_quietly(c: &Client, id: &str, failures: &mut Vec<String>) {
    if let Err(e) = c.delete(id).await {
        failures.push(format!("deleting {id}: {e}"));
    }
}
