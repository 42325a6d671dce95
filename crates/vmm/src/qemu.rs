//! The QEMU backend: command line, launch, QMP control, snapshot/restore.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::args::{build_qemu_args, invalid};
use crate::error::VmmError;
use crate::migrate::{wait_loaded, wait_migration};
use crate::process::{PidFd, is_qemu_for};
use crate::qmp::QmpClient;
use crate::{Hypervisor, MigrationReport, RunState, VmHandle, VmSpec, VmmFuture};

/// The only environment variable QEMU gets (`PATH`, for its helpers).
pub const QEMU_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// Bound on reaching QMP of a running QEMU.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for every thread of a held QEMU to stop.
const HOLD_WAIT: Duration = Duration::from_secs(2);
/// How long to wait after SIGKILL before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Bytes of QEMU's stderr quoted in start errors.
const STDERR_TAIL: u64 = 2048;

/// The virtio-serial port name the guest agent looks for.
pub const AGENT_PORT_NAME: &str = "forkvm.agent";

/// Runs VMs as confined `qemu-system-x86_64` processes that outlive the
/// daemon (`crate::launch`).
#[derive(Debug, Clone)]
pub struct QemuHypervisor {
    pub qemu_bin: PathBuf,
    /// `qemu-img`, which makes disk overlays: beside `qemu_bin` when that
    /// is a path, else found on `PATH`.
    pub qemu_img: PathBuf,
    /// Where each VM's cgroup goes (`None`: QEMU stays in the caller's).
    pub cgroups: Option<forkvm_cgroup::CgroupRoot>,
}

impl QemuHypervisor {
    pub fn new(qemu_bin: impl Into<PathBuf>) -> Self {
        let qemu_bin: PathBuf = qemu_bin.into();
        let qemu_img = match qemu_bin.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.join("qemu-img"),
            _ => PathBuf::from("qemu-img"),
        };
        QemuHypervisor {
            qemu_bin,
            qemu_img,
            cgroups: None,
        }
    }

    /// Puts every VM's QEMU into a cgroup of its own beneath `root`
    /// (`crate::cgroup` has the limits).
    pub fn with_cgroups(mut self, root: forkvm_cgroup::CgroupRoot) -> Self {
        self.cgroups = Some(root);
        self
    }
}

impl Default for QemuHypervisor {
    fn default() -> Self {
        QemuHypervisor::new("qemu-system-x86_64")
    }
}

/// QEMU's stdout and stderr, for its whole life: start errors and runtime
/// errors such as a failed state load land here. `<console_log>.qemu-log`.
pub fn qemu_log_path(spec: &VmSpec) -> PathBuf {
    let mut s = spec.console_log.clone().into_os_string();
    s.push(".qemu-log");
    PathBuf::from(s)
}

pub(crate) fn remove_if_exists(p: &Path) -> Result<(), VmmError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VmmError::io("remove", p, e)),
    }
}

fn read_pidfile(p: &Path) -> Result<u32, VmmError> {
    let s = std::fs::read_to_string(p).map_err(|e| VmmError::Pidfile {
        path: p.to_path_buf(),
        reason: e.to_string(),
    })?;
    s.trim().parse().map_err(|_| VmmError::Pidfile {
        path: p.to_path_buf(),
        reason: format!("not a pid: {:?}", s.trim()),
    })
}

/// Last `STDERR_TAIL` bytes of a file, trimmed, for error messages.
pub(crate) fn file_tail(p: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(p) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(STDERR_TAIL)))
        .is_err()
    {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// What QEMU said at start (its output file's tail).
pub(crate) fn start_output_tail(spec: &VmSpec) -> String {
    let t = file_tail(&qemu_log_path(spec));
    if t.is_empty() {
        "(no output)".to_string()
    } else {
        t
    }
}

fn check_exists(what: &str, p: &Path) -> Result<(), VmmError> {
    std::fs::metadata(p)
        .map(|_| ())
        .map_err(|e| VmmError::io("stat", p, e))
        .map_err(|e| match e {
            VmmError::Io { source, .. } => invalid(format!("{what} {}: {source}", p.display())),
            other => other,
        })
}

fn parent_exists(what: &str, p: &Path) -> Result<(), VmmError> {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => check_exists(&format!("directory of {what}"), d),
        _ => Ok(()),
    }
}

fn caps_ignore_shared() -> Value {
    json!({ "capabilities": [ { "capability": "x-ignore-shared", "state": true } ] })
}

impl QemuHypervisor {
    pub(crate) async fn qmp(&self, h: &VmHandle) -> Result<QmpClient, VmmError> {
        if !is_qemu_for(&h.id, h.pid) {
            return Err(VmmError::NotRunning {
                id: h.id.clone(),
                pid: h.pid,
            });
        }
        QmpClient::connect(&h.qmp_socket, QMP_CONNECT_TIMEOUT).await
    }

    async fn start_impl(&self, spec: &VmSpec) -> Result<VmHandle, VmmError> {
        let t0 = Instant::now();
        let args = build_qemu_args(spec)?;
        self.check_start(spec)?;
        // The cgroup of a QEMU of this VM that died without cleanup.
        crate::cgroup::release(&spec.pidfile).await?;
        let cg = match &self.cgroups {
            Some(root) => Some(crate::cgroup::create(root, spec)?),
            None => None,
        };
        let (pid, st) = match self.launch(spec, &args, cg.as_ref()).await {
            Ok(r) => r,
            Err(e) => {
                crate::launch::remove_start_leftovers(spec);
                if let Err(re) = crate::cgroup::release(&spec.pidfile).await {
                    tracing::warn!(id = %spec.id, error = %re, "removing the vm cgroup failed");
                }
                return Err(e);
            }
        };
        let h = VmHandle::for_spec(spec, pid);
        tracing::info!(id = %spec.id, pid, status = ?st, elapsed_ms = t0.elapsed().as_secs_f64() * 1e3,
            "qemu started");
        Ok(h)
    }

    /// The files the VM needs exist, no QEMU of this VM runs, and the
    /// leftovers of one that died without cleanup are gone.
    fn check_start(&self, spec: &VmSpec) -> Result<(), VmmError> {
        check_exists("kernel", &spec.kernel)?;
        check_exists("initrd", &spec.initrd)?;
        for d in &spec.disks {
            check_exists(&format!("{:?} disk", d.role), &d.path)?;
        }
        if !spec.mem_share {
            // share=off maps an existing base; QEMU would silently create an
            // empty one, which is never what a fork wants.
            check_exists(
                "mem_path (share=off needs an existing base)",
                &spec.mem_path,
            )?;
        }
        for (what, p) in [
            ("mem_path", &spec.mem_path),
            ("console_log", &spec.console_log),
            ("agent_socket", &spec.agent_socket),
            ("qmp_socket", &spec.qmp_socket),
            ("pidfile", &spec.pidfile),
        ] {
            parent_exists(what, p)?;
        }
        if let Some(h) = self.adopt(spec) {
            return Err(VmmError::AlreadyRunning {
                id: spec.id.clone(),
                pid: h.pid,
            });
        }
        // QEMU would refuse to bind over a stale socket and we must not read
        // a stale pid; the old run's log goes too, so start errors never
        // quote a previous run.
        remove_if_exists(&spec.qmp_socket)?;
        remove_if_exists(&spec.agent_socket)?;
        remove_if_exists(&spec.pidfile)?;
        remove_if_exists(&qemu_log_path(spec))
    }

    async fn status_on(&self, h: &VmHandle) -> Result<RunState, VmmError> {
        let mut q = self.qmp(h).await?;
        query_status(&mut q).await
    }

    async fn stop_impl(&self, h: &VmHandle, grace: Duration) -> Result<(), VmmError> {
        let t0 = Instant::now();
        let pidfd = match PidFd::open(h.pid) {
            Ok(p) => Some(p),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => None,
            Err(e) => return Err(VmmError::io("pidfd_open", format!("/proc/{}", h.pid), e)),
        };
        // Checked after opening the pidfd: if the pid is ours now, the pidfd
        // refers to our QEMU and can't be redirected by pid reuse.
        let pidfd = match pidfd {
            Some(p) if is_qemu_for(&h.id, h.pid) => p,
            other => {
                // Still there but no longer our QEMU by its command line: it
                // is exiting (its memory, and so its cmdline, already gone)
                // or a zombie. Wait for the exit, so "stopped" means it.
                if let Some(p) = other {
                    p.wait_exit(KILL_WAIT).await;
                }
                tracing::info!(id = %h.id, pid = h.pid, "stop: vm already gone");
                return self.cleanup(h).await;
            }
        };
        let how = if crate::process::is_stopped(h.pid) {
            // Held: it must not run again (see `hold`), so no QMP quit.
            kill(h, &pidfd).await?;
            "sigkill (held)"
        } else {
            quit_or_signal(h, &pidfd, grace).await?
        };
        tracing::info!(id = %h.id, pid = h.pid, how, elapsed_ms = t0.elapsed().as_secs_f64() * 1e3,
            "qemu stopped");
        self.cleanup(h).await
    }

    async fn hold_impl(&self, h: &VmHandle, held: bool) -> Result<(), VmmError> {
        let io = |e| VmmError::io("pidfd_send_signal", format!("/proc/{}", h.pid), e);
        let pidfd = PidFd::open(h.pid).map_err(io)?;
        // After the pidfd: a recycled pid can't be signalled by mistake.
        if !is_qemu_for(&h.id, h.pid) {
            return Err(VmmError::NotRunning {
                id: h.id.clone(),
                pid: h.pid,
            });
        }
        pidfd
            .signal(if held { libc::SIGSTOP } else { libc::SIGCONT })
            .map_err(io)?;
        if !held {
            return Ok(());
        }
        // Group stop is asynchronous: wait until no thread runs any more.
        let t0 = Instant::now();
        while !crate::process::all_threads_stopped(h.pid) {
            if t0.elapsed() > HOLD_WAIT {
                let _ = pidfd.signal(libc::SIGCONT);
                return Err(VmmError::Timeout {
                    what: format!("stopping every thread of QEMU {}", h.pid),
                    timeout: HOLD_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tracing::debug!(id = %h.id, pid = h.pid, wait_ms = t0.elapsed().as_secs_f64() * 1e3, "qemu held");
        Ok(())
    }

    /// What a gone QEMU leaves: its sockets, pidfile and cgroup.
    async fn cleanup(&self, h: &VmHandle) -> Result<(), VmmError> {
        remove_if_exists(&h.qmp_socket)?;
        remove_if_exists(&h.agent_socket)?;
        crate::cgroup::release(&h.pidfile).await?;
        remove_if_exists(&h.pidfile)
    }

    async fn save_impl(&self, h: &VmHandle, state_file: &Path) -> Result<(), VmmError> {
        let t0 = Instant::now();
        parent_exists("state_file", state_file)?;
        let mut q = self.qmp(h).await?;
        q.execute("stop", None).await?;
        let t_stopped = t0.elapsed();
        // fd: rather than exec:cat — no shell quoting, and "completed" means
        // every byte is in the file (an exec'd cat may still be writing).
        let f = File::create(state_file).map_err(|e| VmmError::io("create", state_file, e))?;
        q.execute("migrate-set-capabilities", Some(caps_ignore_shared()))
            .await?;
        q.execute_with_fd("getfd", Some(json!({ "fdname": "forkvm-save" })), f.as_fd())
            .await?;
        drop(f);
        q.execute("migrate", Some(json!({ "uri": "fd:forkvm-save" })))
            .await?;
        wait_migration(&mut q, &h.id).await?;
        let size = std::fs::metadata(state_file).map(|m| m.len()).unwrap_or(0);
        tracing::info!(id = %h.id, state_bytes = size, stop_ms = t_stopped.as_secs_f64() * 1e3,
            total_ms = t0.elapsed().as_secs_f64() * 1e3, "device state saved");
        Ok(())
    }

    async fn load_impl(&self, h: &VmHandle, state_file: &Path) -> Result<(), VmmError> {
        let t0 = Instant::now();
        let f = File::open(state_file).map_err(|e| VmmError::io("open", state_file, e))?;
        let mut q = self.qmp(h).await?;
        let st = query_status(&mut q).await?;
        if st != RunState::InMigrate {
            return Err(VmmError::Migration(format!(
                "vm {} is {st:?}, not waiting for incoming state (start it with incoming=true)",
                h.id
            )));
        }
        q.execute("migrate-set-capabilities", Some(caps_ignore_shared()))
            .await?;
        q.execute_with_fd("getfd", Some(json!({ "fdname": "forkvm-load" })), f.as_fd())
            .await?;
        drop(f);
        q.execute("migrate-incoming", Some(json!({ "uri": "fd:forkvm-load" })))
            .await?;
        wait_loaded(&mut q, h).await?;
        tracing::info!(id = %h.id, total_ms = t0.elapsed().as_secs_f64() * 1e3, "device state loaded");
        Ok(())
    }
}

pub(crate) async fn query_status(q: &mut QmpClient) -> Result<RunState, VmmError> {
    let r = q.execute("query-status", None).await?;
    let s = r
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| VmmError::Migration(format!("query-status without status: {r}")))?;
    Ok(RunState::from_qemu(s))
}

/// QMP `quit`, then SIGTERM, then SIGKILL, each after `grace`; returns how
/// the process ended.
async fn quit_or_signal(
    h: &VmHandle,
    pidfd: &PidFd,
    grace: Duration,
) -> Result<&'static str, VmmError> {
    let quit = async {
        let mut q = QmpClient::connect(&h.qmp_socket, grace).await?;
        q.execute("quit", None).await
    };
    match tokio::time::timeout(grace, quit).await {
        Ok(Ok(_)) => {}
        // QEMU may close the socket before its reply is read: still fine.
        Ok(Err(e)) => tracing::debug!(id = %h.id, error = %e, "qmp quit"),
        Err(_) => tracing::warn!(id = %h.id, "qmp quit timed out"),
    }
    if pidfd.wait_exit(grace).await {
        return Ok("quit");
    }
    tracing::warn!(id = %h.id, pid = h.pid, "qemu ignored quit; sending SIGTERM");
    pidfd
        .signal(libc::SIGTERM)
        .map_err(|e| VmmError::io("pidfd_send_signal", format!("/proc/{}", h.pid), e))?;
    if pidfd.wait_exit(grace).await {
        return Ok("sigterm");
    }
    tracing::warn!(id = %h.id, pid = h.pid, "qemu ignored SIGTERM; sending SIGKILL");
    kill(h, pidfd).await?;
    Ok("sigkill")
}

/// SIGKILL, then wait (at most [`KILL_WAIT`]) for the exit.
async fn kill(h: &VmHandle, pidfd: &PidFd) -> Result<(), VmmError> {
    pidfd
        .signal(libc::SIGKILL)
        .map_err(|e| VmmError::io("pidfd_send_signal", format!("/proc/{}", h.pid), e))?;
    if !pidfd.wait_exit(KILL_WAIT).await {
        return Err(VmmError::StopFailed {
            id: h.id.clone(),
            pid: h.pid,
        });
    }
    Ok(())
}

impl Hypervisor for QemuHypervisor {
    fn start<'a>(&'a self, spec: &'a VmSpec) -> VmmFuture<'a, VmHandle> {
        Box::pin(self.start_impl(spec))
    }

    fn stop<'a>(&'a self, h: &'a VmHandle, grace: Duration) -> VmmFuture<'a, ()> {
        Box::pin(self.stop_impl(h, grace))
    }

    fn is_alive(&self, id: &str, pid: u32) -> bool {
        is_qemu_for(id, pid)
    }

    fn adopt(&self, spec: &VmSpec) -> Option<VmHandle> {
        let pid = read_pidfile(&spec.pidfile).ok()?;
        is_qemu_for(&spec.id, pid).then(|| VmHandle::for_spec(spec, pid))
    }

    fn pause<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.qmp(h).await?.execute("stop", None).await?;
            Ok(())
        })
    }

    fn resume<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.qmp(h).await?.execute("cont", None).await?;
            Ok(())
        })
    }

    fn hold<'a>(&'a self, h: &'a VmHandle, held: bool) -> VmmFuture<'a, ()> {
        Box::pin(self.hold_impl(h, held))
    }

    fn status<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, RunState> {
        Box::pin(self.status_on(h))
    }

    fn save_state<'a>(&'a self, h: &'a VmHandle, state_file: &'a Path) -> VmmFuture<'a, ()> {
        Box::pin(self.save_impl(h, state_file))
    }

    fn migrate<'a>(
        &'a self,
        from: &'a VmHandle,
        to: &'a VmHandle,
        freeze_disk: Option<&'a Path>,
    ) -> VmmFuture<'a, MigrationReport> {
        Box::pin(self.migrate_impl(from, to, freeze_disk))
    }

    fn ram_offset(&self, memory_mb: u32, gpa: u64) -> Option<u64> {
        // Every VM is a q35 machine (build_qemu_args).
        crate::guest_ram::q35_ram_offset(memory_mb, gpa)
    }

    fn read_ram<'a>(&'a self, h: &'a VmHandle, offset: u64, len: usize) -> VmmFuture<'a, Vec<u8>> {
        // A page at a time in practice (the mailbox): cheaper inline than a
        // blocking-pool hop.
        Box::pin(async move { crate::guest_ram::read(h.pid, &h.mem_path, offset, len) })
    }

    fn write_ram<'a>(&'a self, h: &'a VmHandle, offset: u64, data: &'a [u8]) -> VmmFuture<'a, ()> {
        Box::pin(async move { crate::guest_ram::write(h.pid, &h.mem_path, offset, data) })
    }

    fn load_state<'a>(&'a self, h: &'a VmHandle, state_file: &'a Path) -> VmmFuture<'a, ()> {
        Box::pin(self.load_impl(h, state_file))
    }

    fn freeze_disk<'a>(&'a self, h: &'a VmHandle, new_top: &'a Path) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            let mut q = self.qmp(h).await?;
            let top = crate::disk::prepare_top(&self.qemu_img, &mut q, new_top).await?;
            crate::disk::snapshot_rw(&mut q, &top).await
        })
    }

    fn create_overlay<'a>(
        &'a self,
        top: &'a Path,
        backing: &'a Path,
        backing_format: &'a str,
        size_bytes: u64,
    ) -> VmmFuture<'a, ()> {
        Box::pin(crate::disk::create_overlay(
            &self.qemu_img,
            top,
            backing,
            backing_format,
            size_bytes,
        ))
    }

    fn disk_top<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, Option<PathBuf>> {
        Box::pin(async move { crate::disk::rw_top(&mut self.qmp(h).await?).await })
    }

    fn flatten_disk<'a>(&'a self, h: &'a VmHandle, base: &'a Path) -> VmmFuture<'a, ()> {
        Box::pin(async move { crate::disk::stream_rw(&mut self.qmp(h).await?, &h.id, base).await })
    }
}
