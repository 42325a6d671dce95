//! Snapshots, standby/restore and the fork flow.
//!
//! A fork reads as orchestration, one named step each:
//!
//! 1. [`Manager::base_snapshot`] — the source's memory and device state: a
//!    Standby source's own snapshot, a stored snapshot, or a transient one
//!    captured from a Running source (paused only for the capture).
//! 2. per fork, [`Manager::fork_one`]: `allocate` the identity (record, IP,
//!    MAC, TAP) → `prepare_memory` (sparse copy of the base) → `resume_from`
//!    (VMM start with `-incoming`, state load, resume) → `handoff` (the new
//!    identity reaches the guest, see [`crate::handoff`]).
//! 3. a transient snapshot is removed once every fork has its memory.
//!
//! A fork that fails leaves nothing behind: its VMM, TAP, allocations, files
//! and record are removed and its slot in the result carries the error.

use crate::error::{CoreError, Result};
use crate::handoff::{Handoff, MailboxHandoff};
use crate::manager::{Manager, new_id};
use crate::memory::{allocated_bytes, sparse_copy};
use crate::model::*;
use chrono::Utc;
use forkvm_vmm::Hypervisor;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{Instrument, info, info_span, warn};

/// Most forks restored at the same time (QEMU start-up is CPU-bound).
const FORK_PARALLELISM: usize = 2;
/// Most forks in one request.
pub const MAX_FORK_COUNT: u32 = 64;

/// Where a snapshot's files live.
pub(crate) struct SnapshotPaths {
    pub dir: PathBuf,
    /// Device state written by QEMU's migration.
    pub state: PathBuf,
    /// Immutable copy of guest memory (on the tmpfs memory directory).
    pub mem: PathBuf,
}

/// How [`Manager::resume_from`] brings a VM back from a snapshot.
pub(crate) struct ResumePlan<'a> {
    /// Kernel command line the snapshot's guest booted with.
    pub cmdline: &'a str,
    /// Device state file to load.
    pub state: &'a Path,
    /// The snapshot's armed mailbox, if any.
    pub mailbox: Option<&'a MailboxInfo>,
    /// Fastest handoff path to try.
    pub prefer: HandoffPath,
    /// false: return after resume, finish the handoff in the background.
    pub wait: bool,
}

/// What every fork of one request shares.
struct ForkSpec<'a> {
    target: InstanceState,
    wait: bool,
    prefer: HandoffPath,
    forked_from: &'a str,
    /// Source pause for the capture, reported in every fork's record.
    snapshot_ms: f64,
}

/// The snapshot a fork starts from, and whether it only lives for this call.
struct Base {
    snap: Snapshot,
    paths: SnapshotPaths,
    transient: bool,
}

impl Manager {
    pub(crate) fn snapshot_paths(&self, sid: &str) -> SnapshotPaths {
        let dir = self.cfg.data_dir.join("snapshots").join(sid);
        SnapshotPaths {
            state: dir.join("state.bin"),
            mem: self
                .cfg
                .mem_dir
                .join("snapshots")
                .join(format!("{sid}.mem")),
            dir,
        }
    }

    /// Remove a snapshot's files and record (no checks).
    pub(crate) fn remove_snapshot(&self, sid: &str) {
        let p = self.snapshot_paths(sid);
        let _ = std::fs::remove_file(&p.mem);
        let _ = std::fs::remove_dir_all(&p.dir);
        if let Err(e) = self.store.delete_snapshot(sid) {
            warn!(snapshot = sid, error = %e, "deleting snapshot record failed");
        }
    }

    /// Pause a Running VM and write its device state, then either copy its
    /// memory and resume it, or (standby) leave it paused for
    /// [`Manager::finish_standby`], which stops it and moves its memory file
    /// into the snapshot once the standby is recorded. Any failure resumes
    /// the VM.
    async fn capture(
        &self,
        inst: &Instance,
        name: Option<String>,
        standby: bool,
    ) -> Result<(Snapshot, SnapshotPaths)> {
        let pid = inst
            .pid
            .ok_or_else(|| CoreError::Conflict(format!("instance {} has no VMM", inst.name)))?;
        let ip = self.paths(&inst.id);
        let h = ip.handle(&inst.id, pid);
        let sid = new_id();
        let sp = self.snapshot_paths(&sid);
        for d in [&sp.dir, &self.cfg.mem_dir.join("snapshots")] {
            std::fs::create_dir_all(d)
                .map_err(|e| CoreError::internal(&format!("create {}", d.display()), e))?;
        }
        // The agent re-arms with a new marker after every handoff: ask for
        // the current one before pausing (no mailbox if it doesn't answer).
        let mailbox = self.current_mailbox(inst).await;
        let t = Instant::now();
        self.hv
            .pause(&h)
            .await
            .map_err(|e| CoreError::internal("pausing the VM", e))?;
        let captured = async {
            self.hv
                .save_state(&h, &sp.state)
                .await
                .map_err(|e| CoreError::internal("saving device state", e))?;
            if !standby {
                let (src, dst) = (ip.mem.clone(), sp.mem.clone());
                tokio::task::spawn_blocking(move || sparse_copy(&src, &dst))
                    .await
                    .map_err(|e| CoreError::internal("memory copy task", e))?
                    .map_err(|e| CoreError::internal("copying guest memory", e))?;
            }
            Ok(())
        }
        .await;
        if !standby || captured.is_err() {
            // The source keeps running whatever happened to the capture.
            if let Err(e) = self.hv.resume(&h).await {
                warn!(instance = %inst.id, error = %e, "resuming the source after capture failed");
            }
        }
        if let Err(e) = captured {
            let _ = std::fs::remove_file(&sp.mem);
            let _ = std::fs::remove_dir_all(&sp.dir);
            return Err(e);
        }
        let snap = Snapshot {
            id: sid,
            name,
            source_instance_id: inst.id.clone(),
            source_instance_name: inst.name.clone(),
            created_at: Utc::now(),
            image: inst.image.clone(),
            vcpus: inst.vcpus,
            memory_mb: inst.memory_mb,
            env: inst.env.clone(),
            entrypoint: inst.entrypoint.clone(),
            cmdline: inst.cmdline.clone().unwrap_or_default(),
            network: inst.network.clone(),
            size_bytes: allocated_bytes(&sp.mem) + allocated_bytes(&sp.state),
            standby_of: standby.then(|| inst.id.clone()),
            mailbox,
        };
        info!(instance = %inst.id, snapshot = %snap.id, standby,
              pause_ms = t.elapsed().as_secs_f64() * 1000.0, size_bytes = snap.size_bytes,
              "snapshot captured");
        Ok((snap, sp))
    }

    async fn current_mailbox(&self, inst: &Instance) -> Option<MailboxInfo> {
        let r = self
            .agents
            .call(
                &inst.id,
                &self.paths(&inst.id).agent_socket,
                "Health",
                crate::agent::CallPolicy::within(Duration::from_secs(3), Duration::from_secs(2)),
                |mut c| async move { c.health(forkvm_proto::agent::HealthRequest {}).await },
            )
            .await;
        match r {
            Ok(h) => mailbox_of(&h),
            Err(e) => {
                warn!(instance = %inst.id, error = %e, "no mailbox info for the snapshot");
                None
            }
        }
    }

    /// Stop the VMM and drop the TAP, leaving the memory file in place.
    async fn teardown_vm_keep_memory(&self, inst: &Instance) {
        let p = self.paths(&inst.id);
        let keep = p.mem.with_extension("keep");
        let _ = std::fs::rename(&p.mem, &keep);
        self.teardown_vm(inst).await;
        let _ = std::fs::rename(&keep, &p.mem);
    }

    pub(crate) async fn standby_impl(&self, id_or_name: &str) -> Result<Instance> {
        let inst = self.find(id_or_name)?;
        let lock = self.lock_for(&inst.id);
        let _g = lock.lock().await;
        let mut inst = self.find(&inst.id)?;
        match inst.state {
            InstanceState::Running => {}
            InstanceState::Standby => return Ok(inst),
            s => {
                return Err(CoreError::Conflict(format!(
                    "instance {} is {}; only a Running instance can go to Standby",
                    inst.name,
                    s.as_str()
                )));
            }
        }
        let (snap, _) = self.capture(&inst, None, true).await?;
        // The commit point: snapshot record and Standby state in one
        // transaction, while the paused VM and its memory file still exist.
        // A crash before it leaves a paused Running VM (adoption resumes
        // it); after it, adoption finishes the standby.
        inst.snapshot_id = Some(snap.id.clone());
        inst.state = InstanceState::Standby;
        inst.stopped_at = Some(Utc::now());
        if let Err(e) = self.store.commit_standby(&snap, &inst) {
            self.abandon_standby_capture(&inst, &snap.id).await;
            return Err(e);
        }
        crash_point("standby:committed");
        self.finish_standby(&mut inst).await?;
        info!(instance = %inst.id, snapshot = %snap.id, "instance in standby");
        Ok(inst)
    }

    /// The recorded standby's second half: stop the VMM (keeping the memory
    /// file) and move the memory into the snapshot. Idempotent, so adoption
    /// can finish a standby the daemon died in.
    pub(crate) async fn finish_standby(&self, inst: &mut Instance) -> Result<()> {
        let Some(sid) = inst.snapshot_id.clone() else {
            return Ok(());
        };
        let ip = self.paths(&inst.id);
        let sp = self.snapshot_paths(&sid);
        self.teardown_vm_keep_memory(inst).await;
        if ip.mem.exists() {
            std::fs::rename(&ip.mem, &sp.mem)
                .map_err(|e| CoreError::internal("moving guest memory into the snapshot", e))?;
        }
        if inst.pid.take().is_some() {
            // The TAP is gone with the VMM; the record keeps the claim.
            self.store.update_instance(inst)?;
        }
        Ok(())
    }

    /// A standby capture that could not be recorded: the VM runs on.
    async fn abandon_standby_capture(&self, inst: &Instance, sid: &str) {
        if let Some(pid) = inst.pid {
            let h = self.paths(&inst.id).handle(&inst.id, pid);
            if let Err(e) = self.hv.resume(&h).await {
                warn!(instance = %inst.id, error = %e, "resuming after a failed standby failed");
            }
        }
        self.remove_snapshot(sid);
    }

    pub(crate) async fn restore_impl(&self, id_or_name: &str) -> Result<Instance> {
        let inst = self.find(id_or_name)?;
        let lock = self.lock_for(&inst.id);
        let _g = lock.lock().await;
        let mut inst = self.find(&inst.id)?;
        if inst.state == InstanceState::Running {
            return Ok(inst);
        }
        let Some(sid) = inst
            .snapshot_id
            .clone()
            .filter(|_| inst.state == InstanceState::Standby)
        else {
            return Err(CoreError::Conflict(format!(
                "instance {} is {}; only a Standby instance can be restored",
                inst.name,
                inst.state.as_str()
            )));
        };
        let snap = self.get_snapshot(&sid).await?;
        self.check_capacity(1, inst.memory_mb, 0)?;
        let sp = self.snapshot_paths(&sid);
        let ip = self.paths(&inst.id);
        ip.prepare()?;
        // The snapshot's memory becomes the instance's again (same tmpfs).
        std::fs::rename(&sp.mem, &ip.mem)
            .map_err(|e| CoreError::internal("moving guest memory out of the snapshot", e))?;
        let mut rec = HandoffRecord::default();
        let t = Instant::now();
        match self
            .resume_from(
                &mut inst,
                &mut rec,
                ResumePlan {
                    cmdline: &snap.cmdline,
                    state: &sp.state,
                    mailbox: snap.mailbox.as_ref(),
                    prefer: HandoffPath::Mailbox,
                    wait: true,
                },
            )
            .await
        {
            Ok(()) => {
                rec.stage("total", t);
                inst.snapshot_id = None;
                if rec.path.is_some() {
                    inst.handoff = Some(rec);
                }
                self.store.update_instance(&inst)?;
                self.remove_snapshot(&sid);
                info!(instance = %inst.id, "instance restored");
                Ok(inst)
            }
            Err(e) if rec.stages_ms.contains_key("resume") => {
                // The guest ran after the snapshot was taken: its memory no
                // longer matches the saved device state, so the snapshot is
                // spent. Stopped (a clean boot on start) beats a standby
                // that would resume into inconsistent memory.
                warn!(instance = %inst.id, error = %e, "restore failed after resume; stopping");
                self.teardown_vm(&inst).await;
                self.remove_snapshot(&sid);
                let mut back = self.find(&inst.id)?;
                back.state = InstanceState::Stopped;
                back.pid = None;
                back.snapshot_id = None;
                back.stopped_at = Some(Utc::now());
                back.state_error = Some(format!(
                    "restore failed after the guest resumed (its standby snapshot is spent): {e}"
                ));
                self.store.update_instance(&back)?;
                Err(e)
            }
            Err(e) => {
                warn!(instance = %inst.id, error = %e, "restore failed; back to standby");
                self.teardown_vm_keep_memory(&inst).await;
                let _ = std::fs::rename(&ip.mem, &sp.mem);
                let mut back = self.find(&inst.id)?;
                back.state = InstanceState::Standby;
                back.pid = None;
                back.state_error = Some(e.to_string());
                self.store.update_instance(&back)?;
                Err(e)
            }
        }
    }

    /// Start a VMM that loads `state` over the instance's memory file, resume
    /// it, and make it ready: the handoff when the guest still carries another
    /// identity, else the agent's Health. With `wait` false the handoff runs
    /// in the background and the instance is returned Initializing.
    pub(crate) async fn resume_from(
        &self,
        inst: &mut Instance,
        rec: &mut HandoffRecord,
        plan: ResumePlan<'_>,
    ) -> Result<()> {
        let ResumePlan {
            cmdline,
            state,
            mailbox,
            prefer,
            wait,
        } = plan;
        let t = Instant::now();
        if inst.network.enabled {
            let lease = self
                .net
                .ensure_lease(&self.store, &inst.id, Some(&inst.network.clone()))
                .await?;
            inst.network = lease.info(&self.cfg.bridge);
            self.net.create_tap(&lease).await?;
        }
        self.store.update_instance(inst)?;
        rec.stage("allocate_tap", t);

        // Guest-initiated handoff: the identity goes into the fork's memory
        // before its VMM exists.
        let mailbox = match mailbox {
            _ if prefer != HandoffPath::Mailbox && inst.pending_handoff => None,
            Some(info) if inst.pending_handoff && inst.network.enabled => {
                let t = Instant::now();
                let mb = MailboxHandoff::prepare(self, inst, info);
                rec.stage("mailbox_prepare", t);
                Some(mb)
            }
            None if inst.pending_handoff && inst.network.enabled => {
                Some(Err("the snapshot has no armed mailbox".to_string()))
            }
            _ => None,
        };

        let image = self.load_image(&inst.image)?;
        let spec = self.vm_spec(inst, &image, cmdline, true);
        let t = Instant::now();
        let h = self
            .hv
            .start(&spec)
            .await
            .map_err(|e| CoreError::Internal(format!("starting QEMU: {e}")))?;
        rec.stage("vmm_start", t);
        crash_point("fork:vmm_started");
        inst.pid = Some(h.pid);
        inst.accel = Some(format!("{:?}", self.accel).to_lowercase());
        inst.state = InstanceState::Initializing;
        inst.started_at = Some(Utc::now());
        inst.stopped_at = None;
        inst.cmdline = Some(cmdline.to_string());
        self.store.update_instance(inst)?;

        let t = Instant::now();
        self.hv
            .load_state(&h, state)
            .await
            .map_err(|e| CoreError::Internal(format!("loading the snapshot: {e}")))?;
        rec.stage("state_load", t);
        vmm_kill_point("resume:state_loaded", h.pid);
        let t = Instant::now();
        self.hv
            .resume(&h)
            .await
            .map_err(|e| CoreError::Internal(format!("resuming: {e}")))?;
        rec.stage("resume", t);
        crash_point("resume:resumed");
        let resumed_at = Instant::now();

        if !inst.pending_handoff {
            // A plain restore: the guest keeps its identity; ready when the
            // agent answers on the new channel.
            let health = self.wait_agent(inst, self.handoff_timeout).await?;
            inst.mailbox = mailbox_of(&health);
            self.set_clock(inst).await;
            inst.state = InstanceState::Running;
            self.store.update_instance(inst)?;
            return Ok(());
        }
        if !wait {
            let me = self
                .me
                .upgrade()
                .ok_or_else(|| CoreError::Internal("manager shutting down".into()))?;
            let (mut bg_inst, mut bg_rec) = (inst.clone(), rec.clone());
            let span = tracing::Span::current();
            tokio::spawn(
                async move {
                    me.finish_handoff_in_background(
                        &mut bg_inst,
                        &mut bg_rec,
                        resumed_at,
                        mailbox,
                        prefer,
                    )
                    .await
                }
                .instrument(span),
            );
            return Ok(());
        }
        self.complete_handoff(inst, rec, resumed_at, mailbox, prefer)
            .await
    }

    /// The new identity reaches the guest; the fork is Running after it.
    pub(crate) async fn complete_handoff(
        &self,
        inst: &mut Instance,
        rec: &mut HandoffRecord,
        resumed_at: Instant,
        mailbox: Option<std::result::Result<MailboxHandoff, String>>,
        prefer: HandoffPath,
    ) -> Result<()> {
        crash_point("fork:handoff");
        let (id, pid) = (inst.id.clone(), inst.pid);
        // A guest that dies mid-handoff fails the fork now, not at the deadline.
        let handoff = Handoff::new(self, inst).prefer(prefer);
        let path = tokio::select! {
            r = handoff.run(rec, mailbox) => r?,
            e = self.vmm_exit(&id, pid, "during the network handoff") => return Err(e),
        };
        rec.stage("network_ready", resumed_at);
        if path != HandoffPath::Mailbox {
            // The mailbox payload carries the host clock; the other paths don't.
            self.set_clock(inst).await;
        }
        inst.pending_handoff = false;
        inst.state = InstanceState::Running;
        inst.handoff = Some(rec.clone());
        self.store.update_instance(inst)?;
        Ok(())
    }

    /// Owner of a `wait_for_network: false` handoff: its outcome lands on the
    /// instance (Running, or Stopped with the error and everything released).
    async fn finish_handoff_in_background(
        &self,
        inst: &mut Instance,
        rec: &mut HandoffRecord,
        resumed_at: Instant,
        mailbox: Option<std::result::Result<MailboxHandoff, String>>,
        prefer: HandoffPath,
    ) {
        let lock = self.lock_for(&inst.id);
        let _g = lock.lock().await;
        // The instance may have been deleted meanwhile.
        if self.find(&inst.id).is_err() {
            return;
        }
        match self
            .complete_handoff(inst, rec, resumed_at, mailbox, prefer)
            .await
        {
            Ok(()) => info!(instance = %inst.id, path = ?rec.path, "background handoff done"),
            Err(e) => {
                warn!(instance = %inst.id, error = %e, "background handoff failed; stopping the fork");
                rec.error = Some(e.to_string());
                self.teardown_vm(inst).await;
                let _ = self.net.release(&self.store, &inst.id);
                self.paths(&inst.id).remove_runtime();
                inst.state = InstanceState::Stopped;
                inst.state_error = Some(format!("network handoff failed: {e}"));
                inst.pid = None;
                inst.network.ip = None;
                inst.network.tap = None;
                inst.network.mac = None;
                inst.pending_handoff = false;
                inst.handoff = Some(rec.clone());
                inst.stopped_at = Some(Utc::now());
                let _ = self.store.update_instance(inst);
            }
        }
    }

    /// Step the guest clock to the host's (a restored guest resumes at
    /// snapshot time). Best effort: a guest without the RPC keeps running.
    async fn set_clock(&self, inst: &Instance) {
        let now = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let r = self
            .agents
            .call(
                &inst.id,
                &self.paths(&inst.id).agent_socket,
                "SetClock",
                crate::agent::CallPolicy::within(Duration::from_secs(5), Duration::from_secs(2)),
                |mut c| async move {
                    c.set_clock(forkvm_proto::agent::SetClockRequest { unix_time_ns: now })
                        .await
                },
            )
            .await;
        if let Err(e) = r {
            warn!(instance = %inst.id, error = %e, "setting the guest clock failed");
        }
    }

    /// Names the request asks for, validated, and none taken.
    fn fork_names(&self, req: &ForkRequest) -> Result<Vec<String>> {
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
            if self.store.find_instance(n)?.is_some() {
                return Err(CoreError::Conflict(format!(
                    "an instance named {n:?} already exists"
                )));
            }
        }
        Ok(names)
    }

    /// `n` forks need addresses, and memory when they will run.
    fn check_fork_capacity(
        &self,
        n: usize,
        target: InstanceState,
        memory_mb: u32,
        network: bool,
    ) -> Result<()> {
        let n = n as u32;
        let running = u32::from(target == InstanceState::Running);
        self.check_capacity(running * n, memory_mb, u32::from(network) * n)
    }

    fn fork_target(req: &ForkRequest) -> Result<InstanceState> {
        match req.target_state.unwrap_or(InstanceState::Running) {
            s @ (InstanceState::Running | InstanceState::Standby | InstanceState::Stopped) => Ok(s),
            s => Err(CoreError::Invalid(format!(
                "target_state must be Running, Standby or Stopped, got {}",
                s.as_str()
            ))),
        }
    }

    pub(crate) async fn fork_instance_impl(
        &self,
        id_or_name: &str,
        req: ForkRequest,
    ) -> Result<Vec<Result<Instance>>> {
        let src = self.find(id_or_name)?;
        let names = self.fork_names(&req)?;
        let target = Self::fork_target(&req)?;
        self.check_fork_capacity(names.len(), target, src.memory_mb, src.network.enabled)?;
        let lock = self.lock_for(&src.id);
        let _g = lock.lock().await;
        let src = self.find(&src.id)?;
        let t = Instant::now();
        let base = self.base_snapshot(&src, req.from_running).await?;
        crash_point("fork:snapshot");
        let snapshot_ms = t.elapsed().as_secs_f64() * 1000.0;
        let results = self
            .fork_all(&base, &names, target, &req, &src.id, snapshot_ms)
            .await;
        if base.transient {
            self.remove_snapshot(&base.snap.id);
        }
        Ok(results)
    }

    /// Step 1: the snapshot forks start from.
    async fn base_snapshot(&self, src: &Instance, from_running: bool) -> Result<Base> {
        match src.state {
            InstanceState::Running if from_running => {
                let (snap, paths) = self.capture(src, None, false).await?;
                Ok(Base {
                    snap,
                    paths,
                    transient: true,
                })
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
                let snap = self.get_snapshot(&sid).await?;
                Ok(Base {
                    paths: self.snapshot_paths(&sid),
                    snap,
                    transient: false,
                })
            }
            s => Err(CoreError::Conflict(format!(
                "instance {} is {} and has no snapshot to fork from; start it (and fork with from_running) or restore it first",
                src.name,
                s.as_str()
            ))),
        }
    }

    /// Step 2 for every name, a few at a time, in request order.
    async fn fork_all(
        &self,
        base: &Base,
        names: &[String],
        target: InstanceState,
        req: &ForkRequest,
        forked_from: &str,
        snapshot_ms: f64,
    ) -> Vec<Result<Instance>> {
        let sem = tokio::sync::Semaphore::new(FORK_PARALLELISM);
        let spec = ForkSpec {
            target,
            wait: req.wait_for_network.unwrap_or(true),
            prefer: req.handoff.unwrap_or(HandoffPath::Mailbox),
            forked_from,
            snapshot_ms,
        };
        let jobs = names.iter().map(|name| {
            let (sem, spec) = (&sem, &spec);
            async move {
                let _permit = sem.acquire().await;
                let span = info_span!("fork", fork = %name, source = %forked_from);
                self.fork_one(base, name, spec).instrument(span).await
            }
        });
        futures::future::join_all(jobs).await
    }

    /// Step 2: one fork, all or nothing.
    async fn fork_one(&self, base: &Base, name: &str, spec: &ForkSpec<'_>) -> Result<Instance> {
        let target = spec.target;
        let t_total = Instant::now();
        let mut rec = HandoffRecord::default();
        rec.stages_ms.insert("snapshot".into(), spec.snapshot_ms);
        let t = Instant::now();
        let mut inst = self.allocate_fork(base, name, spec.forked_from).await?;
        rec.stage("allocate", t);
        crash_point("fork:allocated");
        let lock = self.lock_for(&inst.id);
        let _g = lock.lock().await;
        let outcome = async {
            let t = Instant::now();
            self.prepare_memory(base, &inst).await?;
            rec.stage("memory_prepare", t);
            match target {
                InstanceState::Stopped => self.park_stopped(&mut inst),
                InstanceState::Standby => self.park_standby(base, &mut inst),
                _ => {
                    let plan = ResumePlan {
                        cmdline: &base.snap.cmdline,
                        state: &base.paths.state,
                        mailbox: base.snap.mailbox.as_ref(),
                        prefer: spec.prefer,
                        wait: spec.wait,
                    };
                    self.resume_from(&mut inst, &mut rec, plan).await
                }
            }
        }
        .await;
        match outcome {
            Ok(()) => {
                rec.stage("total", t_total);
                if target == InstanceState::Running {
                    if inst.handoff.is_none() {
                        inst.handoff = Some(rec.clone());
                    }
                    if let Some(h) = inst.handoff.as_mut() {
                        h.stages_ms.insert("total".into(), rec.stages_ms["total"]);
                    }
                    // A background handoff may have finished already and
                    // written the record; don't overwrite its outcome.
                    if spec.wait {
                        self.store.update_instance(&inst)?;
                    }
                }
                info!(instance = %inst.id, ip = ?inst.network.ip, path = ?rec.path,
                      stages = ?rec.stages_ms, "fork done");
                Ok(inst)
            }
            Err(e) => {
                warn!(fork = name, error = %e, "fork failed; cleaning up");
                self.teardown(&inst).await;
                let _ = self.store.delete_instance(&inst.id);
                Err(e)
            }
        }
    }

    /// The fork's record and network identity.
    async fn allocate_fork(&self, base: &Base, name: &str, forked_from: &str) -> Result<Instance> {
        let s = &base.snap;
        let mut inst = Instance {
            env: s.env.clone(),
            entrypoint: s.entrypoint.clone(),
            network: NetworkInfo::unassigned(s.network.enabled),
            forked_from: Some(forked_from.to_string()),
            pending_handoff: s.network.enabled,
            cmdline: Some(s.cmdline.clone()),
            ..Instance::created(
                new_id(),
                name.to_string(),
                s.image.clone(),
                s.vcpus,
                s.memory_mb,
            )
        };
        self.store.insert_instance(&inst)?;
        if inst.network.enabled {
            match self.net.ensure_lease(&self.store, &inst.id, None).await {
                Ok(lease) => inst.network = lease.info(&self.cfg.bridge),
                Err(e) => {
                    let _ = self.store.delete_instance(&inst.id);
                    return Err(e);
                }
            }
            self.store.update_instance(&inst)?;
        }
        Ok(inst)
    }

    /// The fork's own copy of the base memory.
    async fn prepare_memory(&self, base: &Base, inst: &Instance) -> Result<()> {
        let paths = self.paths(&inst.id);
        paths.prepare()?;
        let (src, dst) = (base.paths.mem.clone(), paths.mem.clone());
        tokio::task::spawn_blocking(move || sparse_copy(&src, &dst))
            .await
            .map_err(|e| CoreError::internal("memory copy task", e))?
            .map_err(|e| CoreError::internal("copying guest memory", e))?;
        Ok(())
    }

    /// `target_state: Stopped`: keep the identity, boot fresh on start.
    fn park_stopped(&self, inst: &mut Instance) -> Result<()> {
        let _ = std::fs::remove_file(&self.paths(&inst.id).mem);
        inst.pending_handoff = false;
        inst.state = InstanceState::Stopped;
        inst.stopped_at = Some(Utc::now());
        self.store.update_instance(inst)
    }

    /// `target_state: Standby`: the fork gets its own snapshot; its restore
    /// performs the handoff.
    fn park_standby(&self, base: &Base, inst: &mut Instance) -> Result<()> {
        let sid = new_id();
        let sp = self.snapshot_paths(&sid);
        std::fs::create_dir_all(&sp.dir).map_err(|e| CoreError::internal("snapshot dir", e))?;
        std::fs::copy(&base.paths.state, &sp.state)
            .map_err(|e| CoreError::internal("copying device state", e))?;
        std::fs::rename(self.paths(&inst.id).mem, &sp.mem)
            .map_err(|e| CoreError::internal("moving memory into the snapshot", e))?;
        let snap = Snapshot {
            id: sid.clone(),
            name: None,
            source_instance_id: inst.id.clone(),
            source_instance_name: inst.name.clone(),
            created_at: Utc::now(),
            size_bytes: allocated_bytes(&sp.mem) + allocated_bytes(&sp.state),
            standby_of: Some(inst.id.clone()),
            ..base.snap.clone()
        };
        self.store.insert_snapshot(&snap)?;
        inst.snapshot_id = Some(sid);
        inst.state = InstanceState::Standby;
        self.store.update_instance(inst)
    }

    pub(crate) async fn fork_snapshot_impl(
        &self,
        id_or_name: &str,
        req: ForkRequest,
    ) -> Result<Vec<Result<Instance>>> {
        let snap = self.get_snapshot(id_or_name).await?;
        let names = self.fork_names(&req)?;
        let target = Self::fork_target(&req)?;
        self.check_fork_capacity(names.len(), target, snap.memory_mb, snap.network.enabled)?;
        // A Standby instance's own snapshot is guarded by the instance lock.
        let lock = self.lock_for(snap.standby_of.as_deref().unwrap_or(&snap.id));
        let _g = lock.lock().await;
        let snap = self.get_snapshot(&snap.id).await?;
        let base = Base {
            paths: self.snapshot_paths(&snap.id),
            snap,
            transient: false,
        };
        let id = base.snap.id.clone();
        Ok(self.fork_all(&base, &names, target, &req, &id, 0.0).await)
    }

    pub(crate) async fn create_snapshot_impl(
        &self,
        id_or_name: &str,
        name: Option<String>,
    ) -> Result<Snapshot> {
        if let Some(n) = &name {
            crate::validate_name(n)?;
            if self.store.find_snapshot(n)?.is_some() {
                return Err(CoreError::Conflict(format!(
                    "a snapshot named {n:?} already exists"
                )));
            }
        }
        let inst = self.find(id_or_name)?;
        let lock = self.lock_for(&inst.id);
        let _g = lock.lock().await;
        let inst = self.find(&inst.id)?;
        match inst.state {
            InstanceState::Running => {
                let (snap, _) = self.capture(&inst, name, false).await?;
                self.store.insert_snapshot(&snap)?;
                Ok(snap)
            }
            InstanceState::Standby => {
                let own = self
                    .get_snapshot(inst.snapshot_id.as_deref().unwrap_or_default())
                    .await?;
                let from = self.snapshot_paths(&own.id);
                let sid = new_id();
                let sp = self.snapshot_paths(&sid);
                std::fs::create_dir_all(&sp.dir)
                    .map_err(|e| CoreError::internal("snapshot dir", e))?;
                std::fs::copy(&from.state, &sp.state)
                    .map_err(|e| CoreError::internal("copying device state", e))?;
                let (src, dst) = (from.mem.clone(), sp.mem.clone());
                tokio::task::spawn_blocking(move || sparse_copy(&src, &dst))
                    .await
                    .map_err(|e| CoreError::internal("memory copy task", e))?
                    .map_err(|e| CoreError::internal("copying guest memory", e))?;
                let snap = Snapshot {
                    id: sid,
                    name,
                    created_at: Utc::now(),
                    size_bytes: allocated_bytes(&sp.mem) + allocated_bytes(&sp.state),
                    standby_of: None,
                    ..own
                };
                self.store.insert_snapshot(&snap)?;
                Ok(snap)
            }
            s => Err(CoreError::Conflict(format!(
                "instance {} is {}; only Running or Standby instances can be snapshotted",
                inst.name,
                s.as_str()
            ))),
        }
    }

    pub(crate) async fn delete_snapshot_impl(&self, id_or_name: &str) -> Result<()> {
        let snap = self.get_snapshot(id_or_name).await?;
        if let Some(owner) = &snap.standby_of {
            return Err(CoreError::Conflict(format!(
                "snapshot {} holds Standby instance {owner}; restore or delete the instance instead",
                snap.id
            )));
        }
        let lock = self.lock_for(&snap.id);
        let _g = lock.lock().await;
        self.remove_snapshot(&snap.id);
        Ok(())
    }
}

/// The armed mailbox an agent reports in Health, if any.
pub(crate) fn mailbox_of(h: &forkvm_proto::agent::HealthResponse) -> Option<MailboxInfo> {
    (h.mailbox_marker.len() == 16).then(|| MailboxInfo {
        marker: hex::encode(&h.mailbox_marker),
        gpa: h.mailbox_gpa,
    })
}

/// Test hook: `FORKVM_TEST_CRASH_AT=<point>` makes the daemon SIGKILL itself
/// there, to prove a restart converges (crash-consistency tests).
pub(crate) fn crash_point(point: &str) {
    if std::env::var("FORKVM_TEST_CRASH_AT").as_deref() == Ok(point) {
        tracing::error!(point, "test crash point reached: killing the daemon");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Test hook: `FORKVM_TEST_KILL_VMM_AT=<point>` SIGKILLs the VMM being
/// resumed there (QEMU dying mid-restore), to prove the operation fails
/// cleanly and loses nothing.
pub(crate) fn vmm_kill_point(point: &str, pid: u32) {
    if std::env::var("FORKVM_TEST_KILL_VMM_AT").as_deref() == Ok(point) {
        tracing::error!(point, pid, "test hook: killing the VMM");
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
