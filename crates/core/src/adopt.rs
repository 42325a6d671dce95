//! Adoption: after a (re)start of the daemon, every recorded instance is
//! reconciled with what exists, by one table ([`classify`]) from (recorded
//! state, what is found) to an action, then leftovers that belong to no
//! instance are removed.
//!
//! | recorded | VM found | action |
//! |---|---|---|
//! | Standby, with a recorded VMM or its memory file outside the snapshot | any | [`Action::FinishStandby`] |
//! | Standby, otherwise; Stopped; Unknown | any | [`Action::Nothing`] |
//! | VMM state with its standby snapshot (a restore) | running | [`Action::FinishRestore`], or [`Action::FinishFork`] for a standby fork |
//! | VMM state with its standby snapshot | not running | [`Action::ReturnToStandby`] |
//! | VMM state, pending handoff (a fork) | running | [`Action::FinishFork`] |
//! | VMM state, pending handoff | not running | [`Action::RemoveFork`] |
//! | Running | paused (crash during a capture) | [`Action::Resume`] |
//! | Running | running or unresponsive | [`Action::KeepRunning`] |
//! | Created, Initializing, Paused, Shutdown (a boot) | alive | [`Action::FinishBoot`] |
//! | any VMM state | gone | [`Action::MarkGone`] |

use crate::error::Result;
use crate::handoff::{self, MailboxFallback, Prepared};
use crate::lifecycle::wait_agent;
use crate::model::{Instance, InstanceState};
use crate::services::Services;
use crate::{standby, teardown};
use forkvm_vmm::RunState;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long an adopted VM's agent may take to answer.
const ADOPT_AGENT_WAIT: Duration = Duration::from_secs(30);

/// What the daemon finds of an instance's VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VmFound {
    /// No live QEMU of this instance.
    Gone,
    /// QEMU runs the guest.
    Running,
    /// QEMU lives with stopped vCPUs (paused, after a migration, not started).
    Paused,
    /// QEMU lives but its state is unknown or neither of the above.
    Unresponsive,
}

/// The recorded facts the table looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Recorded {
    pub state: InstanceState,
    /// It points at its standby snapshot.
    pub has_snapshot: bool,
    pub pending_handoff: bool,
    /// A VMM pid is recorded or its memory file exists outside a snapshot.
    pub vmm_traces: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Nothing,
    /// Stop the VMM, move the memory into the snapshot.
    FinishStandby,
    /// Restore interrupted before the guest ran: back to Standby.
    ReturnToStandby,
    /// Restore interrupted after resume: Running once the agent answers.
    FinishRestore,
    /// A fork interrupted after resume: host-initiated handoff.
    FinishFork,
    /// A fork whose VM does not run: removed with everything it holds.
    RemoveFork,
    /// Running with paused vCPUs (a crash during a capture): resume.
    Resume,
    KeepRunning,
    /// Interrupted mid-boot: wait for the agent.
    FinishBoot,
    /// The VMM is gone: Stopped, address released.
    MarkGone,
    /// Stopped, yet its QEMU lives (a stop that failed kept its pidfile):
    /// stopped again.
    StopStray,
}

/// The adoption table (module docs).
pub(crate) fn classify(r: Recorded, vm: VmFound) -> Action {
    use Action::*;
    if r.state == InstanceState::Standby {
        return if r.vmm_traces { FinishStandby } else { Nothing };
    }
    if r.state == InstanceState::Stopped && vm != VmFound::Gone {
        return StopStray;
    }
    if !r.state.has_vmm() {
        return Nothing;
    }
    let running = vm == VmFound::Running;
    match (r.has_snapshot, r.pending_handoff) {
        (true, true) if running => FinishFork,
        (true, false) if running => FinishRestore,
        (true, _) => ReturnToStandby,
        (false, true) if running => FinishFork,
        (false, true) => RemoveFork,
        (false, false) => match (r.state, vm) {
            (_, VmFound::Gone) => MarkGone,
            (InstanceState::Running, VmFound::Paused) => Resume,
            (InstanceState::Running, _) => KeepRunning,
            _ => FinishBoot,
        },
    }
}

/// Reconcile every instance, then remove orphans.
pub(crate) async fn adopt_all(svc: &Services) -> Result<()> {
    for inst in svc.store.list_instances()? {
        let inst = crate::handover::adopt_interrupted(svc, inst).await?;
        let mut inst = crate::promote::adopt_interrupted(svc, inst).await?;
        let paths = svc.paths(&inst);
        let pid = inst.pid.or_else(|| paths.read_pid());
        let vm = inspect(svc, &inst, pid).await;
        let recorded = Recorded {
            state: inst.state,
            has_snapshot: inst.snapshot_id.is_some(),
            pending_handoff: inst.pending_handoff,
            vmm_traces: inst.pid.is_some() || paths.mem.exists(),
        };
        let action = classify(recorded, vm);
        if action != Action::Nothing {
            info!(instance = %inst.id, name = %inst.name, ?recorded, ?vm, ?action, "adopting");
        }
        if vm != VmFound::Gone {
            // The live VMM (the pidfile may know it when the record does not).
            inst.pid = pid;
            if let Some(p) = pid {
                let h = svc.handle(&inst, p);
                crate::layers::reconcile_top(svc, &mut inst, &h).await?;
            }
        }
        execute(svc, &mut inst, action).await?;
    }
    crate::orphans::remove_orphans(svc).await;
    Ok(())
}

async fn inspect(svc: &Services, inst: &Instance, pid: Option<u32>) -> VmFound {
    let Some(pid) = pid.filter(|p| svc.hv.is_alive(&inst.id, *p)) else {
        return VmFound::Gone;
    };
    let vm = svc.handle(inst, pid);
    if inst.state == InstanceState::Standby {
        // Stopped whatever it answers (a held one answers nothing, and its
        // memory must not change: it becomes a base).
        return VmFound::Unresponsive;
    }
    // A crash during a capture may have left it held: it runs on.
    if let Err(e) = svc.hv.hold(&vm, false).await {
        warn!(instance = %inst.id, error = %e, "releasing a VMM at adoption failed");
    }
    match svc.hv.status(&vm).await {
        Ok(RunState::Running) => VmFound::Running,
        Ok(
            RunState::Paused
            | RunState::PostMigrate
            | RunState::FinishMigrate
            | RunState::InMigrate
            | RunState::Prelaunch,
        ) => VmFound::Paused,
        _ => VmFound::Unresponsive,
    }
}

async fn execute(svc: &Services, inst: &mut Instance, action: Action) -> Result<()> {
    match action {
        Action::Nothing | Action::KeepRunning => Ok(()),
        Action::StopStray => {
            warn!(instance = %inst.id, pid = ?inst.pid, "stopping the QEMU of a Stopped instance");
            teardown::stop_vmm(svc, inst).await;
            inst.pid = None;
            svc.store.update_instance(inst)
        }
        Action::FinishStandby => {
            if let Err(e) = standby::finish(svc, inst).await {
                warn!(instance = %inst.id, error = %e, "finishing the standby failed");
            }
            Ok(())
        }
        Action::ReturnToStandby => {
            standby::finish(svc, inst).await?;
            inst.back_to_standby("restore interrupted by a daemon restart".into());
            svc.store.update_instance(inst)
        }
        Action::FinishRestore => finish_restore(svc, inst).await,
        Action::FinishFork => finish_fork(svc, inst).await,
        Action::RemoveFork => {
            warn!(instance = %inst.id, name = %inst.name, "removing unfinished fork");
            teardown::remove_instance(svc, inst).await
        }
        Action::Resume => {
            if let Some(pid) = inst.pid
                && let Err(e) = svc.hv.resume(&svc.handle(inst, pid)).await
            {
                warn!(instance = %inst.id, error = %e, "resume failed");
            }
            Ok(())
        }
        Action::FinishBoot => match wait_agent(svc, inst, ADOPT_AGENT_WAIT).await {
            Ok(_) => {
                inst.to_running();
                svc.store.update_instance(inst)
            }
            Err(e) => {
                warn!(instance = %inst.id, error = %e, "adopted VM never became ready");
                gone(svc, inst, "the VM exited while the daemon was not running").await
            }
        },
        Action::MarkGone => gone(svc, inst, "the VM exited while the daemon was not running").await,
    }
}

async fn gone(svc: &Services, inst: &mut Instance, reason: &str) -> Result<()> {
    warn!(instance = %inst.id, %reason, "marking Stopped");
    teardown::mark_vm_gone(svc, inst, reason.to_string()).await
}

/// The guest resumed: its snapshot is spent either way.
fn drop_snapshot(svc: &Services, inst: &mut Instance) {
    if let Some(sid) = inst.snapshot_id.take() {
        crate::snapshot::remove(svc, &sid);
    }
}

async fn finish_restore(svc: &Services, inst: &mut Instance) -> Result<()> {
    match wait_agent(svc, inst, ADOPT_AGENT_WAIT).await {
        Ok(h) => {
            inst.mailbox = crate::agent::mailbox_of(&h);
            inst.to_running();
            drop_snapshot(svc, inst);
            svc.store.update_instance(inst)?;
            info!(instance = %inst.id, "finished an interrupted restore");
            Ok(())
        }
        Err(e) => {
            drop_snapshot(svc, inst);
            let why = format!("restore interrupted after the guest resumed; agent silent: {e}");
            gone(svc, inst, &why).await
        }
    }
}

/// Host-initiated: the mailbox listener died with the daemon.
async fn finish_fork(svc: &Services, inst: &mut Instance) -> Result<()> {
    let mut rec = inst.handoff.clone().unwrap_or_default();
    let prepared = Prepared::without_mailbox(MailboxFallback::DaemonRestarted);
    match handoff::complete(svc, inst, &mut rec, prepared, Instant::now()).await {
        Ok(()) => {
            drop_snapshot(svc, inst);
            svc.store.update_instance(inst)?;
            info!(instance = %inst.id, "finished an interrupted fork");
            Ok(())
        }
        Err(e) if inst.snapshot_id.is_some() => {
            // A standby fork whose restore was cut short: its snapshot is spent.
            drop_snapshot(svc, inst);
            gone(
                svc,
                inst,
                &format!("interrupted restore can't be finished: {e}"),
            )
            .await
        }
        Err(e) => {
            warn!(instance = %inst.id, error = %e, "interrupted fork can't be finished");
            teardown::remove_instance(svc, inst).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;
    use InstanceState::{
        Created, Initializing, Paused, Running, Shutdown, Standby, Stopped, Unknown,
    };

    fn rec(state: InstanceState, has_snapshot: bool, pending: bool, traces: bool) -> Recorded {
        Recorded {
            state,
            has_snapshot,
            pending_handoff: pending,
            vmm_traces: traces,
        }
    }

    /// Every row of the table in the module docs.
    #[test]
    fn the_adoption_table() {
        use VmFound::{Gone, Unresponsive};
        let (up, paused) = (VmFound::Running, VmFound::Paused);
        let rows: &[(Recorded, VmFound, Action)] = &[
            (rec(Standby, true, false, true), Gone, FinishStandby),
            (rec(Standby, true, false, true), paused, FinishStandby),
            (rec(Standby, true, true, false), Gone, Nothing),
            (rec(Stopped, false, false, false), Gone, Nothing),
            (rec(Stopped, false, false, false), up, StopStray),
            (rec(Stopped, false, false, false), Unresponsive, StopStray),
            (rec(Unknown, false, false, false), up, Nothing),
            (rec(Initializing, true, false, true), up, FinishRestore),
            (rec(Initializing, true, true, true), up, FinishFork),
            (
                rec(Initializing, true, false, true),
                paused,
                ReturnToStandby,
            ),
            (rec(Initializing, true, true, true), Gone, ReturnToStandby),
            (
                rec(Initializing, true, false, true),
                Unresponsive,
                ReturnToStandby,
            ),
            (rec(Initializing, false, true, true), up, FinishFork),
            (rec(Created, false, true, false), Gone, RemoveFork),
            (rec(Initializing, false, true, true), paused, RemoveFork),
            (rec(Running, false, false, true), paused, Resume),
            (rec(Running, false, false, true), up, KeepRunning),
            (rec(Running, false, false, true), Unresponsive, KeepRunning),
            (rec(Initializing, false, false, true), up, FinishBoot),
            (rec(Created, false, false, true), paused, FinishBoot),
            (rec(Running, false, false, true), Gone, MarkGone),
            (rec(Initializing, false, false, true), Gone, MarkGone),
            (rec(Paused, false, false, true), Gone, MarkGone),
            (rec(Shutdown, false, false, true), Gone, MarkGone),
        ];
        for (r, vm, want) in rows {
            assert_eq!(classify(*r, *vm), *want, "{r:?} with VM {vm:?}");
        }
    }
}
