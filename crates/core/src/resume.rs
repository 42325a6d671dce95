//! The steps restore and fork share to bring a VM back from a snapshot:
//! TAP → VMM waiting for device state over the instance's memory → state
//! loaded (paused) → resume. What happens between load and resume (the
//! mailbox write) and after it (agent or handoff) is each flow's own.

use crate::error::{CoreError, Result};
use crate::model::{HandoffRecord, Instance, Stage};
use crate::services::Services;
use forkvm_vmm::VmHandle;
use std::path::Path;
use std::time::Instant;

/// A VMM for `inst` with `state` loaded over its memory file; the VM is
/// paused on return. On error the VMM may exist: the caller tears down.
pub(crate) async fn start_paused(
    svc: &Services,
    inst: &mut Instance,
    rec: &mut HandoffRecord,
    cmdline: &str,
    state: &Path,
) -> Result<VmHandle> {
    let vm = start_waiting(svc, inst, rec, cmdline).await?;
    load(svc, &vm, rec, state).await?;
    Ok(vm)
}

/// TAP and a VMM for `inst` waiting for device state over its memory file
/// (which must exist at its full size). On error the VMM may exist: the
/// caller tears down.
pub(crate) async fn start_waiting(
    svc: &Services,
    inst: &mut Instance,
    rec: &mut HandoffRecord,
    cmdline: &str,
) -> Result<VmHandle> {
    let t = Instant::now();
    if inst.network.enabled {
        let lease = svc
            .net
            .ensure_lease(&svc.store, &inst.id, Some(&inst.network.clone()))?;
        inst.network = lease.info(svc.net.bridge(), inst.network.egress);
        svc.net.create_tap(&lease).await?;
    }
    svc.store.update_instance(inst)?;
    rec.record(Stage::AllocateTap, t);

    let image = svc.load_image(&inst.image)?;
    let spec = svc.vm_spec(inst, &image, cmdline, true)?;
    let t = Instant::now();
    // The TAP's filter (a fork: handoff traffic only) is in place before
    // the vCPUs run; applying it (an nftables transaction, ~15 ms of
    // kernel commit) overlaps QEMU's start-up instead of adding to it.
    let networked = inst.network.enabled;
    let (started, rules) = tokio::join!(svc.hv.start(&spec), async {
        match networked {
            true => svc.net.sync_rules(&svc.store).await,
            false => Ok(()),
        }
    });
    let vm = started.map_err(CoreError::vmm("starting QEMU"))?;
    rec.record(Stage::VmmStart, t);
    let hooks = &svc.cfg.test_hooks;
    hooks.crash_point("fork:vmm_started");
    inst.to_initializing(vm.pid, svc.accel_name(), svc.now());
    inst.cmdline = Some(cmdline.to_string());
    svc.store.update_instance(inst)?;
    rules?;
    Ok(vm)
}

/// `state` loaded into a waiting VMM; the VM is paused on return.
pub(crate) async fn load(
    svc: &Services,
    vm: &VmHandle,
    rec: &mut HandoffRecord,
    state: &Path,
) -> Result<()> {
    let t = Instant::now();
    svc.hv
        .load_state(vm, state)
        .await
        .map_err(CoreError::vmm("loading the snapshot"))?;
    rec.record(Stage::StateLoad, t);
    svc.cfg
        .test_hooks
        .vmm_kill_point("resume:state_loaded", vm.pid);
    Ok(())
}

/// Continue the vCPUs; returns the instant the guest runs again.
pub(crate) async fn resume(
    svc: &Services,
    vm: &VmHandle,
    rec: &mut HandoffRecord,
) -> Result<Instant> {
    let t = Instant::now();
    svc.hv
        .resume(vm)
        .await
        .map_err(CoreError::vmm("resuming"))?;
    rec.record(Stage::Resume, t);
    svc.cfg.test_hooks.crash_point("resume:resumed");
    Ok(Instant::now())
}

/// After resume, for a guest that kept its identity (a restore, a fork
/// without network): ready when the agent answers on the new channel; its
/// clock is stepped to now.
pub(crate) async fn ready_same_identity(svc: &Services, inst: &mut Instance) -> Result<()> {
    let health = crate::lifecycle::wait_agent(svc, inst, svc.cfg.handoff_timeout).await?;
    inst.mailbox = crate::agent::mailbox_of(&health);
    crate::guest::set_clock(svc, inst).await;
    inst.to_running();
    svc.store.update_instance(inst)
}
