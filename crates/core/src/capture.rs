//! Capturing a running VM into a snapshot: its device state plus a new base
//! holding its memory. The base of snapshots, standbys and forks from a
//! running source.
//!
//! How the memory becomes a base depends on where it lives:
//! - **own file** (`Memory::Own`): pause → device state → the file is copied
//!   sparsely into the base (`Copy`) or, for a standby, becomes the base by a
//!   rename once the VMM is stopped (O(1));
//! - **copy-on-write** (`Memory::Cow`): its RAM is the base it maps plus
//!   pages private to its QEMU, so QEMU must move it: a migration into a
//!   helper VM whose RAM is the new base file (stop-and-copy: the source is
//!   paused for the whole move, see `Hypervisor::migrate`), then the
//!   helper's device state is saved and the helper discarded.

use crate::agent::{CallPolicy, mailbox_of};
use crate::bases;
use crate::error::{CoreError, Result};
use crate::memory::sparse_copy;
use crate::model::{Base, Instance, MailboxInfo, Memory, Snapshot};
use crate::paths::SnapshotPaths;
use crate::services::{Services, new_id};
use chrono::{DateTime, Utc};
use forkvm_vmm::{DiskRole, NetBackend, VmHandle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// What happens to the VM after its state is captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CaptureMode {
    /// The VM runs on.
    Copy,
    /// The VM stays paused; the standby stops it (and, for its own file,
    /// renames the file into the base) once the standby is recorded.
    Standby,
}

pub(crate) struct Captured {
    pub snap: Snapshot,
    pub base: Base,
    pub paths: SnapshotPaths,
    /// The base is already in the store (a handover records it with the
    /// instance that now maps it).
    pub base_recorded: bool,
    /// How long the source's vCPUs were stopped.
    pub pause_ms: f64,
}

/// A VM's pause for a capture: how long, and when its clock stopped (the
/// snapshot's `frozen_at`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pause {
    pub ms: f64,
    pub frozen_at: DateTime<Utc>,
}

impl Captured {
    /// Removes what the capture made (before it was recorded). A handed-over
    /// base stays: the VM maps it (collection removes it when unused).
    pub fn discard(&self, svc: &Services) {
        self.paths.remove();
        if !self.base_recorded {
            let _ = std::fs::remove_file(bases::path(svc, &self.base.id));
        }
    }
}

/// A capture's names, chosen before it starts: forks of a running source
/// may start their VMMs over the base file while it is captured.
pub(crate) struct Planned {
    pub sid: String,
    pub paths: SnapshotPaths,
    pub base_id: String,
    pub base_file: PathBuf,
    /// Set once `base_file` exists at its full size, before the pause, when
    /// the VM's own file is copied or handed over (a VMM may map it then);
    /// dropped unset by other captures.
    pub placed: watch::Sender<bool>,
}

impl Planned {
    pub fn new(svc: &Services) -> Result<Self> {
        let sid = new_id();
        let paths = svc.snapshot_paths(&sid);
        paths.prepare()?;
        let (base_id, base_file) = bases::allocate(svc)?;
        Ok(Self {
            sid,
            paths,
            base_id,
            base_file,
            placed: watch::channel(false).0,
        })
    }

    /// The settings the capture of `inst` will record (no mailbox, size or
    /// freeze instant yet): what forks started during it copy.
    pub fn settings_of(&self, svc: &Services, inst: &Instance) -> Snapshot {
        let base = bases::record(svc, &self.base_id, &self.base_file);
        snapshot_of(
            svc,
            inst,
            self.sid.clone(),
            None,
            &self.paths,
            &base,
            None,
            CaptureMode::Copy,
        )
    }
}

/// Whether a capture of `inst` per `mode` hands its memory over (the own
/// file becomes the base, a new VMM maps it copy-on-write) instead of
/// copying it: an own file of at least `handover_min_mib`.
fn hands_over(svc: &Services, inst: &Instance, mode: CaptureMode) -> bool {
    inst.memory == Memory::Own
        && mode == CaptureMode::Copy
        && crate::memory::allocated_bytes(&svc.paths(inst).mem) >= svc.cfg.handover_min_mib << 20
}

/// Capture a Running VM per `mode`. Any failure leaves the VM running and
/// nothing of the snapshot behind. `inst` is re-read afterwards: a capture
/// moves its disk to a new top (and a handover to a new VMM).
pub(crate) async fn capture(
    svc: &Services,
    inst: &mut Instance,
    name: Option<String>,
    mode: CaptureMode,
) -> Result<Captured> {
    capture_planned(svc, inst, name, mode, Planned::new(svc)?).await
}

/// [`capture`] under names chosen beforehand.
pub(crate) async fn capture_planned(
    svc: &Services,
    inst: &mut Instance,
    name: Option<String>,
    mode: CaptureMode,
    planned: Planned,
) -> Result<Captured> {
    let Some(pid) = inst.pid else {
        planned.paths.remove();
        return Err(CoreError::Conflict(format!(
            "instance {} has no VMM",
            inst.name
        )));
    };
    let vm = svc.handle(inst, pid);
    // The agent re-arms with a new marker after every handoff: ask for the
    // current one before pausing (no mailbox if it doesn't answer).
    let mailbox = current_mailbox(svc, inst).await;
    let t = Instant::now();
    let taken = match memory_into_base(svc, inst, &vm, &planned, mode).await {
        Ok(m) => m,
        Err(e) => {
            planned.paths.remove();
            return Err(e);
        }
    };
    let Planned {
        sid,
        paths: sp,
        base_id: bid,
        ..
    } = planned;
    let Taken {
        base,
        pause,
        base_recorded,
        disk_layer,
    } = taken;
    let pause_ms = pause.ms;
    let mut snap = snapshot_of(svc, inst, sid, name, &sp, &base, mailbox, mode);
    snap.disk_layer = disk_layer;
    snap.frozen_at = Some(pause.frozen_at);
    if let Ok(fresh) = svc.find(&inst.id) {
        *inst = fresh;
    }
    info!(instance = %inst.id, snapshot = %snap.id, base = %bid, ?mode, pause_ms,
          took_ms = t.elapsed().as_secs_f64() * 1000.0, size_bytes = snap.size_bytes,
          "snapshot captured");
    Ok(Captured {
        snap,
        base,
        paths: sp,
        base_recorded,
        pause_ms,
    })
}

/// What [`memory_into_base`] took.
struct Taken {
    base: Base,
    pause: Pause,
    /// The base is already in the store.
    base_recorded: bool,
    /// The writable disk frozen at the same instant, if the VM has one.
    disk_layer: Option<String>,
}

/// The VM's memory into base `bid` by the cheapest way its memory allows,
/// and its writable disk frozen at the same pause. On error nothing of the
/// base is left (a disk layer frozen meanwhile stays in the VM's chain).
async fn memory_into_base(
    svc: &Services,
    inst: &Instance,
    vm: &VmHandle,
    planned: &Planned,
    mode: CaptureMode,
) -> Result<Taken> {
    let (sp, bid, base_file) = (&planned.paths, &planned.base_id, &planned.base_file);
    let own = svc.paths(inst).mem;
    if hands_over(svc, inst, mode) {
        let (base, pause) = crate::handover::hand_over(svc, inst, vm, planned).await?;
        return Ok(Taken {
            base,
            pause,
            base_recorded: true,
            // The old VMM wrote its top until the handover; it is frozen.
            disk_layer: inst.disk_top.clone(),
        });
    }
    let paused = match &inst.memory {
        Memory::Own => own_file(svc, inst, vm, planned, mode).await,
        Memory::Cow { base } => {
            let r = copy_on_write(svc, inst, vm, sp, base_file, mode).await;
            if r.is_ok() {
                // Migrating read every page of the source's base.
                bases::trim(bases::path(svc, base)).await;
            }
            r
        }
    };
    let (pause, disk_layer) = paused.inspect_err(|_| {
        let _ = std::fs::remove_file(base_file);
    })?;
    // A standby's own file becomes the base after the commit; its size is
    // known now.
    let sized = match (mode, &inst.memory) {
        (CaptureMode::Standby, Memory::Own) => own.as_path(),
        _ => base_file.as_path(),
    };
    Ok(Taken {
        base: bases::record(svc, bid, sized),
        pause,
        base_recorded: false,
        disk_layer,
    })
}

/// Own file: (Copy: the base placed and allocated) pause → disk frozen →
/// device state → (Copy) sparse copy into the base and resume; returns how
/// long the VM was paused (Copy) and the frozen disk layer. Standby leaves
/// the VM paused.
async fn own_file(
    svc: &Services,
    inst: &Instance,
    vm: &VmHandle,
    planned: &Planned,
    mode: CaptureMode,
) -> Result<(Pause, Option<String>)> {
    let (sp, base_file) = (&planned.paths, planned.base_file.as_path());
    if mode == CaptureMode::Copy {
        let own = svc.paths(inst).mem;
        crate::memory::sized_like(&own, base_file).map_err(CoreError::io("sizing the new base"))?;
        planned.placed.send_replace(true);
        // The base's blocks before the pause: the copy in it only writes.
        preallocate(&own, base_file).await?;
    }
    let t = Instant::now();
    svc.hv
        .pause(vm)
        .await
        .map_err(CoreError::vmm("pausing the VM"))?;
    let frozen_at = svc.now();
    let saved = async {
        let frozen = crate::layers::freeze(svc, inst, vm).await?;
        svc.hv
            .save_state(vm, &sp.state)
            .await
            .map_err(CoreError::vmm("saving device state"))?;
        // The file must now stay as the state describes it: a paused QEMU
        // still writes guest RAM (e.g. virtio-serial on a host disconnect).
        // A Standby stays held until its VMM is killed.
        svc.hv
            .hold(vm, true)
            .await
            .map_err(CoreError::vmm("holding the paused VMM"))?;
        if mode == CaptureMode::Copy {
            let t = Instant::now();
            copy_memory(&svc.paths(inst).mem, base_file).await?;
            tracing::debug!(instance = %inst.id, copy_ms = t.elapsed().as_secs_f64() * 1000.0,
                            "memory copied into the base");
        }
        Ok(frozen)
    }
    .await;
    if mode == CaptureMode::Copy || saved.is_err() {
        resume_source(svc, inst, vm).await;
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    saved.map(|frozen| (Pause { ms, frozen_at }, frozen))
}

/// Copy-on-write: live-migrate into a helper VM whose RAM is the new base,
/// then save the helper's device state; returns the source's downtime and
/// the disk layer frozen at the migration's switchover. The source is
/// resumed (Copy) or left paused (Standby); on failure it is resumed.
async fn copy_on_write(
    svc: &Services,
    inst: &Instance,
    vm: &VmHandle,
    sp: &SnapshotPaths,
    base_file: &Path,
    mode: CaptureMode,
) -> Result<(Pause, Option<String>)> {
    let helper = start_helper(svc, inst, sp, base_file).await?;
    let next_top = match inst.disk_top.as_deref() {
        Some(top) => Some(crate::layers::plan_freeze(svc, top)?),
        None => None,
    };
    let next_file = next_top
        .as_ref()
        .map(|(l, _)| crate::layers::path(svc, &l.id));
    let moved = async {
        let r = svc
            .hv
            .migrate(vm, &helper, next_file.as_deref())
            .await
            .map_err(CoreError::vmm("migrating the VM into its new base"))?;
        info!(instance = %inst.id, downtime_ms = r.downtime_ms, total_ms = r.total_ms,
              "memory moved into a new base");
        // The vCPUs stopped for the move, which just ended.
        let downtime = chrono::Duration::microseconds((r.downtime_ms * 1000.0) as i64);
        Ok::<Pause, CoreError>(Pause {
            ms: r.downtime_ms,
            frozen_at: svc.now() - downtime,
        })
    }
    .await;
    // The VMM says whether the freeze happened (it may, even if the
    // migration failed after it).
    let frozen = match &next_top {
        Some((next, _pin)) => crate::layers::settle_freeze(svc, inst, vm, next).await?,
        None => None,
    };
    if mode == CaptureMode::Copy || moved.is_err() {
        resume_source(svc, inst, vm).await;
    }
    let saved = match moved {
        Ok(downtime) => svc
            .hv
            .save_state(&helper, &sp.state)
            .await
            .map(|()| downtime)
            .map_err(CoreError::vmm("saving device state")),
        Err(e) => Err(e),
    };
    // Its RAM is the new base, mapped shared: killed without running again.
    let _ = svc.hv.hold(&helper, true).await;
    if let Err(e) = svc.hv.stop(&helper, Duration::from_secs(2)).await {
        warn!(instance = %inst.id, error = %e, "stopping the capture helper failed");
    }
    let _ = std::fs::remove_dir_all(helper_dir(sp));
    let _ = std::fs::remove_file(crate::layers::scratch_path(svc, &helper.id));
    // The base is immutable from now on: no VM user's any more (a VM
    // that maps it gets it root's, shared with the VM group).
    if svc.cfg.vm_users.is_some()
        && let Err(e) = std::os::unix::fs::chown(base_file, Some(0), Some(0))
    {
        warn!(instance = %inst.id, error = %e, "taking the new base back from the VM user");
    }
    let downtime = saved?;
    // Loading wrote every zero page into the new file: give them back.
    bases::trim(base_file.to_path_buf()).await;
    Ok((downtime, frozen))
}

fn helper_dir(sp: &SnapshotPaths) -> PathBuf {
    sp.dir.join("helper")
}

/// A VM like `inst`'s, waiting for incoming state, whose RAM is `base_file`
/// (shared, so its device state can later be saved without the RAM) and
/// whose NIC reaches nothing: it never runs.
async fn start_helper(
    svc: &Services,
    inst: &Instance,
    sp: &SnapshotPaths,
    base_file: &Path,
) -> Result<VmHandle> {
    let image = svc.load_image(&inst.image)?;
    let cmdline = inst.cmdline.clone().unwrap_or_default();
    let dir = helper_dir(sp);
    std::fs::create_dir_all(&dir).map_err(CoreError::io(format!("create {}", dir.display())))?;
    let mut spec = svc.vm_spec(inst, &image, &cmdline, true)?;
    spec.id = format!("{}-capture", inst.id);
    spec.mem_path = base_file.to_path_buf();
    spec.mem_share = true;
    if let Some(net) = spec.net.as_mut() {
        // A TAP of its own that QEMU makes and removes, on no bridge: the
        // NIC's saved state needs a backend with vnet headers, and the
        // source keeps its TAP.
        net.backend = NetBackend::Tap(format!("fvh{:012x}", rand::random::<u64>() >> 16));
    }
    if let Some(rw) = spec.disks.iter_mut().find(|d| d.role == DiskRole::Rw) {
        // A scratch disk of its own: it must never open the source's layers
        // for writing (it never runs, so the content does not matter).
        let size = crate::layers::size_of(svc, inst.disk_top.as_deref().unwrap_or_default())?;
        let template = crate::layers::ensure_template(svc, size).await?;
        // In the layer directory: QEMU opens a qcow2 chain by path, and
        // only that directory is traversable by VM users.
        rw.path = crate::layers::scratch_path(svc, &spec.id);
        let _ = std::fs::remove_file(&rw.path);
        svc.hv
            .create_overlay(&rw.path, &template, "raw", size << 20)
            .await
            .map_err(CoreError::vmm("creating the capture helper's disk"))?;
    }
    spec.agent_socket = dir.join("agent.sock");
    spec.qmp_socket = dir.join("qmp.sock");
    spec.console_log = dir.join("console.log");
    spec.pidfile = dir.join("qemu.pid");
    svc.hv
        .start(&spec)
        .await
        .map_err(CoreError::vmm("starting the capture helper"))
}

/// Releases a held VMM (a no-op if it is not) and continues its vCPUs.
pub(crate) async fn resume_source(svc: &Services, inst: &Instance, vm: &VmHandle) {
    if let Err(e) = svc.hv.hold(vm, false).await {
        warn!(instance = %inst.id, error = %e, "releasing the source's VMM failed");
    }
    if let Err(e) = svc.hv.resume(vm).await {
        warn!(instance = %inst.id, error = %e, "resuming the source after capture failed");
    }
}

#[allow(clippy::too_many_arguments)]
fn snapshot_of(
    svc: &Services,
    inst: &Instance,
    id: String,
    name: Option<String>,
    sp: &SnapshotPaths,
    base: &Base,
    mailbox: Option<MailboxInfo>,
    mode: CaptureMode,
) -> Snapshot {
    Snapshot {
        id,
        name,
        source_instance_id: inst.id.clone(),
        source_instance_name: inst.name.clone(),
        created_at: svc.now(),
        image: inst.image.clone(),
        vcpus: inst.vcpus,
        memory_mb: inst.memory_mb,
        env: inst.env.clone(),
        entrypoint: inst.entrypoint.clone(),
        cmdline: inst.cmdline.clone().unwrap_or_default(),
        network: inst.network.clone(),
        size_bytes: sp.state_bytes() + base.size_bytes,
        standby_of: (mode == CaptureMode::Standby).then(|| inst.id.clone()),
        mailbox,
        base_id: Some(base.id.clone()),
        disk_layer: None,
        frozen_at: None,
        workload: inst.workload.clone(),
        tags: Default::default(),
    }
}

/// `dst` allocated where `src` has data, off the async runtime.
async fn preallocate(src: &Path, dst: &Path) -> Result<()> {
    let (s, d) = (src.to_path_buf(), dst.to_path_buf());
    tokio::task::spawn_blocking(move || crate::memory::preallocate_like(&s, &d))
        .await
        .map_err(|e| CoreError::Internal(format!("memory preallocation task: {e}")))?
        .map_err(CoreError::io("allocating the new base"))?;
    Ok(())
}

/// A sparse copy of a memory file, off the async runtime.
pub(crate) async fn copy_memory(src: &Path, dst: &Path) -> Result<()> {
    let (s, d) = (src.to_path_buf(), dst.to_path_buf());
    tokio::task::spawn_blocking(move || sparse_copy(&s, &d))
        .await
        .map_err(|e| CoreError::Internal(format!("memory copy task: {e}")))?
        .map_err(CoreError::io("copying guest memory"))?;
    Ok(())
}

async fn current_mailbox(svc: &Services, inst: &Instance) -> Option<MailboxInfo> {
    let policy = CallPolicy::within(Duration::from_secs(3), Duration::from_secs(2));
    let socket = svc.paths(inst).agent_socket;
    match svc.agent.health(&inst.id, &socket, policy).await {
        Ok(h) => mailbox_of(&h),
        Err(e) => {
            warn!(instance = %inst.id, error = %e, "no mailbox info for the snapshot");
            None
        }
    }
}
