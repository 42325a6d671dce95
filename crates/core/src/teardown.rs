//! Taking things down: a VMM with its TAP and runtime files, a whole
//! instance, and the record of a VM that went away on its own.

use crate::error::Result;
use crate::model::Instance;
use crate::services::Services;
use std::time::Duration;
use tracing::warn;

/// Grace for QEMU to quit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often [`vmm_exit`] looks at the VMM.
const EXIT_POLL: Duration = Duration::from_millis(200);

/// Stop QEMU and remove the TAP and runtime files; keeps allocations (a
/// stopped instance keeps its identity).
pub(crate) async fn stop_vmm(svc: &Services, inst: &Instance) -> bool {
    svc.agent.forget(&inst.id);
    let paths = svc.paths(inst);
    let pid = inst.pid.or_else(|| paths.read_pid());
    // Also when it is gone already: stop then removes what it left (its
    // sockets, pidfile and cgroup).
    let mut stuck = None;
    if let Some(pid) = pid
        && let Err(e) = svc.hv.stop(&svc.handle(inst, pid), STOP_GRACE).await
    {
        warn!(instance = %inst.id, error = %e, "stopping QEMU failed");
        stuck = svc.hv.is_alive(&inst.id, pid).then_some(pid);
    }
    if let Some(tap) = &inst.network.tap
        && let Err(e) = svc.net.delete_tap(tap).await
    {
        warn!(instance = %inst.id, tap = %tap, error = %e, "deleting TAP failed");
    }
    match stuck {
        None => paths.remove_runtime(),
        // Its pidfile stays, so a later stop, delete or restart finds it.
        Some(pid) => {
            warn!(instance = %inst.id, pid, "QEMU survived its stop; pidfile kept");
            if let Err(e) = std::fs::write(&paths.pidfile, format!("{pid}\n")) {
                warn!(instance = %inst.id, error = %e, "keeping the pidfile failed");
            }
        }
    }
    stuck.is_none()
}

/// [`stop_vmm`], leaving the memory file in place (standby, a restore that
/// goes back to standby).
pub(crate) async fn stop_vmm_keep_memory(svc: &Services, inst: &Instance) {
    let p = svc.paths(inst);
    let keep = p.mem.with_extension("keep");
    let _ = std::fs::rename(&p.mem, &keep);
    stop_vmm(svc, inst).await;
    let _ = std::fs::rename(&keep, &p.mem);
}

/// Everything [`stop_vmm`] does, plus the instance's standby snapshot, its
/// network claims and its directory. The record is the caller's.
pub(crate) async fn remove_instance_resources(svc: &Services, inst: &Instance) {
    let stopped = stop_vmm(svc, inst).await;
    if let Some(sid) = &inst.snapshot_id {
        crate::snapshot::remove(svc, sid);
    }
    if let Err(e) = svc.net.release(&svc.store, &inst.id) {
        warn!(instance = %inst.id, error = %e, "releasing network failed");
    }
    // A QEMU that survived keeps its directory (and pidfile): the orphan
    // sweep at the next start stops it.
    if stopped {
        svc.paths(inst).remove_all();
    }
}

/// [`remove_instance_resources`] and the record.
pub(crate) async fn remove_instance(svc: &Services, inst: &Instance) -> Result<()> {
    remove_instance_resources(svc, inst).await;
    svc.store.delete_instance(&inst.id)?;
    svc.locks.forget(&inst.id);
    sync_rules(svc).await;
    Ok(())
}

/// The firewall re-derived after an instance gave up its lease; a failure
/// is logged (the next change, or a restart, rebuilds it whole).
pub(crate) async fn sync_rules(svc: &Services) {
    if let Err(e) = svc.net.sync_rules(&svc.store).await {
        warn!(error = %e, "updating the firewall rules failed");
    }
}

/// An instance whose VMM is gone becomes Stopped: TAP and runtime files
/// removed, the address back in the pool (the MAC stays: it is this
/// instance's and costs nothing; start claims an address again).
pub(crate) async fn mark_vm_gone(
    svc: &Services,
    inst: &mut Instance,
    reason: String,
) -> Result<()> {
    stop_vmm(svc, inst).await;
    svc.net.release_address(&svc.store, &inst.id)?;
    inst.network.forget_address();
    inst.to_stopped(Some(reason), svc.now());
    svc.store.update_instance(inst)?;
    sync_rules(svc).await;
    Ok(())
}

/// Resolves (with the error to report) once the VMM `pid` of instance `id`
/// has exited; never if there is none. For racing against waits that would
/// otherwise run to their deadline.
pub(crate) async fn vmm_exit(svc: &Services, id: &str, pid: Option<u32>, during: &str) -> VmExited {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(EXIT_POLL).await;
        if !svc.hv.is_alive(id, pid) {
            return VmExited {
                during: during.to_string(),
                console: console_hint(&svc.paths_of_id(id).console_tail(200)),
            };
        }
    }
}

/// The VMM exited while an operation waited on its guest.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the VM exited {during}{}", console.as_ref().map(|l| format!("; console: {l}")).unwrap_or_default())]
pub struct VmExited {
    pub during: String,
    /// The console line that best explains it.
    pub console: Option<String>,
}

/// The console line that best explains a VM's end: the kernel's panic line
/// if there is one, else the last line (at most 200 characters).
pub(crate) fn console_hint(tail: &str) -> Option<String> {
    let lines: Vec<&str> = tail
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains("Kernel panic"))
        .or(lines.last())?;
    Some(line.chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::console_hint;

    #[test]
    fn console_hint_prefers_the_panic_line() {
        let tail = "[ 6.1] sysrq: Trigger a crash\n[ 6.2] Kernel panic - not syncing: sysrq triggered crash\n[ 6.3] Kernel Offset: disabled\n";
        assert_eq!(
            console_hint(tail).as_deref(),
            Some("[ 6.2] Kernel panic - not syncing: sysrq triggered crash")
        );
        assert_eq!(
            console_hint("a\nlast line\n\n").as_deref(),
            Some("last line")
        );
        assert_eq!(console_hint(""), None);
        assert_eq!(console_hint(&"x".repeat(500)).map(|l| l.len()), Some(200));
    }
}
