//! Handover: a running VM with its own memory file hands itself over to a
//! new QEMU that maps that file copy-on-write, so the file becomes an
//! immutable base in O(1) — no copy, and a pause (device state out and back
//! in) that does not grow with the memory the guest touched.
//!
//! 1. record the intent (`Instance::handover`, and for a VM with a
//!    writable disk the new top over its current one, `handover_disk`): a
//!    crash from here on is finished or undone by adoption
//!    ([`adopt_interrupted`]);
//! 2. the own file is renamed to the base's path (the running QEMU maps the
//!    inode and writes on; the name does not matter to it);
//! 3. the next VMM generation starts beside it, waiting for state, mapping
//!    the base `share=off` and taking over the TAP's fd;
//! 4. pause → device state saved → loaded into the new VMM → it continues;
//! 5. the old VMM quits; the instance and the base record are committed in
//!    one transaction.
//!
//! Any failure before step 5 puts the file back and resumes the old VMM.

use crate::bases;
use crate::capture::{Pause, Planned};
use crate::error::{CoreError, Result};
use crate::model::{Base, Instance, Memory};
use crate::paths::SnapshotPaths;
use crate::services::Services;
use forkvm_vmm::VmHandle;
use std::time::Instant;
use tracing::{info, warn};

/// Hands `inst` (Running on `old`, its own memory) over to a new VMM over
/// the planned base; the device state lands in its `paths.state`; the base
/// is announced `placed` once renamed. Returns the base record, committed
/// with the instance, and the VM's pause.
pub(crate) async fn hand_over(
    svc: &Services,
    inst: &Instance,
    old: &VmHandle,
    planned: &Planned,
) -> Result<(Base, Pause)> {
    let (sp, bid, base_file) = (&planned.paths, planned.base_id.as_str(), &planned.base_file);
    let own_file = svc.paths(inst).mem;
    let mut rec = svc.find(&inst.id)?;
    rec.handover = Some(bid.to_string());
    // The new VMM writes a new top over the old one, which the old VMM
    // stops writing at the pause: frozen without a freeze command.
    let _pin = match rec.disk_top.as_deref() {
        Some(top) => {
            let size = crate::layers::size_of(svc, top)?;
            let (next, pin) = crate::layers::new_top(svc, Some(top), size).await?;
            rec.handover_disk = Some(next);
            Some(pin)
        }
        None => None,
    };
    svc.store.update_instance(&rec)?;
    std::fs::rename(&own_file, base_file)
        .map_err(CoreError::io("renaming the memory file into a base"))?;
    planned.placed.send_replace(true);
    let next = next_generation(&rec, bid);
    let t = Instant::now();
    match switch(svc, &next, old, sp).await {
        Ok((new, pause)) => {
            let base = bases::record(svc, bid, base_file);
            let mut done = next;
            done.pid = Some(new.pid);
            done.handover = None;
            svc.agent.forget(&inst.id);
            svc.store.commit_handover(&done, &base)?;
            info!(instance = %inst.id, pid = new.pid, base = %bid, pause_ms = pause.ms,
                  took_ms = t.elapsed().as_secs_f64() * 1000.0, "handed over to a copy-on-write VMM");
            // A promoted VM's file was allocated whole by its migration:
            // its zero pages go back. A file the guest filled itself has
            // few, and reading all of it would compete with the forks.
            if crate::memory::allocated_whole(base_file) {
                tokio::spawn(bases::trim(base_file.to_path_buf()));
            }
            if svc.cfg.promote_after_handover
                && let Some(p) = svc.promoter.get()
            {
                p.request(&inst.id);
            }
            Ok((base, pause))
        }
        Err(e) => {
            warn!(instance = %inst.id, error = %e, "handover failed; the VM runs on as it was");
            if let Err(re) = std::fs::rename(base_file, &own_file) {
                warn!(instance = %inst.id, error = %re, "putting the memory file back failed");
            }
            if let Err(re) = svc.hv.resume(old).await {
                warn!(instance = %inst.id, error = %re, "resuming the VM failed");
            }
            rec.handover = None;
            rec.handover_disk = None;
            svc.store.update_instance(&rec)?;
            Err(e)
        }
    }
}

/// The instance as its next VMM generation sees it: copy-on-write of `bid`,
/// writing its disk's new top.
fn next_generation(inst: &Instance, bid: &str) -> Instance {
    Instance {
        memory: Memory::Cow {
            base: bid.to_string(),
        },
        vmm_gen: inst.vmm_gen + 1,
        disk_top: inst.handover_disk.clone().or(inst.disk_top.clone()),
        handover_disk: None,
        ..inst.clone()
    }
}

/// Steps 3–5: the new VMM runs with the old one's device state; the old
/// one quits in the background (it holds nothing the new one needs). On
/// error the new one is stopped and the old one left paused (or running,
/// if it never paused). Returns the new VMM and the pause.
async fn switch(
    svc: &Services,
    next: &Instance,
    old: &VmHandle,
    sp: &SnapshotPaths,
) -> Result<(VmHandle, Pause)> {
    let new = crate::vmm_switch::start_next(svc, next, old).await?;
    let paused_at = Instant::now();
    let mut frozen_at = svc.now();
    let moved = async {
        svc.hv
            .pause(old)
            .await
            .map_err(CoreError::vmm("pausing the VM"))?;
        frozen_at = svc.now();
        svc.hv
            .save_state(old, &sp.state)
            .await
            .map_err(CoreError::vmm("saving device state"))?;
        // The old VMM maps the base shared: from here it must write
        // nothing (a paused QEMU still does, e.g. virtio-serial when the
        // agent link drops); it is killed, not asked to quit.
        svc.hv
            .hold(old, true)
            .await
            .map_err(CoreError::vmm("holding the old VMM"))?;
        svc.hv
            .load_state(&new, &sp.state)
            .await
            .map_err(CoreError::vmm("loading device state into the new VMM"))?;
        svc.hv
            .resume(&new)
            .await
            .map_err(CoreError::vmm("resuming the new VMM"))
    }
    .await;
    if let Err(e) = moved {
        crate::vmm_switch::discard(svc, &new).await;
        if let Err(e) = svc.hv.hold(old, false).await {
            warn!(error = %e, "releasing the old VMM failed");
        }
        return Err(e);
    }
    let ms = paused_at.elapsed().as_secs_f64() * 1000.0;
    crate::vmm_switch::retire(svc, old);
    Ok((new, Pause { ms, frozen_at }))
}

/// After a crash during a handover: finish it if the new VMM runs, else
/// undo it (the file back, the old VMM resumed if it lives). Returns the
/// instance as it now is.
pub(crate) async fn adopt_interrupted(svc: &Services, mut inst: Instance) -> Result<Instance> {
    let Some(bid) = inst.handover.clone() else {
        return Ok(inst);
    };
    let next = next_generation(&inst, &bid);
    let base_file = bases::path(svc, &bid);
    if let Some(pid) = crate::vmm_switch::recover(svc, &inst, &next).await {
        let mut done = next;
        done.pid = Some(pid);
        done.handover = None;
        svc.store
            .commit_handover(&done, &bases::record(svc, &bid, &base_file))?;
        info!(instance = %done.id, "finished an interrupted handover");
        return Ok(done);
    }
    let own_file = svc.paths(&inst).mem;
    if base_file.exists() && !own_file.exists() {
        std::fs::rename(&base_file, &own_file)
            .map_err(CoreError::io("putting the memory file back"))?;
    }
    inst.handover = None;
    inst.handover_disk = None;
    svc.store.update_instance(&inst)?;
    warn!(instance = %inst.id, "undid an interrupted handover");
    Ok(inst)
}
