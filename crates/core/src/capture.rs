//! Capturing a running VM: pause → device state → memory → resume (or stay
//! paused for a standby). The base of snapshots, standbys and forks from a
//! running source.

use crate::agent::{CallPolicy, mailbox_of};
use crate::error::{CoreError, Result};
use crate::memory::sparse_copy;
use crate::model::{Instance, MailboxInfo, Snapshot};
use crate::paths::SnapshotPaths;
use crate::services::{Services, new_id};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What happens to the VM and its memory after the device state is saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CaptureMode {
    /// The memory is copied into the snapshot and the VM resumes.
    Copy,
    /// The VM stays paused; the standby moves its memory file afterwards.
    Standby,
}

pub(crate) struct Captured {
    pub snap: Snapshot,
    pub paths: SnapshotPaths,
}

/// Pause a Running VM and write its device state; then, per `mode`, copy
/// its memory and resume it, or leave it paused. Any failure resumes the VM.
pub(crate) async fn capture(
    svc: &Services,
    inst: &Instance,
    name: Option<String>,
    mode: CaptureMode,
) -> Result<Captured> {
    let pid = inst
        .pid
        .ok_or_else(|| CoreError::Conflict(format!("instance {} has no VMM", inst.name)))?;
    let vm = svc.handle(&inst.id, pid);
    let sid = new_id();
    let sp = svc.snapshot_paths(&sid);
    sp.prepare()?;
    // The agent re-arms with a new marker after every handoff: ask for the
    // current one before pausing (no mailbox if it doesn't answer).
    let mailbox = current_mailbox(svc, inst).await;
    let t = Instant::now();
    svc.hv
        .pause(&vm)
        .await
        .map_err(CoreError::vmm("pausing the VM"))?;
    let saved = async {
        svc.hv
            .save_state(&vm, &sp.state)
            .await
            .map_err(CoreError::vmm("saving device state"))?;
        if mode == CaptureMode::Copy {
            copy_memory(&svc.paths(&inst.id).mem, &sp.mem).await?;
        }
        Ok(())
    }
    .await;
    if mode == CaptureMode::Copy || saved.is_err() {
        // The source keeps running whatever happened to the capture.
        if let Err(e) = svc.hv.resume(&vm).await {
            warn!(instance = %inst.id, error = %e, "resuming the source after capture failed");
        }
    }
    if let Err(e) = saved {
        sp.remove();
        return Err(e);
    }
    let pause_ms = t.elapsed().as_secs_f64() * 1000.0;
    let snap = snapshot_of(svc, inst, sid, name, &sp, mailbox, mode);
    info!(instance = %inst.id, snapshot = %snap.id, ?mode, pause_ms,
          size_bytes = snap.size_bytes, "snapshot captured");
    Ok(Captured { snap, paths: sp })
}

fn snapshot_of(
    svc: &Services,
    inst: &Instance,
    id: String,
    name: Option<String>,
    sp: &SnapshotPaths,
    mailbox: Option<MailboxInfo>,
    mode: CaptureMode,
) -> Snapshot {
    Snapshot {
        id,
        name,
        source_instance_id: inst.id.clone(),
        source_instance_name: inst.name.clone(),
        created_at: svc.now(),
        image: inst.image.clone(),
        vcpus: inst.vcpus,
        memory_mb: inst.memory_mb,
        env: inst.env.clone(),
        entrypoint: inst.entrypoint.clone(),
        cmdline: inst.cmdline.clone().unwrap_or_default(),
        network: inst.network.clone(),
        size_bytes: sp.size_bytes(),
        standby_of: (mode == CaptureMode::Standby).then(|| inst.id.clone()),
        mailbox,
    }
}

/// A sparse copy of a memory file, off the async runtime.
pub(crate) async fn copy_memory(src: &std::path::Path, dst: &std::path::Path) -> Result<()> {
    let (s, d) = (src.to_path_buf(), dst.to_path_buf());
    tokio::task::spawn_blocking(move || sparse_copy(&s, &d))
        .await
        .map_err(|e| CoreError::Internal(format!("memory copy task: {e}")))?
        .map_err(CoreError::io("copying guest memory"))?;
    Ok(())
}

async fn current_mailbox(svc: &Services, inst: &Instance) -> Option<MailboxInfo> {
    let policy = CallPolicy::within(Duration::from_secs(3), Duration::from_secs(2));
    let socket = svc.paths(&inst.id).agent_socket;
    match svc.agent.health(&inst.id, &socket, policy).await {
        Ok(h) => mailbox_of(&h),
        Err(e) => {
            warn!(instance = %inst.id, error = %e, "no mailbox info for the snapshot");
            None
        }
    }
}
