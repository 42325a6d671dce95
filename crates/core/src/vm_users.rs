//! One unprivileged user per instance for its QEMU (`forkvm_vmm::VmUser`).
//!
//! Uids come from a range (`--vm-uid-base`: the base is the group every
//! VM user is in, uids follow it), claimed in the store's allocations
//! (kind `vm_uid`, value the uid) the first time the instance gets a VMM,
//! so adoption after a daemon crash and every later VMM generation
//! (restore, handover, promotion, the capture helper) use the same uid,
//! and freed with the instance record (the allocations go with it). Its
//! files die with it; what outlives it (bases, frozen disk layers) is made
//! root's when frozen or mapped.
//!
//! The daemon directories a QEMU reaches by path — only the writable
//! disk's qcow2 chain: `<data_dir>` and `<data_dir>/layers` (with
//! `templates`) — are 0710 with the VM group: traversable, not listable.
//! Everything else QEMU gets as fds and the directories stay 0700.

use crate::error::{CoreError, Result};
use crate::services::Services;
use crate::store::AllocKind;
use forkvm_vmm::VmUser;
use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The default first id of the range (the VM group; uids follow).
pub const DEFAULT_VM_UID_BASE: u32 = 900_000;
/// How many uids the range holds by default: at most this many instances
/// with a VMM user at once.
pub const DEFAULT_VM_UID_COUNT: u32 = 65_536;

/// The uid range VMs run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmUsers {
    base: u32,
    count: u32,
}

impl VmUsers {
    /// `count` uids after `base`; `base` is the VM group's gid.
    pub fn new(base: u32, count: u32) -> std::result::Result<Self, String> {
        if base < 1000 {
            return Err(format!(
                "VM uid base {base} is below 1000 (system accounts)"
            ));
        }
        if count == 0 || base.checked_add(count).is_none_or(|e| e >= u32::MAX - 1) {
            return Err(format!("VM uid range {base}+{count} does not fit"));
        }
        Ok(Self { base, count })
    }

    /// The group of every VM user.
    pub fn gid(&self) -> u32 {
        self.base
    }

    fn uid(&self, slot: u32) -> u32 {
        self.base + 1 + slot
    }
}

/// The user instance `id`'s QEMU runs as (`None`: VM users are off): the
/// one it holds, else the lowest free uid, claimed now.
pub(crate) fn user_of(svc: &Services, id: &str) -> Result<Option<VmUser>> {
    let Some(r) = svc.cfg.vm_users else {
        return Ok(None);
    };
    let user = |uid| Some(VmUser { uid, gid: r.gid() });
    if let Some(uid) = held(svc, id)? {
        return Ok(user(uid));
    }
    // The primary key decides between racing claims: a lost one moves on
    // to the next free uid.
    let taken: HashSet<String> = svc
        .store
        .allocated(AllocKind::VmUid)?
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    for uid in (0..r.count).map(|s| r.uid(s)) {
        if !taken.contains(&uid.to_string())
            && svc
                .store
                .try_allocate(AllocKind::VmUid, &uid.to_string(), id)?
        {
            return Ok(user(uid));
        }
    }
    Err(CoreError::Exhausted(format!(
        "all {} VM uids from {} are in use",
        r.count,
        r.uid(0)
    )))
}

/// The uid instance `id` holds, if any.
pub(crate) fn held(svc: &Services, id: &str) -> Result<Option<u32>> {
    Ok(svc
        .store
        .allocations_of(id)?
        .into_iter()
        .find(|(k, _)| k == AllocKind::VmUid.as_str())
        .and_then(|(_, v)| v.parse().ok()))
}

/// Makes a daemon directory traversable by the VM group (0710, group
/// `gid`), creating it first if needed.
pub(crate) fn share_dir(dir: &Path, gid: u32) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(CoreError::io(format!("create {}", dir.display())))?;
    let m = std::fs::symlink_metadata(dir)
        .map_err(CoreError::io(format!("inspect {}", dir.display())))?;
    if !m.file_type().is_dir() {
        return Err(CoreError::Invalid(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if m.gid() != gid {
        std::os::unix::fs::chown(dir, None, Some(gid))
            .map_err(CoreError::io(format!("chgrp {}", dir.display())))?;
    }
    if m.mode() & 0o7777 != 0o710 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
            .map_err(CoreError::io(format!("chmod {}", dir.display())))?;
    }
    Ok(())
}

/// At start-up: the directories on the path to disk layers (`share_dir`);
/// refuses to run VM users when the daemon is not root.
pub(crate) fn prepare_dirs(cfg: &crate::config::Config) -> Result<()> {
    let Some(r) = cfg.vm_users else {
        return Ok(());
    };
    if !nix::unistd::geteuid().is_root() {
        return Err(CoreError::Invalid(
            "running VMs as unprivileged users needs a root daemon (or --vm-user off)".into(),
        ));
    }
    let layers = cfg.data_dir.join("layers");
    for d in [
        cfg.data_dir.clone(),
        layers.clone(),
        layers.join("templates"),
    ] {
        share_dir(&d, r.gid())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert!(VmUsers::new(999, 10).is_err());
        assert!(VmUsers::new(u32::MAX - 10, 100).is_err());
        assert!(VmUsers::new(900_000, 0).is_err());
        let r = VmUsers::new(900_000, 10).unwrap();
        assert_eq!((r.gid(), r.uid(0), r.uid(9)), (900_000, 900_001, 900_010));
    }

    #[test]
    fn a_shared_dir_is_0710_with_the_group() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("layers");
        let gid = nix::unistd::getegid().as_raw();
        share_dir(&d, gid).unwrap();
        let m = std::fs::metadata(&d).unwrap();
        assert_eq!((m.mode() & 0o7777, m.gid()), (0o710, gid));
    }
}
