//! Standby: capture → commit (snapshot + Standby in one transaction) → stop
//! the VMM and move its memory into the snapshot.

use crate::capture::{CaptureMode, capture};
use crate::error::{CoreError, Result};
use crate::model::{Instance, InstanceState};
use crate::services::Services;
use crate::teardown;
use tracing::info;

/// Pause a Running instance, write its snapshot and stop its VMM.
pub(crate) async fn standby(svc: &Services, id_or_name: &str) -> Result<Instance> {
    let (_guard, mut inst) = svc.lock_instance(id_or_name).await?;
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
    let c = capture(svc, &mut inst, None, CaptureMode::Standby).await?;
    let snap = &c.snap;
    // The commit point: snapshot, base and Standby state in one
    // transaction, while the paused VM and its memory still exist. A crash
    // before it leaves a paused Running VM (adoption resumes it); after it,
    // adoption finishes the standby.
    let running = inst.clone();
    inst.to_standby(snap.id.clone(), svc.now());
    if let Err(e) = svc.store.commit_standby(snap, &c.base, &inst) {
        abandon(svc, &running, &c).await;
        return Err(e);
    }
    svc.cfg.test_hooks.crash_point("standby:committed");
    finish(svc, &mut inst).await?;
    info!(instance = %inst.id, snapshot = %snap.id, "instance in standby");
    Ok(inst)
}

/// The recorded standby's second half: stop the VMM (keeping its memory
/// file) and, when the instance had its own file, rename it into the
/// snapshot's base. Idempotent, so adoption can finish a standby the daemon
/// died in.
pub(crate) async fn finish(svc: &Services, inst: &mut Instance) -> Result<()> {
    let Some(sid) = inst.snapshot_id.clone() else {
        return Ok(());
    };
    let base = crate::bases::path(svc, svc.find_snapshot(&sid)?.base());
    let mem = svc.paths(inst).mem;
    teardown::stop_vmm_keep_memory(svc, inst).await;
    if mem.exists() {
        std::fs::rename(&mem, &base).map_err(CoreError::io(
            "moving guest memory into the snapshot's base",
        ))?;
    }
    if inst.pid.is_some() {
        // The TAP is gone with the VMM; the record keeps the claim.
        inst.vmm_exited();
        svc.store.update_instance(inst)?;
    }
    Ok(())
}

/// A standby capture that could not be recorded: the VM runs on.
async fn abandon(svc: &Services, inst: &Instance, c: &crate::capture::Captured) {
    if let Some(pid) = inst.pid {
        // Held since its state was saved (`capture`): released first.
        crate::capture::resume_source(svc, inst, &svc.handle(inst, pid)).await;
    }
    c.discard(svc);
}
