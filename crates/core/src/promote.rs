//! Promotion: a running copy-on-write VM gets its own memory file back, so
//! its next capture is an O(1) handover again instead of moving all of its
//! RAM. A migration into the next VMM generation (own file, `share=on`, the
//! TAP taken over); the VM is paused for the copy (stop-and-copy, see
//! `Hypervisor::migrate`). After a handover the daemon promotes the source in the
//! background ([`Promoter`]), so a template forked again and again pays the
//! move between forks, not in them.
//!
//! The migration allocates every page of the new file (QEMU reads each page
//! it loads), so a promoted VM's file is as large as its guest RAM; the base
//! its next handover makes is trimmed of zero pages afterwards.

use crate::error::{CoreError, Result};
use crate::model::{Instance, InstanceState, Memory};
use crate::services::Services;
use forkvm_vmm::VmHandle;
use std::sync::Weak;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Takes promotion requests and carries them out one at a time, each under
/// its instance's lock, when the operation that asked for it is done.
pub(crate) struct Promoter(mpsc::UnboundedSender<String>);

impl Promoter {
    pub fn start(svc: Weak<Services>) -> (Self, impl std::future::Future<Output = ()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let run = async move {
            while let Some(id) = rx.recv().await {
                let Some(svc) = svc.upgrade() else { return };
                let _guard = svc.locks.acquire(&id).await;
                let Ok(inst) = svc.find(&id) else { continue };
                if promotable(&inst)
                    && let Err(e) = promote(&svc, &inst).await
                {
                    warn!(instance = %id, error = %e, "promotion failed; the VM runs on copy-on-write");
                }
            }
        };
        (Self(tx), run)
    }

    /// Asks for `id` to be promoted once it is free.
    pub fn request(&self, id: &str) {
        let _ = self.0.send(id.to_string());
    }
}

fn promotable(inst: &Instance) -> bool {
    inst.state == InstanceState::Running
        && matches!(inst.memory, Memory::Cow { .. })
        && inst.handover.is_none()
        && !inst.promoting
        && inst.pid.is_some()
}

/// Moves `inst` onto a new VMM with its own memory file.
pub(crate) async fn promote(svc: &Services, inst: &Instance) -> Result<()> {
    let pid = inst
        .pid
        .ok_or_else(|| CoreError::Conflict(format!("instance {} has no VMM", inst.name)))?;
    let old = svc.handle(inst, pid);
    let mut rec = inst.clone();
    rec.promoting = true;
    svc.store.update_instance(&rec)?;
    let next = next_generation(inst);
    let t = Instant::now();
    match switch(svc, &next, &old).await {
        Ok((new, downtime_ms)) => {
            let mut done = next;
            done.pid = Some(new.pid);
            svc.agent.forget(&inst.id);
            svc.store.update_instance(&done)?;
            info!(instance = %inst.id, pid = new.pid, downtime_ms,
                  took_ms = t.elapsed().as_secs_f64() * 1000.0, "promoted to its own memory");
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(svc.paths(&next).mem);
            if let Err(re) = svc.hv.resume(&old).await {
                warn!(instance = %inst.id, error = %re, "resuming the VM failed");
            }
            rec.promoting = false;
            svc.store.update_instance(&rec)?;
            Err(e)
        }
    }
}

/// The new VMM, loaded by live migration and running; the old one quits in
/// the background. Returns it and the migration's downtime.
async fn switch(svc: &Services, next: &Instance, old: &VmHandle) -> Result<(VmHandle, f64)> {
    let new = crate::vmm_switch::start_next(svc, next, old).await?;
    let moved = async {
        let r = svc
            .hv
            .migrate(old, &new, None)
            .await
            .map_err(CoreError::vmm("migrating the VM to its own memory"))?;
        svc.hv
            .resume(&new)
            .await
            .map_err(CoreError::vmm("resuming the promoted VMM"))?;
        Ok::<f64, CoreError>(r.downtime_ms)
    }
    .await;
    let downtime = match moved {
        Ok(d) => d,
        Err(e) => {
            crate::vmm_switch::discard(svc, &new).await;
            return Err(e);
        }
    };
    crate::vmm_switch::retire(svc, old);
    Ok((new, downtime))
}

/// After a crash during a promotion: finish it if the new VMM runs, else
/// undo it (its file removed, the old VMM resumed if it lives).
pub(crate) async fn adopt_interrupted(svc: &Services, mut inst: Instance) -> Result<Instance> {
    if !inst.promoting {
        return Ok(inst);
    }
    let next = next_generation(&inst);
    if let Some(pid) = crate::vmm_switch::recover(svc, &inst, &next).await {
        let mut done = next;
        done.pid = Some(pid);
        svc.store.update_instance(&done)?;
        info!(instance = %done.id, "finished an interrupted promotion");
        return Ok(done);
    }
    let _ = std::fs::remove_file(svc.paths(&next).mem);
    inst.promoting = false;
    svc.store.update_instance(&inst)?;
    warn!(instance = %inst.id, "undid an interrupted promotion");
    Ok(inst)
}

/// The instance as its next VMM generation sees it: its own memory again.
fn next_generation(inst: &Instance) -> Instance {
    Instance {
        memory: Memory::Own,
        vmm_gen: inst.vmm_gen + 1,
        promoting: false,
        ..inst.clone()
    }
}
