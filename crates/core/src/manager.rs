//! The instance manager: every lifecycle operation goes through here.
//!
//! Each operation on one instance holds that instance's lock, so concurrent
//! requests for the same instance serialise while different instances
//! proceed in parallel. State changes are written to the store before and
//! after each side effect, so a daemon killed at any point can reconcile on
//! restart ([`Manager::open`] → `adopt`).

use crate::agent::{AgentLinks, CallPolicy};
use crate::error::{CoreError, Result};
use crate::model::*;
use crate::netalloc::NetAllocator;
use crate::paths::InstancePaths;
use crate::store::{AllocKind, Store};
use chrono::Utc;
use forkvm_proto::agent as pb;
use forkvm_proto::boot::{BootConfig, BootNetwork};
use forkvm_vmm::{Hypervisor, NetSpec, QemuHypervisor, VmSpec};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// Daemon configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Root of all state: `forkvm.db`, `instances/<id>/`, `images/`.
    pub data_dir: PathBuf,
    /// Directory for guest memory files; must be a tmpfs (default /dev/shm/forkvm).
    pub mem_dir: PathBuf,
    pub bridge: String,
    /// CIDR of the instance network, e.g. "10.88.0.0/16"; the gateway is its first host.
    pub subnet: String,
    pub qemu_bin: PathBuf,
}

/// How long a fresh boot may take until the agent answers (TCG is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a fork may take to answer on its new address after resume
/// (override: FORKVM_HANDOFF_TIMEOUT_MS).
const DEFAULT_HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MEMORY_MB: u32 = 256;
/// How often the daemon checks that Running instances still have their VMM.
const VM_WATCH_PERIOD: Duration = Duration::from_secs(1);
const DEFAULT_VCPUS: u32 = 1;
const MAX_VCPUS: u32 = 64;
const MIN_MEMORY_MB: u32 = 64;
const MAX_MEMORY_MB: u32 = 256 * 1024;

pub struct Manager {
    pub(crate) cfg: Config,
    pub(crate) store: Store,
    pub(crate) hv: QemuHypervisor,
    pub(crate) net: NetAllocator,
    pub(crate) agents: AgentLinks,
    pub(crate) accel: forkvm_vmm::Accel,
    /// Per-instance (and per-snapshot) operation locks.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Handle to ourselves for background work that outlives a request
    /// (`wait_for_network: false` handoffs).
    pub(crate) me: std::sync::Weak<Manager>,
    /// Deadline for re-addressing a fork after resume.
    pub(crate) handoff_timeout: Duration,
    /// Most guest memory (MiB) all VMs with a VMM may have together.
    pub(crate) memory_budget_mb: u64,
    /// Log filter for the agents of VMs booted from now on
    /// (`FORKVM_GUEST_AGENT_LOG`, e.g. `debug`), passed on the kernel
    /// command line; forks inherit their source's.
    agent_log: Option<String>,
}

impl Manager {
    /// Open the state store, set up the bridge and adopt VMs that survived a
    /// daemon restart.
    pub async fn open(cfg: Config) -> Result<Arc<Self>> {
        for d in [&cfg.data_dir, &cfg.mem_dir, &cfg.data_dir.join("instances")] {
            std::fs::create_dir_all(d)
                .map_err(|e| CoreError::internal(&format!("create {}", d.display()), e))?;
        }
        let store = Store::open(&cfg.data_dir.join("forkvm.db"))?;
        let net = NetAllocator::new(&cfg.bridge, &cfg.subnet).await?;
        let accel = detect_accel(&cfg).await;
        info!(accel = ?accel, bridge = %cfg.bridge, subnet = %cfg.subnet, "manager ready");
        let handoff_timeout = std::env::var("FORKVM_HANDOFF_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_HANDOFF_TIMEOUT);
        let memory_budget_mb = std::env::var("FORKVM_MAX_GUEST_MEMORY_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(default_memory_budget_mb);
        let agent_log = guest_agent_log_filter(std::env::var("FORKVM_GUEST_AGENT_LOG").ok());
        let mgr = Arc::new_cyclic(|me| Self {
            hv: QemuHypervisor::new(cfg.qemu_bin.clone()),
            cfg,
            store,
            net,
            agents: AgentLinks::default(),
            accel,
            locks: Mutex::new(HashMap::new()),
            me: me.clone(),
            handoff_timeout,
            memory_budget_mb,
            agent_log,
        });
        mgr.adopt().await?;
        let weak = Arc::downgrade(&mgr);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(VM_WATCH_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(mgr) = weak.upgrade() else { return };
                mgr.reap_dead_vms().await;
            }
        });
        Ok(mgr)
    }

    /// The QEMU machine of an instance: identical for a fresh boot and for
    /// every restore of its snapshots (only `incoming` differs), which is
    /// what loading device state requires.
    pub(crate) fn vm_spec(
        &self,
        inst: &Instance,
        image: &forkvm_image::GuestImage,
        cmdline: &str,
        incoming: bool,
    ) -> VmSpec {
        let paths = self.paths(&inst.id);
        VmSpec {
            id: inst.id.clone(),
            vcpus: inst.vcpus,
            memory_mb: inst.memory_mb,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: cmdline.to_string(),
            mem_path: paths.mem,
            mem_share: true,
            net: match (&inst.network.tap, &inst.network.mac) {
                (Some(tap), Some(mac)) if inst.network.enabled => Some(NetSpec {
                    tap: tap.clone(),
                    mac: mac.clone(),
                }),
                _ => None,
            },
            agent_socket: paths.agent_socket,
            qmp_socket: paths.qmp_socket,
            console_log: paths.console_log,
            pidfile: paths.pidfile,
            accel: self.accel,
            incoming,
        }
    }

    pub(crate) fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        l.entry(id.to_string()).or_default().clone()
    }

    pub(crate) fn paths(&self, id: &str) -> InstancePaths {
        InstancePaths::new(&self.cfg.data_dir, &self.cfg.mem_dir, id)
    }

    pub(crate) fn find(&self, id_or_name: &str) -> Result<Instance> {
        self.store
            .find_instance(id_or_name)?
            .ok_or_else(|| CoreError::NotFound(format!("instance {id_or_name:?} not found")))
    }

    /// Refuse up front what would not fit: `vms` more VMs of `memory_mb`
    /// each (memory budget) needing `ips` more addresses (pool).
    pub(crate) fn check_capacity(&self, vms: u32, memory_mb: u32, ips: u32) -> Result<()> {
        let all = self.store.list_instances()?;
        let used: u64 = all
            .iter()
            .filter(|i| i.state.has_vmm())
            .map(|i| i.memory_mb as u64)
            .sum();
        let want = vms as u64 * memory_mb as u64;
        if used + want > self.memory_budget_mb {
            return Err(CoreError::Exhausted(format!(
                "not enough guest memory: {want} MiB requested, {used} of {} MiB in use \
                 (FORKVM_MAX_GUEST_MEMORY_MB)",
                self.memory_budget_mb
            )));
        }
        if ips > 0 {
            let free = self.net.free_addresses(&self.store)?;
            if (ips as usize) > free {
                return Err(CoreError::Exhausted(format!(
                    "not enough free IPv4 addresses: {ips} needed, {free} free in {}",
                    self.cfg.subnet
                )));
            }
        }
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<Instance>> {
        self.store.list_instances()
    }

    /// By id or by name.
    pub async fn get(&self, id_or_name: &str) -> Result<Instance> {
        self.find(id_or_name)
    }

    pub async fn create(&self, req: CreateRequest) -> Result<Instance> {
        crate::validate_name(&req.name)?;
        let vcpus = req.vcpus.unwrap_or(DEFAULT_VCPUS);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(CoreError::Invalid(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, got {vcpus}"
            )));
        }
        let memory_mb = req.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&memory_mb) {
            return Err(CoreError::Invalid(format!(
                "memory must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB} MiB, got {memory_mb}"
            )));
        }
        for k in req.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(CoreError::Invalid(format!(
                    "invalid environment variable name {k:?}"
                )));
            }
        }
        let image = req.image.clone().unwrap_or_else(|| "default".into());
        // Fail before creating anything when the image is missing.
        self.load_image(&image)?;
        self.check_capacity(1, memory_mb, u32::from(req.network_enabled.unwrap_or(true)))?;

        let id = new_id();
        let lock = self.lock_for(&id);
        let _guard = lock.lock().await;
        let mut inst = Instance {
            env: req.env.clone(),
            entrypoint: req.entrypoint.clone(),
            network: NetworkInfo::unassigned(req.network_enabled.unwrap_or(true)),
            ..Instance::created(id.clone(), req.name.clone(), image, vcpus, memory_mb)
        };
        self.store.insert_instance(&inst)?;
        info!(instance = %id, name = %inst.name, "creating instance");
        match self.boot(&mut inst, None).await {
            Ok(()) => Ok(inst),
            Err(e) => {
                warn!(instance = %id, error = %e, "create failed, cleaning up");
                self.teardown(&inst).await;
                self.store.delete_instance(&id)?;
                Err(e)
            }
        }
    }

    pub async fn start(&self, id_or_name: &str) -> Result<Instance> {
        let mut inst = self.find(id_or_name)?;
        let lock = self.lock_for(&inst.id);
        let _guard = lock.lock().await;
        inst = self.find(&inst.id)?;
        match inst.state {
            InstanceState::Stopped | InstanceState::Shutdown => {}
            InstanceState::Running => return Ok(inst),
            s => {
                return Err(CoreError::Conflict(format!(
                    "instance {} is {}; only a Stopped instance can be started",
                    inst.name,
                    s.as_str()
                )));
            }
        }
        let previous = inst.network.clone();
        self.check_capacity(1, inst.memory_mb, 0)?;
        inst.state_error = None;
        match self.boot(&mut inst, Some(previous)).await {
            Ok(()) => Ok(inst),
            Err(e) => {
                warn!(instance = %inst.id, error = %e, "start failed");
                self.teardown_vm(&inst).await;
                inst.state = InstanceState::Stopped;
                inst.pid = None;
                inst.state_error = Some(e.to_string());
                self.store.update_instance(&inst)?;
                Err(e)
            }
        }
    }

    /// Allocate the network (if needed), start QEMU and wait for the agent.
    async fn boot(&self, inst: &mut Instance, previous: Option<NetworkInfo>) -> Result<()> {
        let image = self.load_image(&inst.image)?;
        let paths = self.paths(&inst.id);
        paths.prepare()?;
        let boot_net = if inst.network.enabled {
            let lease = self
                .net
                .ensure_lease(&self.store, &inst.id, previous.as_ref())
                .await?;
            inst.network = lease.info(&self.cfg.bridge);
            self.store.update_instance(inst)?;
            self.net.create_tap(&lease).await?;
            Some(BootNetwork {
                interface: "eth0".into(),
                mac: lease.mac.clone(),
                ipv4: lease.ip.to_string(),
                prefix_len: lease.prefix_len,
                gateway: lease.gateway.to_string(),
                dns: vec![],
            })
        } else {
            None
        };
        let boot = BootConfig {
            hostname: inst.name.clone(),
            network: boot_net,
            env: inst.env.clone(),
            entrypoint: inst.entrypoint.clone(),
            agent_port: forkvm_proto::boot::AGENT_PORT_NAME.to_string(),
        };
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 quiet loglevel=4 {}",
            boot.to_cmdline_arg()
                .map_err(|e| CoreError::Invalid(format!("boot configuration: {e}")))?
        );
        if let Some(filter) = &self.agent_log {
            // The kernel hands unknown `key=value` parameters to init's environment.
            cmdline.push_str(&format!(" FORKVM_AGENT_LOG={filter}"));
        }
        inst.cmdline = Some(cmdline.clone());
        let spec = self.vm_spec(inst, &image, &cmdline, false);
        let t0 = std::time::Instant::now();
        let handle = self
            .hv
            .start(&spec)
            .await
            .map_err(|e| CoreError::Internal(format!("starting QEMU: {e}")))?;
        inst.pid = Some(handle.pid);
        inst.accel = Some(format!("{:?}", self.accel).to_lowercase());
        inst.state = InstanceState::Initializing;
        inst.started_at = Some(Utc::now());
        inst.stopped_at = None;
        self.store.update_instance(inst)?;
        let health = self.wait_agent(inst, BOOT_TIMEOUT).await.map_err(|e| {
            let tail = paths.console_tail(20);
            CoreError::Timeout(format!("{e}; console tail:\n{tail}"))
        })?;
        info!(instance = %inst.id, boot_ms = t0.elapsed().as_millis() as u64,
              agent_version = %health.version, "instance running");
        inst.mailbox = crate::fork::mailbox_of(&health);
        inst.state = InstanceState::Running;
        self.store.update_instance(inst)?;
        Ok(())
    }

    pub(crate) async fn wait_agent(
        &self,
        inst: &Instance,
        total: Duration,
    ) -> Result<pb::HealthResponse> {
        let paths = self.paths(&inst.id);
        // Fail fast if QEMU dies instead of waiting for the whole deadline.
        let watch = self.vmm_exit(&inst.id, inst.pid, "while waiting for its agent");
        let call = self.agents.call(
            &inst.id,
            &paths.agent_socket,
            "Health",
            // Long tries: a request on a connection the guest isn't serving
            // yet stays buffered and is answered once the agent starts.
            // Short tries abandoned a connection per few seconds of a slow
            // (TCG, loaded) boot; the guest later replayed each dead
            // connection's request and its stray answers broke the live
            // one, sometimes for good (CI, stop 8). A broken connection
            // still fails fast and is retried.
            CallPolicy::within(total, (total / 3).max(Duration::from_secs(10))),
            |mut c| async move { c.health(pb::HealthRequest {}).await },
        );
        tokio::select! {
            r = call => r,
            e = watch => Err(e),
        }
    }

    pub async fn stop(&self, id_or_name: &str) -> Result<Instance> {
        let mut inst = self.find(id_or_name)?;
        let lock = self.lock_for(&inst.id);
        let _guard = lock.lock().await;
        inst = self.find(&inst.id)?;
        match inst.state {
            InstanceState::Stopped => return Ok(inst),
            InstanceState::Standby => {
                return Err(CoreError::Conflict(format!(
                    "instance {} is in Standby; restore or delete it",
                    inst.name
                )));
            }
            _ => {}
        }
        self.teardown_vm(&inst).await;
        inst.state = InstanceState::Stopped;
        inst.pid = None;
        inst.stopped_at = Some(Utc::now());
        self.store.update_instance(&inst)?;
        info!(instance = %inst.id, "instance stopped");
        Ok(inst)
    }

    pub async fn delete(&self, id_or_name: &str) -> Result<()> {
        let inst = self.find(id_or_name)?;
        let lock = self.lock_for(&inst.id);
        let _guard = lock.lock().await;
        let inst = self.find(&inst.id)?;
        self.teardown(&inst).await;
        self.store.delete_instance(&inst.id)?;
        if let Ok(mut l) = self.locks.lock() {
            l.remove(&inst.id);
        }
        info!(instance = %inst.id, name = %inst.name, "instance deleted");
        Ok(())
    }

    pub async fn exec(&self, id_or_name: &str, req: ExecRequest) -> Result<ExecResult> {
        let inst = self.find(id_or_name)?;
        if inst.state != InstanceState::Running {
            return Err(CoreError::Conflict(format!(
                "instance {} is {}; exec needs a Running instance",
                inst.name,
                inst.state.as_str()
            )));
        }
        if req.command.is_empty() || req.command[0].is_empty() {
            return Err(CoreError::Invalid("command must name a program".into()));
        }
        let timeout_s = req.timeout_s.unwrap_or(0);
        let per_try = if timeout_s == 0 {
            Duration::from_secs(24 * 3600)
        } else {
            Duration::from_secs(timeout_s as u64 + 10)
        };
        let paths = self.paths(&inst.id);
        let msg = pb::ExecRequest {
            argv: req.command.clone(),
            env: req.env.clone().into_iter().collect(),
            stdin: req.stdin.clone().unwrap_or_default().into_bytes(),
            timeout_ms: timeout_s.saturating_mul(1000),
            cwd: String::new(),
        };
        let t0 = std::time::Instant::now();
        let resp = self
            .agents
            .call(
                &inst.id,
                &paths.agent_socket,
                "Exec",
                CallPolicy {
                    deadline: tokio::time::Instant::now() + per_try,
                    per_try,
                },
                |mut c| {
                    let msg = msg.clone();
                    async move { c.exec(msg).await }
                },
            )
            .await?;
        Ok(ExecResult {
            exit_code: resp.exit_code,
            stdout: String::from_utf8_lossy(&resp.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&resp.stderr).into_owned(),
            timed_out: resp.timed_out,
            duration_ms: t0.elapsed().as_millis() as u64,
        })
    }

    /// Serial console output; `tail` = last N lines.
    pub async fn logs(&self, id_or_name: &str, tail: Option<usize>) -> Result<String> {
        let inst = self.find(id_or_name)?;
        let paths = self.paths(&inst.id);
        let text = match std::fs::read(&paths.console_log) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(CoreError::internal("reading console log", e)),
        };
        Ok(match tail {
            Some(n) => last_lines(&text, n),
            None => text,
        })
    }

    /// Stop QEMU and remove the TAP and runtime files; keeps allocations
    /// (a stopped instance keeps its identity).
    pub(crate) async fn teardown_vm(&self, inst: &Instance) {
        self.agents.forget(&inst.id);
        let paths = self.paths(&inst.id);
        let pid = inst.pid.or_else(|| paths.read_pid());
        if let Some(pid) = pid
            && self.hv.is_alive(&inst.id, pid)
        {
            let h = paths.handle(&inst.id, pid);
            if let Err(e) = self.hv.stop(&h, Duration::from_secs(5)).await {
                warn!(instance = %inst.id, error = %e, "stopping QEMU failed");
            }
        }
        if let Some(tap) = &inst.network.tap
            && let Err(e) = self.net.delete_tap(tap).await
        {
            warn!(instance = %inst.id, tap = %tap, error = %e, "deleting TAP failed");
        }
        paths.remove_runtime();
    }

    /// Everything `teardown_vm` does, plus releasing the allocations and
    /// removing the instance directory.
    pub(crate) async fn teardown(&self, inst: &Instance) {
        self.teardown_vm(inst).await;
        if let Some(sid) = &inst.snapshot_id {
            self.remove_snapshot(sid);
        }
        if let Err(e) = self.net.release(&self.store, &inst.id) {
            warn!(instance = %inst.id, error = %e, "releasing network failed");
        }
        self.paths(&inst.id).remove_all();
    }

    /// Resolves (with the error to report) once the VMM `pid` of instance
    /// `id` has exited; never if there is none. For racing against waits
    /// that would otherwise run to their deadline.
    pub(crate) async fn vmm_exit(&self, id: &str, pid: Option<u32>, during: &str) -> CoreError {
        let Some(pid) = pid else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !self.hv.is_alive(id, pid) {
                let hint = console_hint(&self.paths(id).console_tail(200))
                    .map(|l| format!("; console: {l}"))
                    .unwrap_or_default();
                return CoreError::Internal(format!("the VM exited {during}{hint}"));
            }
        }
    }

    /// An instance whose VMM is gone becomes Stopped: TAP and runtime files
    /// removed, the address back in the pool (the MAC stays: it is this
    /// instance's and costs nothing; start claims an address again).
    async fn mark_vm_gone(&self, inst: &mut Instance, reason: String) -> Result<()> {
        self.teardown_vm(inst).await;
        self.store.release(AllocKind::Ip, &inst.id)?;
        self.store.release(AllocKind::Tap, &inst.id)?;
        inst.network.ip = None;
        inst.network.tap = None;
        inst.state = InstanceState::Stopped;
        inst.state_error = Some(reason);
        inst.pid = None;
        inst.stopped_at = Some(Utc::now());
        self.store.update_instance(inst)
    }

    /// Running instances whose QEMU has exited (guest panic or power-off,
    /// QEMU crash, an outside kill) become Stopped with the reason and the
    /// console's last line, so the instance list stays truthful. Instances
    /// busy with an operation are left to it.
    pub async fn reap_dead_vms(&self) {
        let Ok(all) = self.store.list_instances() else {
            return;
        };
        for inst in all {
            let dead = inst.state == InstanceState::Running
                && !inst.pending_handoff
                && inst.pid.is_some_and(|p| !self.hv.is_alive(&inst.id, p));
            if !dead {
                continue;
            }
            let lock = self.lock_for(&inst.id);
            let Ok(_g) = lock.try_lock() else {
                continue;
            };
            // Re-read under the lock: an operation may have just finished.
            let Ok(Some(mut inst)) = self.store.find_instance(&inst.id) else {
                continue;
            };
            if inst.state != InstanceState::Running
                || inst.pid.is_none_or(|p| self.hv.is_alive(&inst.id, p))
            {
                continue;
            }
            let reason = match console_hint(&self.paths(&inst.id).console_tail(200)) {
                Some(line) => format!("the VM exited unexpectedly; console: {line}"),
                None => "the VM exited unexpectedly".to_string(),
            };
            warn!(instance = %inst.id, name = %inst.name, %reason, "VMM gone; marking Stopped");
            if let Err(e) = self.mark_vm_gone(&mut inst, reason).await {
                warn!(instance = %inst.id, error = %e, "recording a gone VM failed");
            }
        }
    }

    /// A restore the daemon died in (the instance has a VMM state but still
    /// points at its standby snapshot). Not resumed yet: back to Standby
    /// with the memory returned to the snapshot, nothing lost. Resumed: the
    /// guest ran, the snapshot is spent; Running if the agent answers, else
    /// Stopped.
    async fn adopt_interrupted_restore(
        &self,
        inst: &mut Instance,
        pid: Option<u32>,
        alive: bool,
    ) -> Result<()> {
        let Some(sid) = inst.snapshot_id.clone() else {
            return Ok(());
        };
        let resumed = match (alive, pid) {
            (true, Some(p)) => matches!(
                self.hv
                    .status(&self.paths(&inst.id).handle(&inst.id, p))
                    .await,
                Ok(forkvm_vmm::RunState::Running)
            ),
            _ => false,
        };
        if !resumed {
            warn!(instance = %inst.id, "restore interrupted before resume; back to Standby");
            inst.pid = pid.filter(|_| alive);
            self.finish_standby(inst).await?;
            inst.state = InstanceState::Standby;
            inst.state_error = Some("restore interrupted by a daemon restart".into());
            return self.store.update_instance(inst);
        }
        inst.pid = pid;
        match self.wait_agent(inst, Duration::from_secs(30)).await {
            Ok(h) => {
                inst.mailbox = crate::fork::mailbox_of(&h);
                inst.state = InstanceState::Running;
                inst.snapshot_id = None;
                self.store.update_instance(inst)?;
                self.remove_snapshot(&sid);
                info!(instance = %inst.id, "finished an interrupted restore");
                Ok(())
            }
            Err(e) => {
                warn!(instance = %inst.id, error = %e, "interrupted restore never became ready");
                self.remove_snapshot(&sid);
                inst.snapshot_id = None;
                self.mark_vm_gone(
                    inst,
                    format!("restore interrupted after the guest resumed; agent silent: {e}"),
                )
                .await
            }
        }
    }

    /// Reconcile the store with reality after a (re)start of the daemon:
    /// live VMs are adopted, dead ones become Stopped and release their
    /// network; leftovers that belong to no instance are removed.
    async fn adopt(&self) -> Result<()> {
        for mut inst in self.store.list_instances()? {
            if inst.state == InstanceState::Standby {
                // A standby recorded just before the daemon died may still
                // have its paused VMM, or its memory outside the snapshot
                // (also after a restore interrupted before its VMM started).
                if inst.pid.is_some() || self.paths(&inst.id).mem.exists() {
                    info!(instance = %inst.id, "finishing an interrupted standby");
                    if let Err(e) = self.finish_standby(&mut inst).await {
                        warn!(instance = %inst.id, error = %e, "finishing the standby failed");
                    }
                }
                continue;
            }
            if !inst.state.has_vmm() {
                continue;
            }
            let paths = self.paths(&inst.id);
            let pid = inst.pid.or_else(|| paths.read_pid());
            let alive = pid.is_some_and(|p| self.hv.is_alive(&inst.id, p));
            if inst.snapshot_id.is_some() && !inst.pending_handoff {
                self.adopt_interrupted_restore(&mut inst, pid, alive)
                    .await?;
                continue;
            }
            if inst.pending_handoff && inst.forked_from.is_some() {
                // A fork the daemon died in the middle of: finish it if its VM
                // runs (host-initiated; the mailbox listener died with the
                // daemon), else remove it with everything it holds.
                let running = match (alive, pid) {
                    (true, Some(p)) => matches!(
                        self.hv.status(&paths.handle(&inst.id, p)).await,
                        Ok(forkvm_vmm::RunState::Running)
                    ),
                    _ => false,
                };
                if let (true, Some(p)) = (running, pid) {
                    inst.pid = Some(p);
                    let mut rec = inst.handoff.clone().unwrap_or_default();
                    rec.fallback_reason = Some("daemon restarted during the handoff".into());
                    let r = self
                        .complete_handoff(
                            &mut inst,
                            &mut rec,
                            tokio::time::Instant::now().into_std(),
                            None,
                            HandoffPath::Rpc,
                        )
                        .await;
                    match r {
                        Ok(()) => {
                            info!(instance = %inst.id, "finished an interrupted fork");
                            continue;
                        }
                        Err(e) => {
                            warn!(instance = %inst.id, error = %e, "interrupted fork can't be finished")
                        }
                    }
                }
                warn!(instance = %inst.id, name = %inst.name, "removing unfinished fork");
                self.teardown(&inst).await;
                self.store.delete_instance(&inst.id)?;
                continue;
            }
            if alive && inst.state == InstanceState::Running {
                // A crash during a capture leaves the source paused.
                if let Some(p) = pid {
                    let h = paths.handle(&inst.id, p);
                    if let Ok(st) = self.hv.status(&h).await
                        && matches!(
                            st,
                            forkvm_vmm::RunState::Paused
                                | forkvm_vmm::RunState::PostMigrate
                                | forkvm_vmm::RunState::FinishMigrate
                        )
                    {
                        warn!(instance = %inst.id, state = ?st, "adopted a paused VM; resuming it");
                        if let Err(e) = self.hv.resume(&h).await {
                            warn!(instance = %inst.id, error = %e, "resume failed");
                        }
                    }
                }
                info!(instance = %inst.id, pid = ?pid, "adopted running instance");
                continue;
            }
            if alive {
                // Interrupted mid-boot: the caller never got an answer; finish
                // the boot check now rather than guess.
                inst.pid = pid;
                match self.wait_agent(&inst, Duration::from_secs(30)).await {
                    Ok(_) => {
                        inst.state = InstanceState::Running;
                        self.store.update_instance(&inst)?;
                        info!(instance = %inst.id, "adopted instance that finished booting");
                        continue;
                    }
                    Err(e) => {
                        warn!(instance = %inst.id, error = %e, "adopted VM never became ready")
                    }
                }
            }
            warn!(instance = %inst.id, "VMM gone while the daemon was down; marking Stopped");
            self.mark_vm_gone(
                &mut inst,
                "the VM exited while the daemon was not running".into(),
            )
            .await?;
        }
        self.remove_orphans().await;
        Ok(())
    }

    /// TAPs on our bridge and instance directories that no instance owns.
    async fn remove_orphans(&self) {
        let known: std::collections::HashSet<String> = match self.store.list_instances() {
            Ok(v) => v.into_iter().map(|i| i.id).collect(),
            Err(_) => return,
        };
        let owned_taps: std::collections::HashSet<String> = self
            .store
            .list_instances()
            .map(|v| v.into_iter().filter_map(|i| i.network.tap).collect())
            .unwrap_or_default();
        match self.net.bridge_ports().await {
            Ok(ports) => {
                for p in ports {
                    if p.starts_with(forkvm_net::TAP_PREFIX) && !owned_taps.contains(&p) {
                        warn!(tap = %p, "removing orphan TAP");
                        let _ = self.net.delete_tap(&p).await;
                    }
                }
            }
            Err(e) => warn!(error = %e, "listing bridge ports failed"),
        }
        // Snapshot files without a record: a capture or fork interrupted by
        // a crash (transient fork snapshots are never recorded).
        if let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("snapshots")) {
            for e in rd.flatten() {
                let sid = e.file_name().to_string_lossy().into_owned();
                if matches!(self.store.find_snapshot(&sid), Ok(None)) {
                    warn!(snapshot = %sid, "removing orphan snapshot files");
                    let p = self.snapshot_paths(&sid);
                    let _ = std::fs::remove_file(&p.mem);
                    let _ = std::fs::remove_dir_all(&p.dir);
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("instances")) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&id) {
                    let paths = self.paths(&id);
                    if let Some(pid) = paths.read_pid()
                        && self.hv.is_alive(&id, pid)
                    {
                        warn!(instance = %id, pid, "killing orphan QEMU");
                        let h = paths.handle(&id, pid);
                        let _ = self.hv.stop(&h, Duration::from_secs(2)).await;
                    }
                    warn!(instance = %id, "removing orphan instance directory");
                    paths.remove_all();
                }
            }
        }
    }

    pub(crate) fn load_image(&self, name: &str) -> Result<forkvm_image::GuestImage> {
        forkvm_image::load_image(&self.cfg.data_dir, name).map_err(|e| match e {
            forkvm_image::ImageError::NotFound { .. } => CoreError::NotFound(format!(
                "image {name:?} not found: build it with `forkvm image build`"
            )),
            forkvm_image::ImageError::InvalidName(_) => {
                CoreError::Invalid(format!("invalid image name {name:?}"))
            }
            e => CoreError::internal("loading image", e),
        })
    }
}

/// 90 % of the host's RAM: guest memory is tmpfs-backed and must fit.
fn default_memory_budget_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024 * 9 / 10)
        .unwrap_or(u64::MAX)
}

/// KVM when it really boots the default image here, else TCG; the probe's
/// answer is cached in the data directory.
async fn detect_accel(cfg: &Config) -> forkvm_vmm::Accel {
    let Ok(image) = forkvm_image::load_image(&cfg.data_dir, "default") else {
        return forkvm_vmm::detect_accel_with(
            std::env::var(forkvm_vmm::ACCEL_ENV)
                .ok()
                .as_deref()
                .or(Some("tcg")),
            std::path::Path::new("/dev/kvm"),
            &cfg.qemu_bin,
            std::path::Path::new("/nonexistent"),
            std::path::Path::new("/nonexistent"),
            None,
            forkvm_vmm::PROBE_TIMEOUT,
        );
    };
    let (qemu, cache) = (cfg.qemu_bin.clone(), cfg.data_dir.join("accel.json"));
    tokio::task::spawn_blocking(move || {
        forkvm_vmm::detect_accel(&qemu, &image.kernel, &image.initrd, Some(&cache))
    })
    .await
    .unwrap_or(forkvm_vmm::Accel::Tcg)
}

/// 16 hex digits: short enough for socket paths and TAP names, random enough
/// (64 bits) never to collide in practice; the store's primary key decides.
pub(crate) fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = lines[start..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// Snapshots, standby/restore and forks (see `fork.rs` for the fork flow).
impl Manager {
    /// Pause a Running instance, write its snapshot and stop its VMM.
    pub async fn standby(&self, id_or_name: &str) -> Result<Instance> {
        self.standby_impl(id_or_name).await
    }

    /// Bring a Standby instance back to Running on the same address.
    pub async fn restore(&self, id_or_name: &str) -> Result<Instance> {
        self.restore_impl(id_or_name).await
    }

    /// Fork an instance. One result per fork: `count: None` gives one fork
    /// named `name`; `count: Some(n)` gives `name-1..n`, each succeeding or
    /// failing on its own.
    pub async fn fork(&self, id_or_name: &str, req: ForkRequest) -> Result<Vec<Result<Instance>>> {
        self.fork_instance_impl(id_or_name, req).await
    }

    /// Fork from a stored snapshot.
    pub async fn fork_snapshot(
        &self,
        id_or_name: &str,
        req: ForkRequest,
    ) -> Result<Vec<Result<Instance>>> {
        self.fork_snapshot_impl(id_or_name, req).await
    }

    /// Snapshot a Running (paused briefly) or Standby instance.
    pub async fn create_snapshot(
        &self,
        id_or_name: &str,
        name: Option<String>,
    ) -> Result<Snapshot> {
        self.create_snapshot_impl(id_or_name, name).await
    }

    pub async fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        self.store.list_snapshots()
    }

    pub async fn get_snapshot(&self, id_or_name: &str) -> Result<Snapshot> {
        self.store
            .find_snapshot(id_or_name)?
            .ok_or_else(|| CoreError::NotFound(format!("snapshot {id_or_name:?} not found")))
    }

    /// Delete a snapshot; a Standby instance's own snapshot can't be deleted
    /// (delete or restore the instance instead).
    pub async fn delete_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.delete_snapshot_impl(id_or_name).await
    }
}

/// What the guest agent says about itself (forkvm extra, for operators and
/// tests: RPC counters prove which handoff path a fork took).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AgentHealth {
    pub version: String,
    pub boot_id: String,
    pub uptime_ms: u64,
    pub hostname: String,
    pub rpc_counts: std::collections::BTreeMap<String, u64>,
    pub mailbox: Option<MailboxInfo>,
    pub mailbox_applied: u64,
    pub mailbox_rejected: u64,
    pub mailbox_applied_generation: u64,
}

impl Manager {
    /// Ask a Running instance's agent for its Health.
    pub async fn agent_health(&self, id_or_name: &str) -> Result<AgentHealth> {
        let inst = self.find(id_or_name)?;
        if inst.state != InstanceState::Running {
            return Err(CoreError::Conflict(format!(
                "instance {} is {}; its agent is not reachable",
                inst.name,
                inst.state.as_str()
            )));
        }
        let h = self
            .agents
            .call(
                &inst.id,
                &self.paths(&inst.id).agent_socket,
                "Health",
                CallPolicy::within(Duration::from_secs(10), Duration::from_secs(3)),
                |mut c| async move { c.health(pb::HealthRequest {}).await },
            )
            .await?;
        Ok(AgentHealth {
            mailbox: crate::fork::mailbox_of(&h),
            version: h.version,
            boot_id: h.boot_id,
            uptime_ms: h.uptime_ms,
            hostname: h.hostname,
            rpc_counts: h.rpc_counts.into_iter().collect(),
            mailbox_applied: h.mailbox_applied,
            mailbox_rejected: h.mailbox_rejected,
            mailbox_applied_generation: h.mailbox_applied_generation,
        })
    }
}

/// The console line that best explains a VM's end: the kernel's panic
/// line if there is one, else the last line (at most 200 characters).
fn console_hint(tail: &str) -> Option<String> {
    let lines: Vec<&str> = tail
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains("Kernel panic"))
        .or(lines.last())?;
    Some(line.chars().take(200).collect())
}

/// Accepts a guest agent log filter only if it is safe on a kernel command
/// line (one token, env-filter characters only); anything else is ignored
/// with a warning.
fn guest_agent_log_filter(v: Option<String>) -> Option<String> {
    let v = v?;
    let ok = !v.is_empty()
        && v.len() <= 200
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | ',' | '=' | '.'));
    if !ok {
        warn!(value = %v, "FORKVM_GUEST_AGENT_LOG ignored: not a plain env-filter");
        return None;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::console_hint;
    use super::guest_agent_log_filter as f;

    #[test]
    fn console_hint_prefers_the_panic_line() {
        let tail = "[ 6.1] sysrq: Trigger a crash\n[ 6.2] Kernel panic - not syncing: sysrq triggered crash\n[ 6.3] Kernel Offset: disabled\n";
        assert_eq!(
            console_hint(tail).as_deref(),
            Some("[ 6.2] Kernel panic - not syncing: sysrq triggered crash")
        );
        assert_eq!(
            console_hint("a\nlast line\n\n").as_deref(),
            Some("last line")
        );
        assert_eq!(console_hint(""), None);
        assert_eq!(console_hint(&"x".repeat(500)).map(|l| l.len()), Some(200));
    }

    #[test]
    fn guest_agent_log_filter_accepts_only_one_plain_token() {
        assert_eq!(f(None), None);
        assert_eq!(f(Some("debug".into())).as_deref(), Some("debug"));
        assert_eq!(
            f(Some("forkvm_agent=debug,h2=info".into())).as_deref(),
            Some("forkvm_agent=debug,h2=info")
        );
        for bad in ["", "debug init=/bin/sh", "a\"b", "x;y", "a\nb"] {
            assert_eq!(f(Some(bad.into())), None, "{bad:?}");
        }
    }
}
