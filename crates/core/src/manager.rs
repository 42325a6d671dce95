//! The instance manager: the façade the API and CLI use. It owns the
//! [`Services`] (configuration, store, hypervisor, network, agent, clock,
//! locks) and hands them to each operation's module; the operations
//! themselves live in `lifecycle`, `standby`, `restore`, `snapshot`, `fork`,
//! `guest` and `adopt`.
//!
//! State changes are written to the store before and after each side
//! effect, so a daemon killed at any point reconciles on restart
//! ([`Manager::open`] → [`crate::adopt`]).

use crate::agent::{AgentLinks, GuestAgent};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::error::{CoreError, Result};
use crate::files::{CopyIn, CopyInStart, CopyOut, PathInfo};
use crate::guest::AgentHealth;
use crate::images::{ImageBackend, OciBackend, PullRequest};
use crate::logs::{LogFollow, LogSource};
use crate::model::*;
use crate::netalloc::{BridgeHost, HostNetwork, NetAllocator, bridge_config};
use crate::services::{Locks, Services};
use crate::session::{ExecSession, SessionRequest};
use crate::store::Store;
use forkvm_vmm::{Accel, Hypervisor, QemuHypervisor};
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// How often the daemon checks that Running instances still have their VMM.
const VM_WATCH_PERIOD: Duration = Duration::from_secs(1);

/// Keeps the consoles of VMs with a VMM within their bound.
async fn bound_consoles(svc: &Services) {
    let Ok(all) = svc.store.list_instances() else {
        return;
    };
    let paths = all
        .iter()
        .filter(|i| i.state.has_vmm())
        .map(|i| svc.paths(i).console_log)
        .collect();
    crate::console::bound_all(paths, svc.cfg.console_max_bytes).await;
}

/// The outside world as the core uses it.
pub struct Deps {
    pub hv: Arc<dyn Hypervisor>,
    pub host_net: Arc<dyn HostNetwork>,
    pub agent: Arc<dyn GuestAgent>,
    pub clock: Arc<dyn Clock>,
    pub accel: Accel,
    pub images: Arc<dyn ImageBackend>,
}

impl Deps {
    /// QEMU, the bridge in the daemon's network namespace, gRPC agents, the
    /// system clock, and the accelerator that really boots guests here.
    pub async fn real(cfg: &Config) -> Result<Self> {
        let bridge = bridge_config(&cfg.bridge, &cfg.subnet)?;
        let mut hv = QemuHypervisor::new(cfg.qemu_bin.clone());
        if cfg.cgroups {
            let root = forkvm_vmm::CgroupRoot::detect().map_err(|e| {
                CoreError::Invalid(format!(
                    "per-VM cgroups: {e} (or start the daemon with --no-cgroups)"
                ))
            })?;
            hv = hv.with_cgroups(root);
        }
        Ok(Self {
            hv: Arc::new(hv),
            host_net: Arc::new(BridgeHost::new(bridge).await?),
            agent: Arc::new(AgentLinks::default()),
            clock: Arc::new(SystemClock),
            accel: detect_accel(cfg).await,
            images: Arc::new(
                OciBackend::open(&cfg.data_dir.join("oci"), cfg.insecure_registries.clone())
                    .map_err(|e| CoreError::Internal(format!("image store: {e}")))?,
            ),
        })
    }
}

pub struct Manager {
    svc: Arc<Services>,
}

impl Manager {
    /// Open the state store and adopt VMs that survived a daemon restart.
    pub async fn open(cfg: Config) -> Result<Arc<Self>> {
        let deps = Deps::real(&cfg).await?;
        Self::open_with(cfg, deps).await
    }

    /// [`Manager::open`] with the outside world given (tests use fakes).
    pub async fn open_with(cfg: Config, deps: Deps) -> Result<Arc<Self>> {
        for d in [&cfg.data_dir, &cfg.mem_dir] {
            crate::private_dir::ensure(d)?;
        }
        crate::vm_users::prepare_dirs(&cfg)?;
        if cfg.vm_jail {
            crate::private_dir::ensure(&cfg.jail_dir())?;
        }
        let instances = cfg.data_dir.join("instances");
        std::fs::create_dir_all(&instances)
            .map_err(CoreError::io(format!("create {}", instances.display())))?;
        let store = Store::open(&cfg.data_dir.join("forkvm.db"))?;
        let net = NetAllocator::new(
            &bridge_config(&cfg.bridge, &cfg.subnet)?,
            deps.host_net,
            cfg.egress,
        )?;
        info!(accel = ?deps.accel, bridge = %cfg.bridge, subnet = %cfg.subnet, "manager ready");
        let cfg_pulls = cfg.image_pulls_parallel.max(1);
        let svc = Arc::new(Services {
            memory_budget_mb: cfg
                .memory_budget_mb
                .unwrap_or_else(crate::capacity::default_memory_budget_mb),
            cfg,
            store,
            hv: deps.hv,
            net,
            agent: deps.agent,
            clock: deps.clock,
            accel: deps.accel,
            locks: Locks::default(),
            pins: Default::default(),
            ledger: Default::default(),
            promoter: Default::default(),
            images: deps.images,
            image_slots: Arc::new(tokio::sync::Semaphore::new(cfg_pulls)),
            pulls: Default::default(),
            execs: Default::default(),
        });
        let (promoter, promotions) = crate::promote::Promoter::start(Arc::downgrade(&svc));
        let _ = svc.promoter.set(promoter);
        tokio::spawn(promotions);
        crate::bases::reconcile(&svc)?;
        crate::adopt::adopt_all(&svc).await?;
        // Whatever the last daemon left: the rules of the adopted instances
        // exactly, stale ones gone.
        svc.net.restore_rules(&svc.store).await?;
        crate::layers::reconcile(&svc)?;
        crate::images::catalog::reconcile(&svc)?;
        crate::images::pull::resume_interrupted(&svc)?;
        svc.collect_unused();
        let weak = Arc::downgrade(&svc);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(VM_WATCH_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(svc) = weak.upgrade() else { return };
                if crate::reaper::reap_dead_vms(&svc).await > 0 {
                    svc.collect_unused();
                }
                bound_consoles(&svc).await;
            }
        });
        Ok(Arc::new(Self { svc }))
    }

    /// Bases and layers an operation left without referents go (whatever
    /// its outcome).
    fn collecting<T>(&self, r: T) -> T {
        self.svc.collect_unused();
        r
    }

    /// Start pulling an OCI image (see [`crate::images::pull`]).
    pub async fn pull_image(&self, req: PullRequest) -> Result<ImageRecord> {
        crate::images::pull::request(&self.svc, req).await
    }

    /// Import an OCI layout or `docker save` archive on this host.
    pub async fn import_image(
        &self,
        path: &std::path::Path,
        name: Option<&str>,
        tags: std::collections::BTreeMap<String, String>,
    ) -> Result<ImageRecord> {
        crate::images::pull::import(&self.svc, path, name, tags).await
    }

    pub async fn list_images(
        &self,
        tags: &std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<ImageRecord>> {
        crate::images::catalog::list(&self.svc, tags)
    }

    pub async fn get_image(&self, name: &str) -> Result<ImageRecord> {
        crate::images::catalog::get(&self.svc, name)
    }

    pub async fn delete_image(&self, name: &str) -> Result<()> {
        crate::images::catalog::delete(&self.svc, name).await
    }

    /// Until the instance is in `state`, has failed, or `timeout` (at most
    /// [`crate::MAX_WAIT`]) passed.
    pub async fn wait(
        &self,
        id_or_name: &str,
        state: InstanceState,
        timeout: Duration,
    ) -> Result<crate::WaitOutcome> {
        crate::wait::wait(&self.svc, id_or_name, state, timeout).await
    }

    pub async fn list(&self) -> Result<Vec<Instance>> {
        self.svc.store.list_instances()
    }

    /// By id or by name.
    pub async fn get(&self, id_or_name: &str) -> Result<Instance> {
        self.svc.find(id_or_name)
    }

    /// Boot a new instance; returns once its agent answers.
    pub async fn create(&self, req: CreateRequest) -> Result<Instance> {
        self.collecting(crate::lifecycle::create(&self.svc, req).await)
    }

    pub async fn start(&self, id_or_name: &str) -> Result<Instance> {
        crate::lifecycle::start(&self.svc, id_or_name).await
    }

    pub async fn stop(&self, id_or_name: &str) -> Result<Instance> {
        self.collecting(crate::lifecycle::stop(&self.svc, id_or_name).await)
    }

    pub async fn delete(&self, id_or_name: &str) -> Result<()> {
        self.collecting(crate::lifecycle::delete(&self.svc, id_or_name).await)
    }

    pub async fn exec(&self, id_or_name: &str, req: ExecRequest) -> Result<ExecResult> {
        crate::guest::exec(&self.svc, id_or_name, req).await
    }

    /// Serial console output; `tail` = last N lines.
    pub async fn logs(
        &self,
        id_or_name: &str,
        tail: Option<usize>,
        source: LogSource,
    ) -> Result<String> {
        crate::logs::read(&self.svc, id_or_name, tail, source).await
    }

    /// The log so far and a follower of what is written next (until the
    /// instance stops).
    pub async fn follow_logs(
        &self,
        id_or_name: &str,
        tail: Option<usize>,
        source: LogSource,
    ) -> Result<(String, LogFollow)> {
        crate::logs::follow(&self.svc, id_or_name, tail, source).await
    }

    /// Ask a Running instance's agent for its Health.
    pub async fn agent_health(&self, id_or_name: &str) -> Result<AgentHealth> {
        crate::guest::agent_health(&self.svc, id_or_name).await
    }

    /// Pause a Running instance, write its snapshot and stop its VMM.
    pub async fn standby(&self, id_or_name: &str) -> Result<Instance> {
        self.collecting(crate::standby::standby(&self.svc, id_or_name).await)
    }

    /// Bring a Standby instance back to Running on the same address.
    pub async fn restore(&self, id_or_name: &str) -> Result<Instance> {
        let r = self.collecting(crate::restore::restore(&self.svc, id_or_name).await);
        if let Ok(i) = &r {
            crate::layers::flatten_later(&self.svc, &i.id);
        }
        r
    }

    /// Fork an instance. One result per fork: `count: None` gives one fork
    /// named `name`; `count: Some(n)` gives `name-1..n`, each succeeding or
    /// failing on its own.
    pub async fn fork(&self, id_or_name: &str, req: ForkRequest) -> Result<Vec<Result<Instance>>> {
        let r = self.collecting(crate::fork::fork_instance(&self.svc, id_or_name, req).await);
        if let Ok(forks) = &r {
            self.flatten_deep_disks(Some(id_or_name), forks);
        }
        r
    }

    /// Disk chains a capture or fork made too deep are flattened in the
    /// background (`crate::layers`).
    fn flatten_deep_disks(&self, source: Option<&str>, forks: &[Result<Instance>]) {
        let forks = forks.iter().flatten().map(|i| i.id.as_str());
        for id in source.into_iter().chain(forks) {
            crate::layers::flatten_later(&self.svc, id);
        }
    }

    /// Fork from a stored snapshot.
    pub async fn fork_snapshot(
        &self,
        id_or_name: &str,
        req: ForkRequest,
    ) -> Result<Vec<Result<Instance>>> {
        let r = self.collecting(crate::fork::fork_snapshot(&self.svc, id_or_name, req).await);
        if let Ok(forks) = &r {
            self.flatten_deep_disks(None, forks);
        }
        r
    }

    /// Snapshot a Running (paused briefly) or Standby instance.
    pub async fn create_snapshot(
        &self,
        id_or_name: &str,
        name: Option<String>,
    ) -> Result<Snapshot> {
        self.create_snapshot_tagged(id_or_name, name, Default::default())
            .await
    }

    /// [`Manager::create_snapshot`] with the user's tags on it.
    pub async fn create_snapshot_tagged(
        &self,
        id_or_name: &str,
        name: Option<String>,
        tags: std::collections::BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        let r = self.collecting(crate::snapshot::create(&self.svc, id_or_name, name, tags).await);
        if r.is_ok() {
            self.flatten_deep_disks(Some(id_or_name), &[]);
        }
        r
    }

    pub async fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        self.svc.store.list_snapshots()
    }

    pub async fn get_snapshot(&self, id_or_name: &str) -> Result<Snapshot> {
        self.svc.find_snapshot(id_or_name)
    }

    /// Delete a snapshot; a Standby instance's own snapshot can't be deleted
    /// (delete or restore the instance instead).
    pub async fn delete_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.collecting(crate::snapshot::delete(&self.svc, id_or_name).await)
    }

    /// Start an interactive exec (streamed input and output, optionally on
    /// a terminal).
    pub async fn exec_session(&self, id_or_name: &str, req: SessionRequest) -> Result<ExecSession> {
        crate::session::start(&self.svc, id_or_name, req).await
    }

    /// Put an instance back to one of its own snapshots, in place (the
    /// snapshot stays).
    pub async fn restore_snapshot(
        &self,
        id_or_name: &str,
        snapshot: &str,
        target: Option<InstanceState>,
    ) -> Result<Instance> {
        self.collecting(crate::rollback::restore_to(&self.svc, id_or_name, snapshot, target).await)
    }

    /// CPU, memory and network use of an instance's VM.
    pub async fn stats(&self, id_or_name: &str) -> Result<crate::stats::InstanceStats> {
        crate::stats::stats(&self.svc, id_or_name).await
    }

    /// What is at a path in a Running guest.
    pub async fn stat(&self, id_or_name: &str, path: &str, follow: bool) -> Result<PathInfo> {
        crate::files::stat(&self.svc, id_or_name, path, follow).await
    }

    /// Start writing one file or directory into a Running guest.
    pub async fn copy_in(&self, id_or_name: &str, start: CopyInStart) -> Result<CopyIn> {
        crate::files::copy_in(&self.svc, id_or_name, start).await
    }

    /// Stream a file or tree out of a Running guest.
    pub async fn copy_out(&self, id_or_name: &str, path: &str, follow: bool) -> Result<CopyOut> {
        crate::files::copy_out(&self.svc, id_or_name, path, follow).await
    }

    /// The Prometheus exposition, gauges refreshed from the store first.
    pub fn metrics_text(&self) -> Result<String> {
        let observer = self.svc.store.observer();
        let states = self
            .svc
            .store
            .list_instances()?
            .into_iter()
            .map(|i| i.state);
        observer.metrics.set_instances(states);
        observer
            .metrics
            .set_capacity(crate::capacity::figures(&self.svc)?);
        observer
            .metrics
            .set_subscribers(observer.events.subscribers());
        Ok(observer.metrics.encode())
    }

    /// Metrics and events (the API's request timings go here too).
    pub fn observer(&self) -> &Arc<crate::observe::Observer> {
        self.svc.store.observer()
    }

    /// The parts every operation uses (for the crate's own tests).
    #[cfg(test)]
    pub(crate) fn services(&self) -> &Arc<Services> {
        &self.svc
    }

    /// One pass of the VMM watch (it also runs every second on its own).
    pub async fn reap_dead_vms(&self) {
        crate::reaper::reap_dead_vms(&self.svc).await;
        self.svc.collect_unused();
    }
}

/// KVM when it really boots the default image here, else TCG; the probe's
/// answer is cached in the data directory.
async fn detect_accel(cfg: &Config) -> Accel {
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
    .unwrap_or(Accel::Tcg)
}
