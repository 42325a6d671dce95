//! Stored snapshots: taking one of a Running or Standby instance, deleting,
//! and removing a snapshot's files with its record.

use crate::capture::{CaptureMode, capture, copy_memory};
use crate::error::{CoreError, Result};
use crate::model::{InstanceState, Snapshot};
use crate::services::{Services, new_id};
use tracing::warn;

/// Remove a snapshot's files and record (no checks).
pub(crate) fn remove(svc: &Services, sid: &str) {
    svc.snapshot_paths(sid).remove();
    if let Err(e) = svc.store.delete_snapshot(sid) {
        warn!(snapshot = sid, error = %e, "deleting snapshot record failed");
    }
}

/// Snapshot a Running (paused briefly) or Standby instance.
pub(crate) async fn create(
    svc: &Services,
    id_or_name: &str,
    name: Option<String>,
) -> Result<Snapshot> {
    if let Some(n) = &name {
        crate::validate_name(n)?;
        if svc.store.find_snapshot(n)?.is_some() {
            return Err(CoreError::Conflict(format!(
                "a snapshot named {n:?} already exists"
            )));
        }
    }
    let (_guard, inst) = svc.lock_instance(id_or_name).await?;
    match inst.state {
        InstanceState::Running => {
            let c = capture(svc, &inst, name, CaptureMode::Copy).await?;
            svc.store
                .insert_snapshot(&c.snap)
                .inspect_err(|_| c.paths.remove())?;
            Ok(c.snap)
        }
        InstanceState::Standby => {
            let own = svc.find_snapshot(inst.snapshot_id.as_deref().unwrap_or_default())?;
            copy_of(svc, own, name).await
        }
        s => Err(CoreError::Conflict(format!(
            "instance {} is {}; only Running or Standby instances can be snapshotted",
            inst.name,
            s.as_str()
        ))),
    }
}

/// An independent copy of a snapshot (a Standby instance's own, which it
/// consumes when restored).
async fn copy_of(svc: &Services, own: Snapshot, name: Option<String>) -> Result<Snapshot> {
    let from = svc.snapshot_paths(&own.id);
    let sid = new_id();
    let sp = svc.snapshot_paths(&sid);
    let copied = async {
        sp.prepare()?;
        std::fs::copy(&from.state, &sp.state).map_err(CoreError::io("copying device state"))?;
        copy_memory(&from.mem, &sp.mem).await
    }
    .await;
    if let Err(e) = copied {
        sp.remove();
        return Err(e);
    }
    let snap = Snapshot {
        id: sid,
        name,
        created_at: svc.now(),
        size_bytes: sp.size_bytes(),
        standby_of: None,
        ..own
    };
    svc.store
        .insert_snapshot(&snap)
        .inspect_err(|_| sp.remove())?;
    Ok(snap)
}

/// Delete a snapshot; a Standby instance's own snapshot can't be deleted
/// (delete or restore the instance instead).
pub(crate) async fn delete(svc: &Services, id_or_name: &str) -> Result<()> {
    let snap = svc.find_snapshot(id_or_name)?;
    if let Some(owner) = &snap.standby_of {
        return Err(CoreError::Conflict(format!(
            "snapshot {} holds Standby instance {owner}; restore or delete the instance instead",
            snap.id
        )));
    }
    let _guard = svc.locks.acquire(&snap.id).await;
    remove(svc, &snap.id);
    Ok(())
}
