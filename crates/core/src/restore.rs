//! Restore: a Standby instance back to Running on its own address.
//!
//! memory back from the snapshot → TAP → VMM → state load → (a standby
//! fork: mailbox write) → resume → ready (agent + clock, or a fork's
//! handoff) → commit (snapshot consumed). A failure before the guest ran
//! returns the instance to Standby with nothing lost; after it, the
//! snapshot is spent and the instance is Stopped.

use crate::capacity::{self, Demand};
use crate::error::{CoreError, Result};
use crate::handoff;
use crate::model::{HandoffPath, HandoffRecord, Instance, InstanceState, Memory, Snapshot, Stage};
use crate::paths::SnapshotPaths;
use crate::services::Services;
use crate::{resume, teardown};
use std::time::Instant;
use tracing::{info, warn};

/// A restore that failed, and whether the guest ran before it did.
struct RestoreFailure {
    error: CoreError,
    guest_ran: bool,
}

pub(crate) async fn restore(svc: &Services, id_or_name: &str) -> Result<Instance> {
    let (_guard, mut inst) = svc.lock_instance(id_or_name).await?;
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
    let snap = svc.find_snapshot(&sid)?;
    let shared = crate::bases::shared_beyond(svc, snap.base(), &snap.id)?;
    let _reserved = capacity::reserve(
        svc,
        Demand {
            own_vms: u32::from(!shared),
            cow_vms: u32::from(shared),
            memory_mb: inst.memory_mb,
            ..Demand::default()
        },
    )?;
    let sp = svc.snapshot_paths(&sid);
    svc.paths(&inst).prepare()?;
    inst.memory = take_memory(svc, &inst, &snap, shared)?;
    let mut rec = HandoffRecord::default();
    let t = Instant::now();
    match bring_back(svc, &mut inst, &snap, &sp, &mut rec).await {
        Ok(()) => {
            rec.record(Stage::Total, t);
            svc.store.observer().metrics.pipeline("restore", &rec);
            inst.snapshot_id = None;
            if rec.path.is_some() {
                inst.handoff = Some(rec);
            }
            svc.store.update_instance(&inst)?;
            crate::snapshot::remove(svc, &sid);
            info!(instance = %inst.id, "instance restored");
            Ok(inst)
        }
        Err(f) if f.guest_ran => spent(svc, &inst, &sid, f.error).await,
        Err(f) => back_to_standby(svc, &inst, &snap, f.error).await,
    }
}

/// The restored VM's memory: the snapshot's base itself when nothing else
/// refers to it (renamed into the instance's own file, O(1)), else a
/// copy-on-write mapping of it — a base other VMs map never changes.
fn take_memory(svc: &Services, inst: &Instance, snap: &Snapshot, shared: bool) -> Result<Memory> {
    let base = snap.base();
    if shared {
        return Ok(Memory::Cow {
            base: base.to_string(),
        });
    }
    std::fs::rename(crate::bases::path(svc, base), svc.paths(inst).mem).map_err(CoreError::io(
        "moving guest memory out of the snapshot's base",
    ))?;
    Ok(Memory::Own)
}

async fn bring_back(
    svc: &Services,
    inst: &mut Instance,
    snap: &Snapshot,
    sp: &SnapshotPaths,
    rec: &mut HandoffRecord,
) -> std::result::Result<(), RestoreFailure> {
    let before = |error| RestoreFailure {
        error,
        guest_ran: false,
    };
    let vm = resume::start_paused(svc, inst, rec, &snap.cmdline, &sp.state)
        .await
        .map_err(before)?;
    // A standby fork still carries its source's identity: its restore is
    // its handoff.
    let prepared = match inst.pending_handoff {
        true => Some(handoff::prepare(svc, inst, &vm, snap, HandoffPath::Mailbox, rec).await),
        false => None,
    };
    let resumed_at = resume::resume(svc, &vm, rec).await.map_err(before)?;
    let after = |error| RestoreFailure {
        error,
        guest_ran: true,
    };
    match prepared {
        Some(p) => handoff::complete(svc, inst, rec, p, resumed_at)
            .await
            .map_err(after),
        None => resume::ready_same_identity(svc, inst).await.map_err(after),
    }
}

/// The guest ran after the snapshot was taken: its memory no longer matches
/// the saved device state, so the snapshot is spent. Stopped (a clean boot
/// on start) beats a standby that would resume into inconsistent memory.
async fn spent(svc: &Services, inst: &Instance, sid: &str, e: CoreError) -> Result<Instance> {
    warn!(instance = %inst.id, error = %e, "restore failed after resume; stopping");
    teardown::stop_vmm(svc, inst).await;
    crate::snapshot::remove(svc, sid);
    let mut back = svc.find(&inst.id)?;
    back.snapshot_id = None;
    back.to_stopped(
        Some(format!(
            "restore failed after the guest resumed (its standby snapshot is spent): {e}"
        )),
        svc.now(),
    );
    svc.store.update_instance(&back)?;
    Err(e)
}

/// Nothing ran: the memory goes back into the snapshot's base (if it was
/// taken), the instance back to Standby.
async fn back_to_standby(
    svc: &Services,
    inst: &Instance,
    snap: &Snapshot,
    e: CoreError,
) -> Result<Instance> {
    warn!(instance = %inst.id, error = %e, "restore failed; back to standby");
    teardown::stop_vmm_keep_memory(svc, inst).await;
    if inst.memory == Memory::Own {
        let _ = std::fs::rename(svc.paths(inst).mem, crate::bases::path(svc, snap.base()));
    }
    let mut back = svc.find(&inst.id)?;
    back.back_to_standby(e.to_string());
    svc.store.update_instance(&back)?;
    Err(e)
}
