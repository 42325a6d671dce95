//! Harness for forkvm's end-to-end tests.
//!
//! Every [`TestEnv`] owns a fresh network namespace, state directory, memory
//! directory and API socket, and runs a real `forkvm serve` daemon inside that
//! namespace; QEMU, the bridge and the TAPs therefore all live in the
//! namespace and vanish with it. Dropping the env kills the daemon and every
//! QEMU it started and deletes the namespace, also when a test panics.
//!
//! The guest image is built once by `scripts/setup.sh` (into
//! `$FORKVM_TEST_IMAGES`, default `/var/lib/forkvm/images`) and linked into
//! each test's data directory.

pub mod registry;
pub mod upstream;

use anyhow::{Context, Result, bail, ensure};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's debug binaries (`forkvm`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FORKVM_BIN_DIR") {
        return PathBuf::from(d);
    }
    // tests run from target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

pub fn forkvm_bin() -> PathBuf {
    bin_dir().join("forkvm")
}

pub fn images_dir() -> PathBuf {
    std::env::var("FORKVM_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/lib/forkvm/images"))
}

/// Run a command, returning stdout; fails with stderr on a non-zero exit.
pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct TestEnv {
    pub netns: String,
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub mem_dir: PathBuf,
    pub socket: PathBuf,
    pub bridge: String,
    pub subnet: String,
    /// `(address, token)` when the daemon also listens on TCP (inside the namespace).
    pub tcp: Option<(String, String)>,
    /// `(certificate, key)` PEM files: the TCP listener serves TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Extra environment for the daemon (e.g. FORKVM_HANDOFF_TIMEOUT_MS).
    pub daemon_env: Vec<(String, String)>,
    daemon: Option<Child>,
}

impl TestEnv {
    /// A new namespace and directories, and a daemon serving in them.
    pub async fn start() -> Result<Self> {
        Self::start_with(None, None, &[]).await
    }

    /// Like [`TestEnv::start`], with extra daemon environment variables.
    pub async fn start_env(env: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(None, None, env).await
    }

    /// Like [`TestEnv::start_env`], on another instance subnet.
    pub async fn start_subnet(subnet: &str, env: &[(&str, &str)]) -> Result<Self> {
        let mut e = Self::start_with(None, None, env).await?;
        if e.subnet != subnet {
            e.kill_daemon()?;
            e.subnet = subnet.to_string();
            e.spawn_daemon()?;
            e.wait_ready().await?;
        }
        Ok(e)
    }

    /// Like [`TestEnv::start`], with the daemon also serving TCP on
    /// `127.0.0.1:port` of the namespace, authenticated by `token`.
    pub async fn start_tcp(port: u16, token: &str) -> Result<Self> {
        Self::start_with(
            Some((format!("127.0.0.1:{port}"), token.to_string())),
            None,
            &[],
        )
        .await
    }

    /// Like [`TestEnv::start_tcp`], the listener serving TLS with the PEM
    /// certificate chain and key `tls`.
    pub async fn start_tls(port: u16, token: &str, tls: (PathBuf, PathBuf)) -> Result<Self> {
        let tcp = Some((format!("127.0.0.1:{port}"), token.to_string()));
        Self::start_with(tcp, Some(tls), &[]).await
    }

    async fn start_with(
        tcp: Option<(String, String)>,
        tls: Option<(PathBuf, PathBuf)>,
        daemon_env: &[(&str, &str)],
    ) -> Result<Self> {
        let img = images_dir().join("default");
        if !img.join("manifest.json").exists() {
            bail!(
                "guest image missing at {}: run scripts/setup.sh first",
                img.display()
            );
        }
        let tag = format!("{:08x}", rand::random::<u32>());
        let netns = format!("fvt-{tag}");
        let root = std::env::temp_dir().join(format!("forkvm-test-{tag}"));
        sh(Command::new("ip").args(["netns", "add", &netns]))?;
        // From here on, Drop removes the namespace and directories on any error.
        let mut env = Self {
            netns,
            socket: root.join("forkvm.sock"),
            data_dir: root.join("data"),
            root,
            mem_dir: PathBuf::from(format!("/dev/shm/forkvm-test-{tag}")),
            bridge: "fvtbr0".into(),
            subnet: "10.77.0.0/24".into(),
            tcp,
            tls,
            daemon_env: daemon_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            daemon: None,
        };
        // Loopback starts down in a new namespace; the TCP listener needs it.
        sh(Command::new("ip").args(["-n", &env.netns, "link", "set", "lo", "up"]))?;
        std::fs::create_dir_all(env.data_dir.join("images"))?;
        std::fs::create_dir_all(&env.mem_dir)?;
        std::os::unix::fs::symlink(&img, env.data_dir.join("images").join("default"))?;
        env.spawn_daemon()?;
        env.wait_ready().await?;
        Ok(env)
    }

    /// Start (or restart) the daemon in the namespace.
    pub fn spawn_daemon(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("daemon.log"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(forkvm_bin());
        if let Some((addr, token)) = &self.tcp {
            cmd.args(["serve", "--listen", addr])
                .env("FORKVM_API_TOKEN", token);
            if let Some((cert, key)) = &self.tls {
                cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
            }
        } else {
            cmd.arg("serve");
        }
        cmd.envs(self.daemon_env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--bridge", &self.bridge, "--subnet", &self.subnet])
            .env("FORKVM_MEM_DIR", &self.mem_dir)
            // Fault injection (FORKVM_TEST_* in daemon_env) needs the switch.
            .env("FORKVM_TEST_HOOKS", "1")
            .env("RUST_LOG", "info,forkvm=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning forkvm serve")?;
        self.daemon = Some(child);
        Ok(())
    }

    pub async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = self.request("GET", "/health", None).await {
                return Ok(());
            }
            if let Some(c) = self.daemon.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("daemon exited ({st}):\n{}", self.daemon_log());
            }
            if Instant::now() > deadline {
                bail!("daemon not ready within 60 s:\n{}", self.daemon_log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL the daemon (VMs keep running).
    pub fn kill_daemon(&mut self) -> Result<()> {
        if let Some(mut c) = self.daemon.take() {
            // `ip netns exec` execs the daemon, so the child pid is the daemon.
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            c.wait()?;
        }
        Ok(())
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.root.join("daemon.log")).unwrap_or_default()
    }

    /// One HTTP request over the unix socket; returns (status, JSON or text as Value::String).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        self.request_raw(method, path, body.map(|b| b.to_string()))
            .await
    }

    pub async fn request_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, Value)> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://forkvm{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    /// Run a command in the test's namespace (e.g. ping a guest).
    pub fn in_netns(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).args(args);
        c
    }

    /// What to look at when a guest stops answering on `ip`: the host's
    /// view of the namespace (bridge FDB, neighbours, links, nftables, a
    /// ping), the guest's own (through the agent, if it answers), its
    /// console tail and the daemon log.
    pub async fn network_diagnosis(&self, id: &str, ip: &str) -> String {
        let run = |args: &[&str]| match self.in_netns(args).output() {
            Ok(o) => format!(
                "$ {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("$ {}: {e}", args.join(" ")),
        };
        let host: Vec<String> = [
            &["bridge", "fdb", "show"][..],
            &["ip", "neigh"],
            &["ip", "-s", "link"],
            &["nft", "list", "ruleset"],
            &["ping", "-c", "2", "-W", "1", ip],
        ]
        .iter()
        .map(|a| run(a))
        .collect();
        let guest = self
            .exec_ok(
                id,
                &[
                    "sh",
                    "-c",
                    "ip addr; ip -s link show eth0; dmesg | tail -20",
                ],
            )
            .await
            .unwrap_or_else(|e| format!("(agent: {e})"));
        let console =
            std::fs::read_to_string(self.data_dir.join("instances").join(id).join("console.log"))
                .unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- host ---\n{}\n--- guest ---\n{guest}\n--- console tail ---\n{}\n--- daemon log ---\n{}",
            host.join("\n"),
            tail.join("\n"),
            self.daemon_log()
        )
    }

    pub fn ping(&self, ip: &str) -> bool {
        self.in_netns(&["ping", "-c", "1", "-W", "2", ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// HTTP GET from the namespace (the host side of the bridge).
    pub fn http_get(&self, url: &str) -> Option<String> {
        let out = self
            .in_netns(&["curl", "-sS", "--max-time", "5", url])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run a command in an instance through the API; fails unless exit 0.
    pub async fn exec_ok(&self, id: &str, cmd: &[&str]) -> Result<String> {
        let (st, v) = self
            .request(
                "POST",
                &format!("/instances/{id}/exec"),
                Some(serde_json::json!({ "command": cmd, "timeout_s": 30 })),
            )
            .await?;
        if st != 200 || v["exit_code"] != 0 {
            bail!("exec {cmd:?} in {id} -> {st}: {v}");
        }
        Ok(v["stdout"].as_str().unwrap_or_default().to_string())
    }

    /// Runs a command in an instance through the API; its exit code (any).
    pub async fn exec_code(&self, id: &str, cmd: &[&str]) -> Result<i64> {
        let (st, v) = self
            .request(
                "POST",
                &format!("/instances/{id}/exec"),
                Some(serde_json::json!({ "command": cmd, "timeout_s": 30 })),
            )
            .await?;
        ensure!(st == 200, "exec {cmd:?} in {id} -> {st}: {v}");
        v["exit_code"]
            .as_i64()
            .with_context(|| format!("exec {cmd:?}: no exit code in {v}"))
    }

    /// Network interfaces in the namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        let out = sh(&mut self.in_netns(&["ip", "-o", "link", "show"]))?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect())
    }

    /// Guest memory files (`*.mem`) of this env: instances' own files and
    /// bases (snapshots' memory, shared copy-on-write by forks).
    pub fn mem_files(&self) -> Vec<String> {
        let mut out = vec![];
        for dir in [self.mem_dir.clone(), self.mem_dir.join("bases")] {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                out.extend(
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.ends_with(".mem")),
                );
            }
        }
        out
    }

    /// Pids of QEMU processes started for this env's data directory.
    pub fn qemu_pids(&self) -> Vec<i32> {
        qemu_pids_matching(&self.data_dir)
    }
}

/// QEMU processes that name a path under `needle` on their command line
/// or hold a file under it open (QEMU gets most files as descriptors).
pub fn qemu_pids_matching(needle: &Path) -> Vec<i32> {
    let needle_s = needle.to_string_lossy().into_owned();
    let mut pids = vec![];
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd);
                if cmd.contains("qemu-system")
                    && (cmd.contains(&needle_s) || holds_file_under(pid, needle))
                {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

/// Whether process `pid` has a file under `dir` open.
fn holds_file_under(pid: i32, dir: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .any(|l| l.starts_with(dir))
        })
        .unwrap_or(false)
}

impl TestEnv {
    /// Prints the daemon log and every instance's console tail to stderr.
    /// Called on teardown: nextest shows a test's output only when it fails,
    /// so a failure in CI arrives with the guest's side of the story.
    fn dump_diagnostics(&self) {
        let log = self.daemon_log();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("---- daemon log (last 300 lines) ----");
        for l in &lines[lines.len().saturating_sub(300)..] {
            eprintln!("{l}");
        }
        if let Ok(rd) = std::fs::read_dir(self.data_dir.join("instances")) {
            for e in rd.flatten() {
                let console = e.path().join("console.log");
                let Ok(text) = std::fs::read(&console) else {
                    continue;
                };
                let text = String::from_utf8_lossy(&text);
                let lines: Vec<&str> = text.lines().collect();
                eprintln!(
                    "---- console of {} (last 80 lines) ----",
                    e.file_name().to_string_lossy()
                );
                for l in &lines[lines.len().saturating_sub(80)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.dump_diagnostics();
        let _ = self.kill_daemon();
        for pid in self.qemu_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // The daemon that would have removed their cgroups is gone.
        remove_vm_cgroups(&self.data_dir);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        if std::env::var_os("FORKVM_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
        let _ = std::fs::remove_dir_all(&self.mem_dir);
    }
}

/// Removes the VM cgroups recorded under `dir` (`*.cgroup` files beside
/// pidfiles), waiting up to 5 s for killed QEMUs to leave them.
pub fn remove_vm_cgroups(dir: &Path) {
    let mut records = vec![];
    let mut todo = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && depth < 4 {
                todo.push((p, depth + 1));
            } else if p.extension().is_some_and(|x| x == "cgroup") {
                records.push(p);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for r in records {
        for line in std::fs::read_to_string(&r).unwrap_or_default().lines() {
            let cg = Path::new(line);
            if !cg
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("forkvm-"))
            {
                continue;
            }
            while cg.exists() && std::fs::remove_dir(cg).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Poll `f` until it returns Some or the deadline passes.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A string field of a JSON object ("" when absent).
pub fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

/// An instance's IPv4 address from its JSON.
pub fn ip(v: &Value) -> String {
    s(&v["network"], "ip")
}

impl TestEnv {
    /// `POST /instances`, failing unless 201.
    pub async fn create(&self, body: Value) -> Result<Value> {
        let (st, v) = self.request("POST", "/instances", Some(body)).await?;
        if st != 201 {
            bail!("create -> {st}: {v}\n{}", self.daemon_log());
        }
        Ok(v)
    }

    /// Creates an instance with the agent's test hooks enabled and arms the
    /// hook whose trigger file is `hook_file` (see docs/agent.md, "Test hooks").
    pub async fn create_with_hook(&self, name: &str, hook_file: &str) -> Result<Value> {
        let v = self
            .create(serde_json::json!({"name": name, "env": {"FORKVM_AGENT_TEST_HOOKS": "1"}}))
            .await?;
        self.exec_ok(&s(&v, "id"), &["touch", hook_file]).await?;
        Ok(v)
    }

    /// After failed forks of a single running source: the named forks have no
    /// record, the namespace has the links it had, and only the source's QEMU
    /// and memory file remain.
    pub async fn check_only_source_left(
        &self,
        links_before: &[String],
        failed: &[&str],
    ) -> Result<()> {
        for name in failed {
            let (st, _) = self
                .request("GET", &format!("/instances/{name}"), None)
                .await?;
            ensure!(st == 404, "failed fork {name} left a record");
        }
        ensure!(self.links()? == links_before, "TAPs changed");
        ensure!(
            self.qemu_pids().len() == 1,
            "QEMU processes: {:?}",
            self.qemu_pids()
        );
        let mem = self.mem_files();
        ensure!(mem.len() == 1, "memory files: {mem:?}");
        Ok(())
    }
}
