//! Restore an instance in place to one of its own snapshots (hypeman's
//! `snapshots.restore`): its current VM goes, and it runs on from the
//! snapshot's memory, device state and disks with its own id, name and
//! address. The snapshot is not consumed — its memory is mapped
//! copy-on-write, its frozen disk layer gets a fresh writable top — so an
//! instance can go back to the same snapshot again and again (and forks of
//! it keep working).
//!
//! stop the VM → reserve → disk top → TAP → VMM → state load → resume →
//! agent + clock → Running. A failure after the old VM went leaves the
//! instance Stopped with the error (its identity kept; `start` boots it).

use crate::capacity::{self, Demand};
use crate::error::{CoreError, Result};
use crate::model::{HandoffRecord, Instance, InstanceState, Memory, Snapshot, Stage};
use crate::services::Services;
use crate::{resume, teardown};
use std::time::Instant;
use tracing::{info, warn};

fn check(inst: &Instance, snap: &Snapshot) -> Result<()> {
    if snap.source_instance_id != inst.id {
        return Err(CoreError::Conflict(format!(
            "snapshot {} was taken of instance {}, not {}: fork from it instead",
            snap.id, snap.source_instance_name, inst.name
        )));
    }
    if snap.standby_of.is_some() {
        return Err(CoreError::Conflict(format!(
            "snapshot {} is {}'s standby state: use restore",
            snap.id, inst.name
        )));
    }
    if snap.network.ip != inst.network.ip || snap.network.mac != inst.network.mac {
        return Err(CoreError::Conflict(format!(
            "instance {} no longer has the address snapshot {} was taken with: fork from it instead",
            inst.name, snap.id
        )));
    }
    Ok(())
}

pub(crate) async fn restore_to(
    svc: &Services,
    id_or_name: &str,
    snapshot: &str,
    target: Option<InstanceState>,
) -> Result<Instance> {
    if target.is_some_and(|t| t != InstanceState::Running) {
        return Err(CoreError::Invalid(
            "target_state: only Running is supported for an in-place restore".into(),
        ));
    }
    let (_guard, mut inst) = svc.lock_instance(id_or_name).await?;
    let snap = svc.find_snapshot(snapshot)?;
    check(&inst, &snap)?;
    if inst.state == InstanceState::Standby {
        return Err(CoreError::Conflict(format!(
            "instance {} is in Standby: restore it (or delete it) first",
            inst.name
        )));
    }
    let _pin = svc.pins.pin(snap.base());
    let _reserved = capacity::reserve(
        svc,
        Demand {
            cow_vms: u32::from(!inst.state.has_vmm()),
            memory_mb: snap.memory_mb,
            ..Demand::default()
        },
    )?;
    info!(instance = %inst.id, snapshot = %snap.id, "restoring in place");
    if inst.state.has_vmm() {
        teardown::stop_vmm(svc, &inst).await;
    }
    inst.memory = Memory::Cow {
        base: snap.base().to_string(),
    };
    inst.memory_mb = snap.memory_mb;
    inst.vcpus = snap.vcpus;
    match bring_back(svc, &mut inst, &snap).await {
        Ok(rec) => {
            inst.handoff = Some(rec);
            svc.store.update_instance(&inst)?;
            Ok(inst)
        }
        Err(e) => {
            warn!(instance = %inst.id, error = %e, "in-place restore failed; stopping");
            teardown::stop_vmm(svc, &inst).await;
            inst.memory = Memory::Own;
            inst.to_stopped(
                Some(format!("restore from snapshot failed: {e}")),
                svc.now(),
            );
            svc.store.update_instance(&inst)?;
            Err(e)
        }
    }
}

async fn bring_back(svc: &Services, inst: &mut Instance, snap: &Snapshot) -> Result<HandoffRecord> {
    let t = Instant::now();
    let mut rec = HandoffRecord::default();
    if let Some(frozen) = snap.disk_layer.as_deref() {
        let size = crate::layers::size_of(svc, frozen)?;
        let (top, _pin) = crate::layers::new_top(svc, Some(frozen), size).await?;
        inst.disk_top = Some(top);
        svc.store.update_instance(inst)?;
    }
    let sp = svc.snapshot_paths(&snap.id);
    let vm = resume::start_paused(svc, inst, &mut rec, &snap.cmdline, &sp.state).await?;
    resume::resume(svc, &vm, &mut rec).await?;
    resume::ready_same_identity(svc, inst).await?;
    rec.record(Stage::Total, t);
    svc.store.observer().metrics.pipeline("restore", &rec);
    Ok(rec)
}
