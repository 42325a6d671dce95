//! The images forkvm knows: listing, lookup, deletion (refused while
//! anything uses the image), and the start-up sweep of root disks no
//! record names.

use super::pull::{lock_key, parse};
use super::rootfs_path;
use crate::error::{CoreError, Result};
use crate::model::{ImageRecord, ImageStatus};
use crate::services::Services;
use std::collections::{BTreeMap, HashSet};
use tracing::{info, warn};

/// All images, oldest first, those with every tag in `tags` only.
pub(crate) fn list(svc: &Services, tags: &BTreeMap<String, String>) -> Result<Vec<ImageRecord>> {
    let all = annotated(svc, svc.store.list_images()?);
    Ok(all
        .into_iter()
        .filter(|i| tags.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
        .collect())
}

/// By name, normalized (`nginx` finds `docker.io/library/nginx:latest`).
pub(crate) fn get(svc: &Services, name: &str) -> Result<ImageRecord> {
    let key = key_of(name)?;
    annotated(svc, svc.store.list_images()?)
        .into_iter()
        .find(|i| i.name == key)
        .ok_or_else(|| CoreError::NotFound(format!("image {name:?} not found")))
}

/// Deletes image `name` and its root disk (unless another name of the same
/// image still uses it). Refused while it is being pulled or while an
/// instance or snapshot uses it.
pub(crate) async fn delete(svc: &Services, name: &str) -> Result<()> {
    let key = key_of(name)?;
    let _guard = svc.locks.acquire(&lock_key(&key)).await;
    let rec = svc
        .store
        .find_image(&key)?
        .ok_or_else(|| CoreError::NotFound(format!("image {name:?} not found")))?;
    if rec.status.in_progress() {
        return Err(CoreError::Conflict(format!(
            "image {key} is {}; delete it once it is ready or failed",
            rec.status.as_str()
        )));
    }
    let users = users_of(svc, &key)?;
    if !users.is_empty() {
        return Err(CoreError::Conflict(format!(
            "image {key} is used by {}; delete those first",
            users.join(", ")
        )));
    }
    svc.store.delete_image(&key)?;
    let others = svc.store.list_images()?;
    if let Some(hex) = rec.digest_hex()
        && !others.iter().any(|o| o.digest_hex() == Some(hex))
    {
        remove(&rootfs_path(svc, hex));
    }
    // A pull in flight may be using a blob no record names yet: its
    // unreferenced blobs go at the next delete or start.
    if !others.iter().any(|o| o.status.in_progress()) {
        let kept: HashSet<&String> = others.iter().flat_map(|o| &o.blobs).collect();
        let gone: Vec<String> = rec
            .blobs
            .iter()
            .filter(|b| !kept.contains(b))
            .cloned()
            .collect();
        svc.images.remove_blobs(&gone);
    }
    info!(image = %key, "image deleted");
    Ok(())
}

/// Root disks and cached blobs no image record names: left by a crash
/// between a conversion and its record, by a deletion cut short, or by
/// failed pulls. Runs at start, before interrupted pulls resume.
pub(crate) fn reconcile(svc: &Services) -> Result<()> {
    let records = svc.store.list_images()?;
    // Records of pulls that will resume may not name their blobs yet:
    // keep everything then (the next start or delete collects).
    if !records.iter().any(|r| r.status.in_progress()) {
        let kept: HashSet<&String> = records.iter().flat_map(|r| &r.blobs).collect();
        let unused: Vec<String> = svc
            .images
            .blobs()
            .into_iter()
            .filter(|b| !kept.contains(b))
            .collect();
        if !unused.is_empty() {
            info!(blobs = unused.len(), "removing cached blobs no image names");
            svc.images.remove_blobs(&unused);
        }
    }
    let Ok(rd) = std::fs::read_dir(super::rootfs_dir(svc)) else {
        return Ok(());
    };
    let known: HashSet<String> = svc
        .store
        .list_images()?
        .iter()
        .filter_map(|i| i.digest_hex().map(|h| format!("{h}.erofs")))
        .collect();
    for e in rd.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if !known.contains(&file) {
            info!(file = %file, "removing a root disk no image names");
            remove(&e.path());
        }
    }
    Ok(())
}

/// Instances and snapshots that boot from image `key`.
fn users_of(svc: &Services, key: &str) -> Result<Vec<String>> {
    let mut users: Vec<String> = svc
        .store
        .list_instances()?
        .into_iter()
        .filter(|i| i.image == key)
        .map(|i| format!("instance {}", i.name))
        .collect();
    users.extend(
        svc.store
            .list_snapshots()?
            .into_iter()
            .filter(|s| s.image == key)
            .map(|s| format!("snapshot {}", s.name.unwrap_or(s.id))),
    );
    Ok(users)
}

/// The name an image is recorded under; a name that is no reference
/// cannot be recorded, so it is simply not found.
fn key_of(name: &str) -> Result<String> {
    parse(name)
        .map(|r| r.to_string())
        .map_err(|_| CoreError::NotFound(format!("image {name:?} not found")))
}

/// Records with what is known only in memory: queue positions of pending
/// pulls and the progress of running ones.
fn annotated(svc: &Services, mut all: Vec<ImageRecord>) -> Vec<ImageRecord> {
    let mut ahead = 0;
    for i in all.iter_mut() {
        match i.status {
            ImageStatus::Pending => {
                i.queue_position = Some(ahead);
                ahead += 1;
            }
            ImageStatus::Pulling => i.progress = svc.pulls.get(&i.name),
            _ => {}
        }
    }
    all
}

fn remove(path: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "removing a root disk failed");
    }
}
