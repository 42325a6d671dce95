//! Building the read-only erofs image from an unpacked tree with `mkfs.erofs`
//! (erofs-utils 1.5, Debian 12).
//!
//! Owners, modes and extended attributes are taken from the tree as they are
//! (no `--all-root`, xattrs enabled by default), mtimes are kept per file
//! (`--preserve-mtime`). The image is written to a temporary file next to `out`
//! and renamed over it only when `mkfs.erofs` succeeded, so `out` is either the
//! old file or a complete new image.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::OciError;

/// The program that builds the image.
pub const MKFS_EROFS: &str = "mkfs.erofs";

/// How to build the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErofsOptions {
    /// `None` (default): uncompressed, readable by every erofs kernel.
    /// `Some("lz4")` or `Some("lz4hc")`: smaller, needs `CONFIG_EROFS_FS_ZIP`
    /// (built into Debian's kernels).
    pub compressor: Option<String>,
    /// A fixed filesystem UUID (for reproducible images); random if `None`.
    pub uuid: Option<String>,
}

/// Builds an uncompressed erofs image of `root` at `out`; returns its size in bytes.
pub fn build_erofs(root: &Path, out: &Path) -> Result<u64, OciError> {
    build_erofs_with(root, out, &ErofsOptions::default())
}

/// [`build_erofs`] with options.
pub fn build_erofs_with(root: &Path, out: &Path, opts: &ErofsOptions) -> Result<u64, OciError> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| OciError::io("inspecting", root, e))?;
    if !meta.is_dir() {
        return Err(OciError::InvalidInput(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| OciError::io("creating a temporary image in", dir, e))?;
    run_mkfs(command(opts, tmp.path(), root)?)?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| OciError::io("syncing", tmp.path(), e))?;
    let size = tmp
        .as_file()
        .metadata()
        .map_err(|e| OciError::io("inspecting", tmp.path(), e))?
        .len();
    tmp.persist(out)
        .map_err(|e| OciError::io("renaming the image to", out, e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| OciError::io("syncing", dir, e))?;
    Ok(size)
}

fn command(opts: &ErofsOptions, image: &Path, root: &Path) -> Result<Command, OciError> {
    let mut cmd = Command::new(MKFS_EROFS);
    cmd.arg("--quiet").arg("--preserve-mtime");
    if let Some(c) = &opts.compressor {
        let algo = c.split(',').next().unwrap_or("");
        if !matches!(algo, "lz4" | "lz4hc") {
            return Err(OciError::InvalidInput(format!(
                "erofs compressor {c:?} is not supported (use lz4 or lz4hc)"
            )));
        }
        cmd.arg(format!("-z{c}"));
    }
    if let Some(u) = &opts.uuid {
        cmd.arg(format!("-U{u}"));
    }
    cmd.arg(image).arg(root);
    Ok(cmd)
}

fn run_mkfs(mut cmd: Command) -> Result<(), OciError> {
    let output = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| OciError::Erofs {
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                format!("{MKFS_EROFS} not found; install erofs-utils (apt-get install erofs-utils)")
            } else {
                format!("running {MKFS_EROFS} failed")
            },
            source: Some(e),
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("; ");
    Err(OciError::Erofs {
        reason: format!("{MKFS_EROFS} exited with {}: {tail}", output.status),
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_root_and_bad_compressor_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("img.erofs");
        let e = build_erofs(&tmp.path().join("nope"), &out).unwrap_err();
        assert_eq!(e.code(), "io");
        let opts = ErofsOptions {
            compressor: Some("xz".into()),
            uuid: None,
        };
        let e = build_erofs_with(tmp.path(), &out, &opts).unwrap_err();
        assert_eq!(e.code(), "invalid_input");
        assert!(!out.exists());
    }
}
