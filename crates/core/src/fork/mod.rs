//! The fork pipeline, one named step each:
//!
//! 1. [`plan`] — names (`name` or `name-1..n`), target state, handoff path;
//!    capacity checked before anything is created;
//! 2. [`base_of_instance`] / [`fork_snapshot`] — the memory and device
//!    state forks start from: a Standby source's own snapshot, a stored
//!    snapshot, or a transient one captured from a Running source (paused
//!    only for the capture); forks of a running source with its own memory
//!    and no disk start during its capture ([`early`]);
//! 3. per fork, two at a time ([`fork_one`], all or nothing): [`allocate`]
//!    (record, IPv4, MAC; its memory: a copy-on-write mapping of the base) →
//!    [`prepare_memory`] (no copy: the instance directory) → [`prepare_disk`]
//!    (image instances: an empty top over the frozen layer) → for a Running target:
//!    [`resume::start_waiting`] (TAP, VMM) → the base ready ([`Gate`]) →
//!    [`resume::load`] (device state) → [`handoff::prepare`]
//!    (mailbox write into the paused fork) → [`resume::resume`] →
//!    [`handoff::complete`] (the fork answers on its own address) → commit;
//!    Standby and Stopped targets park the fork instead of running it;
//! 4. a transient snapshot's record is removed once every fork exists; its
//!    base lives on while forks map it (`bases::collect`).
//!
//! A fork that fails leaves nothing behind: its VMM, TAP, allocations, files
//! and record are removed and its slot in the result carries the error.

mod early;

use crate::capacity::{self, Demand};
use crate::capture::{CaptureMode, Captured, capture};
use crate::error::{CoreError, Result};
use crate::model::*;
use crate::paths::SnapshotPaths;
use crate::services::{Services, new_id};
use crate::{handoff, resume, teardown};
use early::Gate;
use std::sync::Arc;
use std::time::Instant;
use tracing::{Instrument, info, info_span, warn};

/// Most forks restored at the same time (QEMU start-up is CPU-bound).
const FORK_PARALLELISM: usize = 2;
/// Most forks in one request.
pub const MAX_FORK_COUNT: u32 = 64;

/// What every fork of one request shares.
struct Plan {
    names: Vec<String>,
    target: InstanceState,
    wait: bool,
    prefer: HandoffPath,
    /// Ports published for the (single) fork.
    ports: Vec<PublishedPort>,
    /// The request's share of the capacity, until it finished.
    _reserved: capacity::Reservation,
}

/// What forks copy from their source before its base is ready: the
/// snapshot's settings (for a capture in progress, those it will record).
struct Origin {
    snap: Snapshot,
    /// The instance or snapshot the forks record as their origin.
    forked_from: String,
}

impl Origin {
    fn of(base: &Base) -> Self {
        Self {
            snap: base.snap.clone(),
            forked_from: base.forked_from.clone(),
        }
    }
}

/// The snapshot forks start from.
struct Base {
    snap: Snapshot,
    paths: SnapshotPaths,
    /// Captured for this request only (removed afterwards).
    transient: bool,
    /// The instance or snapshot the forks record as their origin.
    forked_from: String,
    /// Time to obtain the base (the capture, for a transient one).
    snapshot_ms: f64,
    /// How long the source's vCPUs were stopped for the capture.
    pause_ms: Option<f64>,
    /// Keeps a transient snapshot's base until the forks refer to it.
    _pin: Option<crate::services::Pin>,
}

/// Fork an instance. One result per fork.
pub(crate) async fn fork_instance(
    svc: &Arc<Services>,
    id_or_name: &str,
    req: ForkRequest,
) -> Result<Vec<Result<Instance>>> {
    let src = svc.find(id_or_name)?;
    let source = Source {
        memory_mb: src.memory_mb,
        network: src.network.enabled,
        new_base_mb: match (req.from_running, &src.memory) {
            (false, _) => 0,
            // The copy is as big as what the guest has touched.
            (true, Memory::Own) => {
                crate::memory::allocated_bytes(&svc.paths(&src).mem).div_ceil(1 << 20)
            }
            (true, Memory::Cow { .. }) => u64::from(src.memory_mb),
        },
    };
    let plan = plan(svc, &req, source)?;
    let (_guard, mut src) = svc.lock_instance(&src.id).await?;
    let started = Instant::now();
    if early::applies(&src, &req, &plan) {
        return early::fork_during_capture(svc, &mut src, &plan, started).await;
    }
    let mut base = base_of_instance(svc, &mut src, req.from_running).await?;
    base.snapshot_ms = started.elapsed().as_secs_f64() * 1000.0;
    svc.cfg.test_hooks.crash_point("fork:snapshot");
    let base = Arc::new(base);
    let results = fork_all(svc, &Origin::of(&base), &Gate::ready(&base), &plan, started).await;
    finish(svc, base);
    Ok(results)
}

/// After every fork of a request: a transient snapshot's files go (its base
/// stays while forks map it), and whatever nothing uses any more.
fn finish(svc: &Services, base: Arc<Base>) {
    if base.transient {
        base.paths.remove();
    }
    drop(base);
    svc.collect_unused();
}

/// Fork from a stored snapshot.
pub(crate) async fn fork_snapshot(
    svc: &Arc<Services>,
    id_or_name: &str,
    req: ForkRequest,
) -> Result<Vec<Result<Instance>>> {
    let snap = svc.find_snapshot(id_or_name)?;
    let source = Source {
        memory_mb: snap.memory_mb,
        network: snap.network.enabled,
        new_base_mb: 0,
    };
    let plan = plan(svc, &req, source)?;
    // A Standby instance's own snapshot is guarded by the instance lock.
    let _guard = svc
        .locks
        .acquire(snap.standby_of.as_deref().unwrap_or(&snap.id))
        .await;
    let snap = svc.find_snapshot(&snap.id)?;
    let base = Arc::new(Base {
        paths: svc.snapshot_paths(&snap.id),
        forked_from: snap.id.clone(),
        snap,
        transient: false,
        snapshot_ms: 0.0,
        pause_ms: None,
        _pin: None,
    });
    let started = Instant::now();
    Ok(fork_all(svc, &Origin::of(&base), &Gate::ready(&base), &plan, started).await)
}

/// What the forks' source brings to the plan.
struct Source {
    memory_mb: u32,
    network: bool,
    /// MiB a capture of a running source adds as a new base.
    new_base_mb: u64,
}

/// Step 1: names validated and free, the target state, and the capacity for
/// all of them.
fn plan(svc: &Services, req: &ForkRequest, src: Source) -> Result<Plan> {
    let names = match req.count {
        None => vec![req.name.clone()],
        Some(n) if (1..=MAX_FORK_COUNT).contains(&n) => {
            (1..=n).map(|i| format!("{}-{i}", req.name)).collect()
        }
        Some(n) => {
            return Err(CoreError::Invalid(format!(
                "count must be between 1 and {MAX_FORK_COUNT}, got {n}"
            )));
        }
    };
    for n in &names {
        crate::validate_name(n)?;
        if svc.store.find_instance(n)?.is_some() {
            return Err(CoreError::Conflict(format!(
                "an instance named {n:?} already exists"
            )));
        }
    }
    let target = match req.target_state.unwrap_or(InstanceState::Running) {
        s @ (InstanceState::Running | InstanceState::Standby | InstanceState::Stopped) => s,
        s => {
            return Err(CoreError::Invalid(format!(
                "target_state must be Running, Standby or Stopped, got {}",
                s.as_str()
            )));
        }
    };
    crate::model::validate_ports(&req.ports).map_err(CoreError::Invalid)?;
    if !req.ports.is_empty() && (req.count.is_some() || !src.network) {
        return Err(CoreError::Invalid(
            "ports can be published for a single fork (no count) of a networked source".into(),
        ));
    }
    let n = names.len() as u32;
    let reserved = capacity::reserve(
        svc,
        Demand {
            cow_vms: n * u32::from(target == InstanceState::Running),
            memory_mb: src.memory_mb,
            base_mb: src.new_base_mb,
            addresses: n * u32::from(src.network),
            ..Demand::default()
        },
    )?;
    Ok(Plan {
        names,
        target,
        wait: req.wait_for_network.unwrap_or(true),
        prefer: req.handoff.unwrap_or(HandoffPath::Mailbox),
        ports: req.ports.clone(),
        _reserved: reserved,
    })
}

/// Step 2 for an instance source.
async fn base_of_instance(svc: &Services, src: &mut Instance, from_running: bool) -> Result<Base> {
    let src_id = src.id.clone();
    let base = |snap: Snapshot, paths, transient| Base {
        snap,
        paths,
        transient,
        forked_from: src_id.clone(),
        snapshot_ms: 0.0,
        pause_ms: None,
        _pin: None,
    };
    match src.state {
        InstanceState::Running if from_running => {
            let c = capture(svc, src, None, CaptureMode::Copy).await?;
            transient_base(svc, c, src_id.clone())
        }
        InstanceState::Running => Err(CoreError::Conflict(format!(
            "instance {} is Running; set from_running to fork it while it runs, or put it in standby first",
            src.name
        ))),
        InstanceState::Standby => {
            let sid = src.snapshot_id.clone().ok_or_else(|| {
                CoreError::Internal(format!(
                    "instance {} is in Standby without a snapshot",
                    src.name
                ))
            })?;
            let snap = svc.find_snapshot(&sid)?;
            Ok(base(snap, svc.snapshot_paths(&sid), false))
        }
        s => Err(CoreError::Conflict(format!(
            "instance {} is {} and has no snapshot to fork from; start it (and fork with from_running) or restore it first",
            src.name,
            s.as_str()
        ))),
    }
}

/// The transient base of a capture for forks: the snapshot is never
/// recorded; the base is, pinned until the forks that map it are recorded
/// (a crash meanwhile leaves an unreferenced base, collected at start-up).
fn transient_base(svc: &Services, c: Captured, forked_from: String) -> Result<Base> {
    let pin = svc.pins.pin(&c.base.id);
    if !c.base_recorded {
        svc.store
            .insert_base(&c.base)
            .inspect_err(|_| c.discard(svc))?;
    }
    Ok(Base {
        snap: c.snap,
        paths: c.paths,
        transient: true,
        forked_from,
        snapshot_ms: 0.0,
        pause_ms: Some(c.pause_ms),
        _pin: Some(pin),
    })
}

/// Step 3 for every name, a few at a time, results in request order.
/// `started`: the request's start (each fork records how long it queued).
async fn fork_all(
    svc: &Arc<Services>,
    origin: &Origin,
    gate: &Gate,
    plan: &Plan,
    started: Instant,
) -> Vec<Result<Instance>> {
    let sem = tokio::sync::Semaphore::new(FORK_PARALLELISM);
    let jobs = plan.names.iter().map(|name| {
        let sem = &sem;
        async move {
            let _permit = sem.acquire().await;
            let span = info_span!("fork", fork = %name, source = %origin.forked_from);
            let mut rec = HandoffRecord::default();
            rec.record(Stage::Queued, started);
            gate.note(&mut rec);
            fork_one(svc, origin, gate, name, plan, rec)
                .instrument(span)
                .await
        }
    });
    futures::future::join_all(jobs).await
}

/// Step 3: one fork, all or nothing.
async fn fork_one(
    svc: &Arc<Services>,
    origin: &Origin,
    gate: &Gate,
    name: &str,
    plan: &Plan,
    mut rec: HandoffRecord,
) -> Result<Instance> {
    let t_total = Instant::now();
    let t = Instant::now();
    let mut inst = allocate(svc, origin, name, &plan.ports)?;
    rec.record(Stage::Allocate, t);
    svc.cfg.test_hooks.crash_point("fork:allocated");
    let _guard = svc.locks.acquire(&inst.id).await;
    if let Err(e) = land(svc, origin, gate, &mut inst, plan, &mut rec).await {
        warn!(fork = name, error = %e, "fork failed; cleaning up");
        if let Err(e) = teardown::remove_instance(svc, &inst).await {
            warn!(fork = name, error = %e, "removing the failed fork's record failed");
        }
        return Err(e);
    }
    rec.record(Stage::Total, t_total);
    // A background handoff reports its pipeline when it ends.
    if rec.path.is_some() || plan.target != InstanceState::Running {
        svc.store.observer().metrics.pipeline("fork", &rec);
    }
    if plan.target == InstanceState::Running {
        let total = rec.get(Stage::Total).unwrap_or_default();
        inst.handoff
            .get_or_insert_with(|| rec.clone())
            .set(Stage::Total, total);
        // A background handoff may have finished already and written the
        // record; don't overwrite its outcome.
        if plan.wait {
            svc.store.update_instance(&inst)?;
        }
    }
    info!(instance = %inst.id, ip = ?inst.network.ip, path = ?rec.path,
          stages = ?rec.stages_ms, "fork done");
    Ok(inst)
}

/// The fork's record and its lease (IPv4, MAC, TAP name).
fn allocate(
    svc: &Services,
    origin: &Origin,
    name: &str,
    ports: &[PublishedPort],
) -> Result<Instance> {
    let s = &origin.snap;
    let mut inst = Instance {
        env: s.env.clone(),
        entrypoint: s.entrypoint.clone(),
        workload: s.workload.clone(),
        // The source's egress setting is its workload's policy: kept.
        network: NetworkInfo {
            egress: s.network.egress,
            ..NetworkInfo::unassigned(s.network.enabled)
        },
        ports: ports.to_vec(),
        forked_from: Some(origin.forked_from.clone()),
        pending_handoff: s.network.enabled,
        cmdline: Some(s.cmdline.clone()),
        memory: Memory::Cow {
            base: s.base().to_string(),
        },
        ..Instance::created(
            new_id(),
            name.to_string(),
            s.image.clone(),
            s.vcpus,
            s.memory_mb,
            svc.now(),
        )
    };
    svc.store.insert_instance(&inst)?;
    let leased = (|| {
        if inst.network.enabled {
            let lease = svc.net.ensure_lease(&svc.store, &inst.id, None)?;
            inst.network = lease.info(svc.net.bridge(), inst.network.egress);
            svc.store.update_instance(&inst)?;
        }
        // Its own ports only (the request's); the source's stay the source's.
        svc.net.claim_ports(&svc.store, &inst.id, &inst.ports)
    })();
    if let Err(e) = leased {
        let _ = svc.net.release(&svc.store, &inst.id);
        let _ = svc.store.delete_instance(&inst.id);
        return Err(e);
    }
    Ok(inst)
}

/// Memory, then the target state.
async fn land(
    svc: &Arc<Services>,
    origin: &Origin,
    gate: &Gate,
    inst: &mut Instance,
    plan: &Plan,
    rec: &mut HandoffRecord,
) -> Result<()> {
    let t = Instant::now();
    prepare_memory(svc, inst)?;
    rec.record(Stage::MemoryPrepare, t);
    // Forks start early only from sources without a disk (`early`): a
    // disk's frozen layer is known here when it exists.
    if let Some(frozen) = origin.snap.disk_layer.as_deref() {
        let t = Instant::now();
        prepare_disk(svc, inst, frozen).await?;
        rec.record(Stage::DiskPrepare, t);
    }
    match plan.target {
        InstanceState::Stopped => park_stopped(svc, inst),
        InstanceState::Standby => park_standby(svc, &*gate.wait(rec).await?, inst),
        _ => run(svc, origin, gate, inst, plan, rec).await,
    }
}

/// The fork's memory is the base, mapped copy-on-write: nothing to copy,
/// only its directory to make.
fn prepare_memory(svc: &Services, inst: &Instance) -> Result<()> {
    svc.paths(inst).prepare()
}

/// The fork's writable disk: an empty layer of its own over the frozen one
/// captured with the memory (no copy, whatever the source wrote).
async fn prepare_disk(svc: &Services, inst: &mut Instance, frozen: &str) -> Result<()> {
    let size = crate::layers::size_of(svc, frozen)?;
    let (top, _pin) = crate::layers::new_top(svc, Some(frozen), size).await?;
    inst.disk_top = Some(top);
    svc.store.update_instance(inst)
}

/// A Running target: VMM → base ready → state → mailbox → resume →
/// handoff.
async fn run(
    svc: &Arc<Services>,
    origin: &Origin,
    gate: &Gate,
    inst: &mut Instance,
    plan: &Plan,
    rec: &mut HandoffRecord,
) -> Result<()> {
    gate.placed().await?;
    let vm = resume::start_waiting(svc, inst, rec, &origin.snap.cmdline).await?;
    let base = gate.wait(rec).await?;
    resume::load(svc, &vm, rec, &base.paths.state).await?;
    let snap = &base.snap;
    if !inst.pending_handoff {
        // No network to hand over: ready like a restore.
        resume::resume(svc, &vm, rec).await?;
        return resume::ready_same_identity(svc, inst).await;
    }
    let prepared = handoff::prepare(svc, inst, &vm, snap, plan.prefer, rec).await;
    let resumed_at = resume::resume(svc, &vm, rec).await?;
    if plan.wait {
        return handoff::complete(svc, inst, rec, prepared, resumed_at).await;
    }
    handoff::spawn_observer(svc.clone(), inst.clone(), rec.clone(), prepared, resumed_at);
    Ok(())
}

/// `target_state: Stopped`: keep the identity, boot fresh on start.
fn park_stopped(svc: &Services, inst: &mut Instance) -> Result<()> {
    inst.memory = Memory::Own;
    inst.to_stopped(None, svc.now());
    svc.store.update_instance(inst)
}

/// `target_state: Standby`: the fork gets its own snapshot of the base's
/// machine state (same base, no copy); its restore performs the handoff.
fn park_standby(svc: &Services, base: &Base, inst: &mut Instance) -> Result<()> {
    let snap = crate::snapshot::share(svc, &base.snap, |id| Snapshot {
        id,
        name: None,
        source_instance_id: inst.id.clone(),
        source_instance_name: inst.name.clone(),
        created_at: svc.now(),
        standby_of: Some(inst.id.clone()),
        base_id: Some(base.snap.base().to_string()),
        ..base.snap.clone()
    })?;
    inst.to_standby(snap.id, svc.now());
    svc.store.update_instance(inst)
}
