//! The VMM watch: Running instances whose QEMU has exited (guest panic or
//! power-off, QEMU crash, an outside kill) become Stopped with the reason and
//! the console's telling line, so the instance list stays truthful.

use crate::model::InstanceState;
use crate::services::Services;
use crate::teardown::{console_hint, mark_vm_gone};
use tracing::warn;

/// One pass; returns how many instances it stopped. Instances busy with an
/// operation are left to it.
pub(crate) async fn reap_dead_vms(svc: &Services) -> usize {
    let Ok(all) = svc.store.list_instances() else {
        return 0;
    };
    let mut reaped = 0;
    let dead = |i: &crate::model::Instance| {
        i.state == InstanceState::Running
            && !i.pending_handoff
            && i.pid.is_some_and(|p| !svc.hv.is_alive(&i.id, p))
    };
    for inst in all.into_iter().filter(|i| dead(i)) {
        let Some(_guard) = svc.locks.try_acquire(&inst.id) else {
            continue;
        };
        // Re-read under the lock: an operation may have just finished.
        let Ok(Some(mut inst)) = svc.store.find_instance(&inst.id) else {
            continue;
        };
        if !dead(&inst) {
            continue;
        }
        let reason = match console_hint(&svc.paths(&inst).console_tail(200)) {
            Some(line) => format!("the VM exited unexpectedly; console: {line}"),
            None => "the VM exited unexpectedly".to_string(),
        };
        warn!(instance = %inst.id, name = %inst.name, %reason, "VMM gone; marking Stopped");
        match mark_vm_gone(svc, &mut inst, reason).await {
            Ok(()) => reaped += 1,
            Err(e) => warn!(instance = %inst.id, error = %e, "recording a gone VM failed"),
        }
    }
    reaped
}
