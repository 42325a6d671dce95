//! What a handover and a promotion share: moving an instance to its next
//! VMM generation while it runs. The next QEMU starts beside the running
//! one, takes over its TAP, gets the machine (device state, or everything by
//! live migration), and the old one quits in the background. After a crash
//! the record says a switch was under way; [`recover`] finds out which
//! side runs.

use crate::error::{CoreError, Result};
use crate::model::Instance;
use crate::services::Services;
use forkvm_vmm::{NetBackend, RunState, VmHandle};
use std::time::Duration;
use tracing::warn;

/// Grace for an old VMM to quit once the new one runs.
const OLD_VMM_GRACE: Duration = Duration::from_millis(500);

/// Starts `next`'s VMM, waiting for incoming state and taking over the TAP
/// of `old`.
pub(crate) async fn start_next(
    svc: &Services,
    next: &Instance,
    old: &VmHandle,
) -> Result<VmHandle> {
    let image = svc.load_image(&next.image)?;
    let cmdline = next.cmdline.clone().unwrap_or_default();
    let mut spec = svc.vm_spec(next, &image, &cmdline, true)?;
    if let Some(net) = spec.net.as_mut()
        && let NetBackend::Tap(tap) = &net.backend
    {
        net.backend = NetBackend::TakeOver {
            tap: tap.clone(),
            from_pid: old.pid,
        };
    }
    svc.hv
        .start(&spec)
        .await
        .map_err(CoreError::vmm("starting the next VMM"))
}

/// Stops a successor that failed, before the old VMM goes on.
pub(crate) async fn discard(svc: &Services, vm: &VmHandle) {
    if let Err(e) = svc.hv.stop(vm, OLD_VMM_GRACE).await {
        warn!(vm = %vm.id, pid = vm.pid, error = %e, "stopping the next VMM failed");
    }
}

/// Stops the old VMM once its successor runs, in the background: it holds
/// nothing the new one needs.
pub(crate) fn retire(svc: &Services, vm: &VmHandle) {
    let (hv, vm) = (svc.hv.clone(), vm.clone());
    tokio::spawn(async move {
        if let Err(e) = hv.stop(&vm, OLD_VMM_GRACE).await {
            warn!(vm = %vm.id, pid = vm.pid, error = %e, "stopping a VMM failed");
        }
    });
}

/// After a crash during a switch from `inst` to `next`: the new VMM's pid
/// when it runs (the old one is stopped), else `None` (a new one that lives
/// but never ran is stopped; the old one, if alive, is resumed).
pub(crate) async fn recover(svc: &Services, inst: &Instance, next: &Instance) -> Option<u32> {
    let new_pid = svc
        .paths(next)
        .read_pid()
        .filter(|p| svc.hv.is_alive(&next.id, *p));
    let old = inst.pid.filter(|p| svc.hv.is_alive(&inst.id, *p));
    if let Some(pid) = new_pid
        && matches!(
            svc.hv.status(&svc.handle(next, pid)).await,
            Ok(RunState::Running)
        )
    {
        if let Some(o) = old {
            let _ = svc.hv.stop(&svc.handle(inst, o), OLD_VMM_GRACE).await;
        }
        return Some(pid);
    }
    if let Some(pid) = new_pid {
        let _ = svc.hv.stop(&svc.handle(next, pid), OLD_VMM_GRACE).await;
    }
    if let Some(o) = old {
        // Held if the crash came after its state was saved.
        let vm = svc.handle(inst, o);
        let _ = svc.hv.hold(&vm, false).await;
        let _ = svc.hv.resume(&vm).await;
    }
    None
}
