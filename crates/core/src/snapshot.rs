//! Stored snapshots: taking one of a Running or Standby instance, deleting,
//! and removing a snapshot's files with its record.

use crate::capture::{CaptureMode, capture};
use crate::error::{CoreError, Result};
use crate::model::{InstanceState, Snapshot};
use crate::services::{Services, new_id};
use std::collections::BTreeMap;
use tracing::warn;

/// Remove a snapshot's files and record (no checks). Its base goes when
/// nothing else refers to it ([`crate::bases::collect`]).
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
    tags: BTreeMap<String, String>,
) -> Result<Snapshot> {
    if let Some(n) = &name {
        crate::validate_name(n)?;
        if svc.store.find_snapshot(n)?.is_some() {
            return Err(CoreError::Conflict(format!(
                "a snapshot named {n:?} already exists"
            )));
        }
    }
    let (_guard, mut inst) = svc.lock_instance(id_or_name).await?;
    match inst.state {
        InstanceState::Running => {
            let mut c = capture(svc, &mut inst, name, CaptureMode::Copy).await?;
            c.snap.tags = tags;
            let new_base = (!c.base_recorded).then_some(&c.base);
            svc.store
                .insert_snapshot_with_base(&c.snap, new_base)
                .inspect_err(|_| c.discard(svc))?;
            Ok(c.snap)
        }
        InstanceState::Standby => {
            let own = svc.find_snapshot(inst.snapshot_id.as_deref().unwrap_or_default())?;
            copy_of(svc, own, name, tags)
        }
        s => Err(CoreError::Conflict(format!(
            "instance {} is {}; only Running or Standby instances can be snapshotted",
            inst.name,
            s.as_str()
        ))),
    }
}

/// A second snapshot of the same machine state (a Standby instance's own
/// snapshot is consumed when it is restored): its own copy of the device
/// state, the same base — no memory is copied.
pub(crate) fn share(
    svc: &Services,
    of: &Snapshot,
    make: impl FnOnce(String) -> Snapshot,
) -> Result<Snapshot> {
    let from = svc.snapshot_paths(&of.id);
    let sid = new_id();
    let sp = svc.snapshot_paths(&sid);
    let snap = make(sid);
    let filed = (|| {
        sp.prepare()?;
        std::fs::copy(&from.state, &sp.state).map_err(CoreError::io("copying device state"))?;
        svc.store.insert_snapshot(&snap)
    })();
    if let Err(e) = filed {
        sp.remove();
        return Err(e);
    }
    Ok(snap)
}

fn copy_of(
    svc: &Services,
    own: Snapshot,
    name: Option<String>,
    tags: BTreeMap<String, String>,
) -> Result<Snapshot> {
    share(svc, &own, |id| Snapshot {
        id,
        name,
        tags,
        created_at: svc.now(),
        standby_of: None,
        base_id: Some(own.base().to_string()),
        ..own.clone()
    })
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
