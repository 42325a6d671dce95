//! The daemon's state and memory directories hold every tenant's guest
//! memory, disks, consoles and the store: they must be the daemon's own and
//! closed to other local users. A directory someone else created first (or
//! a symlink planted where it should be) is refused rather than used.

use crate::error::{CoreError, Result};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (mode 0700) if it is missing; checks an existing one is a
/// directory (not a symlink) owned by this process's user, and closes it
/// to group and others.
pub(crate) fn ensure(dir: &Path) -> Result<()> {
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(CoreError::io(format!("create {}", dir.display())))?;
    }
    let m = std::fs::symlink_metadata(dir)
        .map_err(CoreError::io(format!("inspect {}", dir.display())))?;
    if !m.file_type().is_dir() {
        return Err(CoreError::Invalid(format!(
            "{} is not a directory (a symlink or a file): remove it or choose another path",
            dir.display()
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(CoreError::Invalid(format!(
            "{} belongs to uid {}, not to the daemon's user (uid {me}): remove it or choose another path",
            dir.display(),
            m.uid()
        )));
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(CoreError::io(format!("restrict {}", dir.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn creates_private_and_tightens_own() {
        let t = tempfile::tempdir().unwrap();
        let new = t.path().join("a/b");
        ensure(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        ensure(&open).unwrap();
        assert_eq!(mode(&open), 0o700);
    }

    #[test]
    fn refuses_symlinks_files_and_foreign_directories() {
        let t = tempfile::tempdir().unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        assert!(matches!(ensure(&link), Err(CoreError::Invalid(_))));
        let file = t.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(ensure(&file), Err(CoreError::Invalid(_))));
        if nix::unistd::geteuid().is_root() {
            let foreign = t.path().join("foreign");
            std::fs::create_dir(&foreign).unwrap();
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
            let e = ensure(&foreign).unwrap_err();
            assert!(e.to_string().contains("uid 65534"), "{e}");
        }
    }
}
