//! What every operation works with: the configuration, the store and the
//! narrow interfaces to the outside (hypervisor, host network, guest agent,
//! clock), plus the per-instance operation locks. The [`crate::Manager`]
//! owns one `Services` and hands it to each operation.

use crate::agent::GuestAgent;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{CoreError, Result};
use crate::model::{Instance, Snapshot};
use crate::netalloc::NetAllocator;
use crate::paths::{InstancePaths, SnapshotPaths};
use crate::store::Store;
use chrono::{DateTime, Utc};
use forkvm_vmm::{Accel, DiskRole, DiskSpec, Hypervisor, VmHandle, VmSpec};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;

pub(crate) struct Services {
    pub cfg: Config,
    pub store: Store,
    pub hv: Arc<dyn Hypervisor>,
    pub net: NetAllocator,
    pub agent: Arc<dyn GuestAgent>,
    pub clock: Arc<dyn Clock>,
    pub accel: Accel,
    /// Most guest memory (MiB) all VMs with a VMM may have together.
    pub memory_budget_mb: u64,
    pub locks: Locks,
    /// Bases in-flight operations use before any record refers to them.
    pub pins: Arc<Pins>,
    /// Capacity reserved by requests in flight.
    pub ledger: Arc<crate::capacity::Ledger>,
    /// Background promotions of handed-over VMs (set once at start).
    pub promoter: std::sync::OnceLock<crate::promote::Promoter>,
    /// Fetches and converts OCI images.
    pub images: Arc<dyn crate::images::ImageBackend>,
    /// Slots for image pulls running at once.
    pub image_slots: Arc<tokio::sync::Semaphore>,
    /// How far the running pulls have got.
    pub pulls: crate::images::progress::Pulls,
    /// Execs running now, per instance.
    pub execs: crate::guest::ExecSlots,
}

/// Bases pinned by operations in flight: [`crate::bases::collect`] leaves
/// them alone. In memory only: after a crash nothing is in flight.
#[derive(Default)]
pub(crate) struct Pins(Mutex<HashMap<String, usize>>);

impl Pins {
    pub fn pin(self: &Arc<Self>, base: &str) -> Pin {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(base.to_string())
            .or_default() += 1;
        Pin {
            pins: self.clone(),
            base: base.to_string(),
        }
    }

    /// Everything pinned now.
    pub fn pinned(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn is_pinned(&self, base: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(base)
    }
}

/// A base kept from collection while this lives.
pub(crate) struct Pin {
    pins: Arc<Pins>,
    base: String,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut m = self.pins.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.base) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.base);
            }
        }
    }
}

/// Per-instance (and per-snapshot) operation locks: operations on one
/// instance serialise, different instances proceed in parallel.
#[derive(Default)]
pub(crate) struct Locks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    pub async fn acquire(&self, id: &str) -> OwnedMutexGuard<()> {
        self.of(id).lock_owned().await
    }

    /// The lock if nobody holds it (background checks skip busy instances).
    pub fn try_acquire(&self, id: &str) -> Option<OwnedMutexGuard<()>> {
        self.of(id).try_lock_owned().ok()
    }

    pub fn forget(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    fn of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.0.lock().unwrap_or_else(|p| p.into_inner());
        l.entry(id.to_string()).or_default().clone()
    }
}

impl Services {
    /// The paths of `inst`'s current VMM generation.
    pub fn paths(&self, inst: &Instance) -> InstancePaths {
        InstancePaths::new(
            &self.cfg.data_dir,
            &self.cfg.mem_dir,
            &inst.id,
            inst.vmm_gen,
        )
    }

    /// The paths of generation 0 of an instance known only by id (orphans).
    pub fn paths_of_id(&self, id: &str) -> InstancePaths {
        InstancePaths::new(&self.cfg.data_dir, &self.cfg.mem_dir, id, 0)
    }

    pub fn snapshot_paths(&self, sid: &str) -> SnapshotPaths {
        SnapshotPaths::new(&self.cfg.data_dir, &self.cfg.mem_dir, sid)
    }

    /// The handle of `inst`'s VMM `pid`, with the RAM file it maps.
    pub fn handle(&self, inst: &Instance, pid: u32) -> VmHandle {
        VmHandle {
            mem_path: self.mem_file(inst).0,
            ..self.paths(inst).handle(&inst.id, pid)
        }
    }

    /// The file behind `inst`'s guest RAM and whether it is mapped shared.
    pub fn mem_file(&self, inst: &Instance) -> (std::path::PathBuf, bool) {
        match &inst.memory {
            crate::model::Memory::Own => (self.paths(inst).mem, true),
            crate::model::Memory::Cow { base } => (crate::bases::path(self, base), false),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub fn accel_name(&self) -> &'static str {
        match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// By id or by name.
    pub fn find(&self, id_or_name: &str) -> Result<Instance> {
        self.store
            .find_instance(id_or_name)?
            .ok_or_else(|| CoreError::NotFound(format!("instance {id_or_name:?} not found")))
    }

    pub fn find_snapshot(&self, id_or_name: &str) -> Result<Snapshot> {
        self.store
            .find_snapshot(id_or_name)?
            .ok_or_else(|| CoreError::NotFound(format!("snapshot {id_or_name:?} not found")))
    }

    /// Finds the instance, takes its lock and reads it again under the lock
    /// (another operation may have changed it meanwhile).
    pub async fn lock_instance(&self, id_or_name: &str) -> Result<(OwnedMutexGuard<()>, Instance)> {
        let id = self.find(id_or_name)?.id;
        let guard = self.locks.acquire(&id).await;
        Ok((guard, self.find(&id)?))
    }

    pub fn load_image(&self, name: &str) -> Result<crate::images::BootImage> {
        crate::images::resolve(self, name)
    }

    /// The QEMU machine of an instance: identical for a fresh boot and for
    /// every restore of its snapshots (only `incoming` differs), which is
    /// what loading device state requires.
    pub fn vm_spec(
        &self,
        inst: &Instance,
        image: &crate::images::BootImage,
        cmdline: &str,
        incoming: bool,
    ) -> Result<VmSpec> {
        let paths = self.paths(inst);
        let (mem_path, mem_share) = self.mem_file(inst);
        Ok(VmSpec {
            id: inst.id.clone(),
            vcpus: inst.vcpus,
            memory_mb: inst.memory_mb,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: cmdline.to_string(),
            boot_config: None,
            mem_path,
            mem_share,
            net: crate::netalloc::Lease::of(&inst.network)
                .filter(|_| inst.network.enabled)
                .map(|l| l.nic()),
            disks: self.disks(inst, image),
            agent_socket: paths.agent_socket,
            qmp_socket: paths.qmp_socket,
            console_log: paths.console_log,
            pidfile: paths.pidfile,
            accel: self.accel,
            incoming,
            user: crate::vm_users::user_of(self, &inst.id)?,
            jail: self.cfg.vm_jail.then(|| self.cfg.jail_dir()),
        })
    }
}

impl Services {
    /// Removes the bases and disk layers nothing refers to any more.
    pub fn collect_unused(&self) {
        crate::bases::collect(self);
        crate::layers::collect(self);
    }

    /// The image's root filesystem and the instance's writable disk, when
    /// it has them (an image with a root filesystem always has both).
    fn disks(&self, inst: &Instance, image: &crate::images::BootImage) -> Vec<DiskSpec> {
        let image_disk = image.rootfs.clone().map(|path| DiskSpec {
            role: DiskRole::Image,
            path,
        });
        let rw = inst.disk_top.as_deref().map(|top| DiskSpec {
            role: DiskRole::Rw,
            path: crate::layers::path(self, top),
        });
        image_disk.into_iter().chain(rw).collect()
    }
}

/// 16 hex digits: short enough for socket paths and TAP names, random enough
/// (64 bits) never to collide in practice; the store's primary key decides.
pub(crate) fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
