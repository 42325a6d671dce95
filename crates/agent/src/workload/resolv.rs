//! The name servers inside the image's root: the agent's own
//! `/etc/resolv.conf` (written at boot and by every handoff path from the
//! daemon's `--dns`) copied to `<root>/etc/resolv.conf`, so an OCI
//! workload resolves through the same servers as the guest.
//!
//! The image's `etc` must be a real directory: a symlinked `etc` would
//! make the write land in the agent's own root (the same rule as the
//! user lookup). A symlinked `resolv.conf` (systemd's stub, common in
//! images) is replaced by a regular file: `rename` replaces the link
//! itself, never its target.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use tracing::{debug, warn};

use super::mounts::{ROOT_DIR, image_root_mounted};

/// The agent's resolv.conf into `root`; `Ok(false)` when nothing changed
/// (no resolv.conf of the agent's, or the same text already there).
pub fn copy_into(root: &Path) -> io::Result<bool> {
    match std::fs::read("/etc/resolv.conf") {
        Ok(text) => write_into(root, &text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `text` as `<root>/etc/resolv.conf`, written then renamed into place.
pub fn write_into(root: &Path, text: &[u8]) -> io::Result<bool> {
    write_etc(root, "resolv.conf", text, 0o644)
}

/// `text` as `<root>/etc/<name>` (a plain file name), written then renamed
/// into place; `Ok(false)` when the same text is already there. `etc` must
/// be a real directory (created if missing); a symlink at `<name>` is
/// replaced, never followed.
pub fn write_etc(root: &Path, name: &str, text: &[u8], mode: u32) -> io::Result<bool> {
    let etc = root.join("etc");
    match std::fs::symlink_metadata(&etc) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory (a symlink?); refused", etc.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&etc)?,
        Err(e) => return Err(e),
    }
    let target = etc.join(name);
    let same = std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_file())
        && std::fs::read(&target).is_ok_and(|cur| cur == text);
    if same {
        return Ok(false);
    }
    let tmp = etc.join(format!(".{name}.forkvm"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(text)?;
    drop(f);
    std::fs::rename(&tmp, &target)?;
    Ok(true)
}

/// After the agent's resolv.conf changed (a handoff): the image root's
/// follows when a workload's root is mounted. Best effort: logged.
pub fn sync_if_mounted() {
    match image_root_mounted() {
        Ok(true) => match copy_into(Path::new(ROOT_DIR)) {
            Ok(changed) => debug!(changed, "image root resolv.conf synced"),
            Err(e) => warn!(error = %e, "writing the image root's resolv.conf failed"),
        },
        Ok(false) => {}
        Err(e) => warn!(error = %e, "reading the mount table failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_into_a_real_etc_replacing_a_symlinked_file() {
        let root = tempfile::tempdir().unwrap();
        assert!(write_into(root.path(), b"nameserver 10.0.0.53\n").unwrap());
        let file = root.path().join("etc/resolv.conf");
        assert_eq!(std::fs::read(&file).unwrap(), b"nameserver 10.0.0.53\n");
        assert!(
            !write_into(root.path(), b"nameserver 10.0.0.53\n").unwrap(),
            "same text"
        );

        // systemd's stub symlink: replaced, its target untouched.
        let outside = root.path().join("outside");
        std::fs::write(&outside, "keep").unwrap();
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&outside, &file).unwrap();
        assert!(write_into(root.path(), b"nameserver 10.0.0.54\n").unwrap());
        assert!(std::fs::symlink_metadata(&file).unwrap().is_file());
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    }

    #[test]
    fn a_symlinked_etc_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("etc")).unwrap();
        assert!(write_into(root.path(), b"nameserver 10.0.0.53\n").is_err());
        assert!(!elsewhere.path().join("resolv.conf").exists());
    }
}
