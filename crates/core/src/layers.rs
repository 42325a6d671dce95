//! Disk layers: the writable disk of an instance that runs an image.
//!
//! The disk is a chain of qcow2 files under `<data_dir>/layers/`, bottom to
//! top: an empty ext4 template of the disk's size (one per size, shared by
//! everyone, never written), then frozen layers, then the instance's top,
//! the only file its VMM writes. Capturing a VM (fork from running,
//! snapshot, standby) **freezes** its top at the instant its memory is
//! captured — the VM paused, its I/O drained — and the VM writes on in a
//! new, empty top over it. Every fork starts on an empty top of its own over
//! the frozen layer: no copy on the fork path, whatever was written.
//!
//! Who uses a layer is derived from the store each time, like bases:
//! instances by `disk_top` (and `handover_disk`), snapshots by
//! `disk_layer`, and every layer below one of those. [`collect`] removes the
//! rest — a layer is recorded before its file exists, so a crash at any
//! point leaves only records or files nobody refers to.
//!
//! Chains grow by one layer per capture of a running VM; [`flatten`] copies
//! a running VM's chain into its top (QEMU's `block-stream`) once it is
//! deeper than `Config::disk_max_depth`, in the background.

use crate::error::{CoreError, Result};
use crate::model::{Instance, Layer};
use crate::services::{Pin, Services, new_id};
use forkvm_vmm::VmHandle;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use tracing::{info, warn};

fn dir(svc: &Services) -> PathBuf {
    svc.cfg.data_dir.join("layers")
}

/// The qcow2 file of layer `id`.
pub(crate) fn path(svc: &Services, id: &str) -> PathBuf {
    dir(svc).join(format!("{id}.qcow2"))
}

/// The scratch top of a capture helper (`crate::capture`), VM `vm_id`;
/// removed after it, or at start-up as a layer file without a record.
pub(crate) fn scratch_path(svc: &Services, vm_id: &str) -> PathBuf {
    dir(svc).join(format!("scratch-{vm_id}.qcow2"))
}

/// The empty ext4 filesystem every chain of `size_mib` starts from.
pub(crate) fn template_path(svc: &Services, size_mib: u64) -> PathBuf {
    dir(svc)
        .join("templates")
        .join(format!("ext4-{size_mib}.raw"))
}

/// The template of `size_mib`, made once: a sparse file formatted by
/// `mkfs.ext4` into a temporary name, then renamed (never half-made).
pub(crate) async fn ensure_template(svc: &Services, size_mib: u64) -> Result<PathBuf> {
    let p = template_path(svc, size_mib);
    if p.exists() {
        return Ok(p);
    }
    let d = p.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&d).map_err(CoreError::io(format!("create {}", d.display())))?;
    let tmp = d.join(format!(".ext4-{size_mib}-{}.tmp", new_id()));
    std::fs::File::create(&tmp)
        .and_then(|f| f.set_len(size_mib << 20))
        .map_err(CoreError::io(format!("create {}", tmp.display())))?;
    // No reserved blocks (the guest's writes are the user's) and lazy
    // inode tables (formatting stays O(1) in the disk size).
    let out = tokio::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E"])
        .arg("lazy_itable_init=1,lazy_journal_init=1")
        .arg(&tmp)
        .output()
        .await;
    let formatted = match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(CoreError::Internal(format!(
            "mkfs.ext4 failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Err(CoreError::io("running mkfs.ext4 (e2fsprogs)")(e)),
    };
    if let Err(e) = formatted.and_then(|()| {
        std::fs::rename(&tmp, &p).map_err(CoreError::io("installing the disk template"))
    }) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    info!(size_mib, file = %p.display(), "disk template made");
    Ok(p)
}

/// A new, empty top over `parent` (or the template): recorded, then made.
/// The pin keeps it from collection until a record refers to it.
pub(crate) async fn new_top(
    svc: &Services,
    parent: Option<&str>,
    size_mib: u64,
) -> Result<(String, Pin)> {
    let template = ensure_template(svc, size_mib).await?;
    let id = new_id();
    let layer = Layer {
        id: id.clone(),
        parent: parent.map(str::to_string),
        size_mib,
        created_at: svc.now(),
    };
    let pin = svc.pins.pin(&id);
    svc.store.insert_layer(&layer)?;
    let (backing, format) = match parent {
        Some(p) => (path(svc, p), "qcow2"),
        None => (template, "raw"),
    };
    svc.hv
        .create_overlay(&path(svc, &id), &backing, format, size_mib << 20)
        .await
        .map_err(CoreError::vmm("creating a disk layer"))?;
    Ok((id, pin))
}

/// Records the layer a freeze of `top` will create (QEMU makes the file),
/// pinned until the instance's record refers to it.
pub(crate) fn plan_freeze(svc: &Services, top: &str) -> Result<(Layer, Pin)> {
    let cur = find(svc, top)?;
    let next = Layer {
        id: new_id(),
        parent: Some(top.to_string()),
        size_mib: cur.size_mib,
        created_at: svc.now(),
    };
    let pin = svc.pins.pin(&next.id);
    svc.store.insert_layer(&next)?;
    Ok((next, pin))
}

/// Freezes the writable disk of `inst` (paused on `vm`): its top becomes a
/// frozen layer, which is returned, and the instance (re-read and stored)
/// goes on in a new top. `None` without a disk.
pub(crate) async fn freeze(
    svc: &Services,
    inst: &Instance,
    vm: &VmHandle,
) -> Result<Option<String>> {
    let Some(top) = inst.disk_top.clone() else {
        return Ok(None);
    };
    let (next, _pin) = plan_freeze(svc, &top)?;
    svc.hv
        .freeze_disk(vm, &path(svc, &next.id))
        .await
        .map_err(CoreError::vmm("freezing the writable disk"))?;
    switch_top(svc, &inst.id, &next.id)?;
    Ok(Some(top))
}

/// After a migration asked to freeze the disk onto `next`: if the VMM now
/// writes `next`, the instance (re-read and stored) goes on there and its
/// old top — returned — is frozen. Otherwise nothing changed (the unused
/// record of `next` is collected).
pub(crate) async fn settle_freeze(
    svc: &Services,
    inst: &Instance,
    vm: &VmHandle,
    next: &Layer,
) -> Result<Option<String>> {
    let file = path(svc, &next.id);
    let now = svc
        .hv
        .disk_top(vm)
        .await
        .map_err(CoreError::vmm("asking the VMM for its disk"))?;
    if now.as_deref() != Some(file.as_path()) {
        return Ok(None);
    }
    switch_top(svc, &inst.id, &next.id)?;
    Ok(next.parent.clone())
}

/// The instance's record now has `top` as its disk top.
pub(crate) fn switch_top(svc: &Services, id: &str, top: &str) -> Result<()> {
    let mut rec = svc.find(id)?;
    rec.disk_top = Some(top.to_string());
    svc.store.update_instance(&rec)
}

/// The disk size (MiB) of the chain layer `id` belongs to.
pub(crate) fn size_of(svc: &Services, id: &str) -> Result<u64> {
    Ok(find(svc, id)?.size_mib)
}

fn find(svc: &Services, id: &str) -> Result<Layer> {
    svc.store
        .find_layer(id)?
        .ok_or_else(|| CoreError::Internal(format!("disk layer {id} has no record")))
}

/// How many layers (the top included) lie above the template.
pub(crate) fn depth(svc: &Services, top: &str) -> Result<usize> {
    let all: HashMap<String, Layer> = svc
        .store
        .list_layers()?
        .into_iter()
        .map(|l| (l.id.clone(), l))
        .collect();
    Ok(chain(&all, top).len())
}

/// `top` and the layers below it, top first (stops at a missing record or
/// a cycle, which the store never holds).
fn chain<'a>(all: &'a HashMap<String, Layer>, top: &'a str) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    let mut cur = Some(top);
    while let Some(id) = cur {
        if out.contains(&id) {
            break;
        }
        out.push(id);
        cur = all.get(id).and_then(|l| l.parent.as_deref());
    }
    out
}

/// Every layer something refers to, with the layers below them.
fn in_use(svc: &Services, all: &HashMap<String, Layer>) -> Result<HashSet<String>> {
    let mut roots: Vec<String> = Vec::new();
    for i in svc.store.list_instances()? {
        roots.extend(i.disk_top);
        roots.extend(i.handover_disk);
    }
    roots.extend(
        svc.store
            .list_snapshots()?
            .into_iter()
            .filter_map(|s| s.disk_layer),
    );
    roots.extend(
        svc.pins
            .pinned()
            .into_iter()
            .filter(|p| all.contains_key(p)),
    );
    Ok(roots
        .iter()
        .flat_map(|r| chain(all, r))
        .map(str::to_string)
        .collect())
}

/// Every layer in use (for checks).
#[cfg(test)]
pub(crate) fn used(svc: &Services) -> Result<HashSet<String>> {
    let all: HashMap<String, Layer> = svc
        .store
        .list_layers()?
        .into_iter()
        .map(|l| (l.id.clone(), l))
        .collect();
    in_use(svc, &all)
}

/// The layer record `id` (for checks).
#[cfg(test)]
pub(crate) fn get(svc: &Services, id: &str) -> Result<Layer> {
    find(svc, id)
}

/// Removes the layers nobody uses (file, then record).
pub(crate) fn collect(svc: &Services) {
    let all: HashMap<String, Layer> = match svc.store.list_layers() {
        Ok(l) => l.into_iter().map(|l| (l.id.clone(), l)).collect(),
        Err(e) => {
            warn!(error = %e, "layer collection skipped");
            return;
        }
    };
    let used = match in_use(svc, &all) {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "layer collection skipped");
            return;
        }
    };
    for id in all.keys().filter(|id| !used.contains(*id)) {
        let _ = std::fs::remove_file(path(svc, id));
        match svc.store.delete_layer(id) {
            Ok(()) => info!(layer = %id, "disk layer released"),
            Err(e) => warn!(layer = %id, error = %e, "removing a layer record failed"),
        }
    }
}

/// At start-up (nothing in flight): layer files without a record (a crash
/// between recording a layer's removal and its file's) go, then every
/// unused layer.
pub(crate) fn reconcile(svc: &Services) -> Result<()> {
    let known: HashSet<String> = svc.store.list_layers()?.into_iter().map(|l| l.id).collect();
    if let Ok(rd) = std::fs::read_dir(dir(svc)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".qcow2")
                && !known.contains(id)
            {
                warn!(file = %name, "removing a layer file without a record");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    collect(svc);
    Ok(())
}

/// Copies the chain of a running instance into its top when it is deeper
/// than the configured limit, so reads never walk long chains. The layers
/// below become unused by it (others may still use them).
pub(crate) async fn flatten_if_deep(svc: &Services, inst: &Instance, vm: &VmHandle) -> Result<()> {
    let Some(top) = inst.disk_top.as_deref() else {
        return Ok(());
    };
    let depth = depth(svc, top)?;
    if depth <= svc.cfg.disk_max_depth {
        return Ok(());
    }
    let layer = find(svc, top)?;
    let template = template_path(svc, layer.size_mib);
    let t = std::time::Instant::now();
    svc.hv
        .flatten_disk(vm, &template)
        .await
        .map_err(CoreError::vmm("flattening the writable disk"))?;
    svc.store.insert_layer(&Layer {
        parent: None,
        ..layer
    })?;
    info!(instance = %inst.id, depth, took_ms = t.elapsed().as_secs_f64() * 1000.0,
          "disk chain flattened");
    collect(svc);
    Ok(())
}

/// [`flatten_if_deep`] for instance `id` in the background, under its lock
/// (a capture waits for it; a deep chain is rare and flattening bounded by
/// what the layers hold).
pub(crate) fn flatten_later(svc: &std::sync::Arc<Services>, id: &str) {
    // Most chains are shallow: no task, no lock taken behind the caller's back.
    let deep = |top: &str| depth(svc, top).unwrap_or(0) > svc.cfg.disk_max_depth;
    let Ok(inst) = svc.find(id) else { return };
    if !inst.disk_top.as_deref().is_some_and(deep) {
        return;
    }
    let (svc, id) = (svc.clone(), inst.id);
    tokio::spawn(async move {
        let guard = svc.locks.acquire(&id).await;
        // Re-read under the lock; flatten_if_deep checks the depth again.
        let Ok(inst) = svc.find(&id) else { return };
        let Some(pid) = inst.pid.filter(|_| inst.state.has_vmm()) else {
            return;
        };
        let vm = svc.handle(&inst, pid);
        if let Err(e) = flatten_if_deep(&svc, &inst, &vm).await {
            warn!(instance = %id, error = %e, "flattening the disk chain failed");
        }
        drop(guard);
    });
}

/// After a daemon restart: the running VMM is the truth about which file
/// its disk writes to (a crash may have come between a freeze and its
/// record, or during a flatten). Updates the instance's record to match.
pub(crate) async fn reconcile_top(
    svc: &Services,
    inst: &mut Instance,
    vm: &VmHandle,
) -> Result<()> {
    let Some(top) = inst.disk_top.clone() else {
        return Ok(());
    };
    let actual = match svc.hv.disk_top(vm).await {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(()),
        Err(e) => {
            warn!(instance = %inst.id, error = %e, "could not ask the VMM for its disk");
            return Ok(());
        }
    };
    if actual == path(svc, &top) {
        return Ok(());
    }
    let known = svc.store.list_layers()?;
    let Some(l) = known.iter().find(|l| path(svc, &l.id) == actual) else {
        warn!(instance = %inst.id, file = %actual.display(), "the VMM writes a disk file forkvm does not know");
        return Ok(());
    };
    info!(instance = %inst.id, from = %top, to = %l.id, "disk top reconciled with the VMM");
    inst.disk_top = Some(l.id.clone());
    svc.store.update_instance(inst)
}
