//! Bases: immutable guest-memory files on the memory directory, shared by
//! the snapshots that hold them and the copy-on-write VMs that map them.
//!
//! A base is never written after it is made (a private mapping still sees
//! later writes to pages it has not touched). Who refers to a base is
//! derived from the store every time — snapshots by `base_id`, and
//! instances that have a VMM with `Memory::Cow` — so there is no counter to
//! get out of step with a crash: [`collect`] removes every base nobody
//! refers to, after each operation and at start-up.

use crate::error::{CoreError, Result};
use crate::model::{Base, Memory};
use crate::services::{Services, new_id};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// The file of base `id`.
pub(crate) fn path(svc: &Services, id: &str) -> PathBuf {
    dir(svc).join(format!("{id}.mem"))
}

fn dir(svc: &Services) -> PathBuf {
    svc.cfg.mem_dir.join("bases")
}

fn ensure_dir(svc: &Services) -> Result<()> {
    let d = dir(svc);
    std::fs::create_dir_all(&d).map_err(CoreError::io(format!("create {}", d.display())))
}

/// A new base id and its (not yet existing) file; the directory exists.
pub(crate) fn allocate(svc: &Services) -> Result<(String, PathBuf)> {
    ensure_dir(svc)?;
    let id = new_id();
    let p = path(svc, &id);
    Ok((id, p))
}

/// The record of base `id` whose file is (or will be) `file`.
pub(crate) fn record(svc: &Services, id: &str, file: &Path) -> Base {
    Base {
        id: id.to_string(),
        size_bytes: crate::memory::allocated_bytes(file),
        created_at: svc.now(),
    }
}

/// Every base something refers to.
pub(crate) fn referenced(svc: &Services) -> Result<HashSet<String>> {
    let mut refs: HashSet<String> = svc
        .store
        .list_snapshots()?
        .iter()
        .map(|s| s.base().to_string())
        .collect();
    for i in svc.store.list_instances()? {
        if let (true, Memory::Cow { base }) = (i.state.has_vmm(), i.memory) {
            refs.insert(base);
        }
    }
    Ok(refs)
}

/// Whether anything but snapshot `except` refers to base `id`.
pub(crate) fn shared_beyond(svc: &Services, id: &str, except: &str) -> Result<bool> {
    let other_snapshot = svc
        .store
        .list_snapshots()?
        .iter()
        .any(|s| s.id != except && s.base() == id);
    let mapped = svc
        .store
        .list_instances()?
        .iter()
        .any(|i| i.state.has_vmm() && i.memory.base() == Some(id));
    Ok(other_snapshot || mapped)
}

/// Removes the bases nobody refers to any more (file and record).
pub(crate) fn collect(svc: &Services) {
    let (bases, refs) = match (svc.store.list_bases(), referenced(svc)) {
        (Ok(b), Ok(r)) => (b, r),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "base collection skipped");
            return;
        }
    };
    let unused = |b: &Base| !refs.contains(&b.id) && !svc.pins.is_pinned(&b.id);
    for b in bases.into_iter().filter(unused) {
        let _ = std::fs::remove_file(path(svc, &b.id));
        match svc.store.delete_base(&b.id) {
            Ok(()) => info!(base = %b.id, "base released"),
            Err(e) => warn!(base = %b.id, error = %e, "removing a base record failed"),
        }
    }
}

/// At start-up: memory files of snapshots recorded before bases existed
/// become bases of the snapshot's id; base files without a record (a crash
/// between making the file and recording it) are removed.
pub(crate) fn reconcile(svc: &Services) -> Result<()> {
    let known: HashSet<String> = svc.store.list_bases()?.into_iter().map(|b| b.id).collect();
    for snap in svc.store.list_snapshots()? {
        if snap.base_id.is_some() || known.contains(&snap.id) {
            continue;
        }
        let legacy = svc.snapshot_paths(&snap.id).legacy_mem;
        ensure_dir(svc)?;
        let to = path(svc, &snap.id);
        if legacy.exists() {
            std::fs::rename(&legacy, &to)
                .map_err(CoreError::io("moving snapshot memory into a base"))?;
        }
        svc.store.insert_base(&record(svc, &snap.id, &to))?;
        info!(snapshot = %snap.id, "snapshot memory upgraded to a base");
    }
    let mut known: HashSet<String> = svc.store.list_bases()?.into_iter().map(|b| b.id).collect();
    // A handover cut short holds its VM's memory under a base name that has
    // no record yet: adoption finishes or undoes it.
    known.extend(
        svc.store
            .list_instances()?
            .into_iter()
            .filter_map(|i| i.handover),
    );
    if let Ok(rd) = std::fs::read_dir(dir(svc)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".mem").unwrap_or(&name);
            if !known.contains(id) {
                warn!(file = %name, "removing a base file without a record");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    collect(svc);
    Ok(())
}

/// Gives back the memory of all-zero pages of an immutable base (reading a
/// copy-on-write VM's RAM, as a live migration does, allocates the base's
/// holes on tmpfs). Content-preserving, so safe while VMs map it.
pub(crate) async fn trim(file: PathBuf) {
    let f = file.clone();
    match tokio::task::spawn_blocking(move || crate::memory::punch_zero_pages(&f)).await {
        Ok(Ok(freed)) if freed > 0 => {
            info!(file = %file.display(), freed_mib = freed >> 20, "zero pages returned")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(file = %file.display(), error = %e, "trimming a base failed"),
        Err(e) => warn!(file = %file.display(), error = %e, "trimming task failed"),
    }
}
