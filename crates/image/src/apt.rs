//! Resolving and downloading the kernel package with the system's apt tools.
//!
//! `apt-cache` costs 1–1.5 s per call on these hosts (the binary package cache is
//! disabled), which would blow the < 1 s cache-hit budget, so resolutions are remembered
//! in `cache/kernel/resolve.json` keyed by a stamp of apt's inputs (lists + sources +
//! preferences: name, size, mtime). Any `apt-get update` changes the stamp.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{ImageError, Progress};

pub const METAPACKAGE: &str = "linux-image-amd64";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub package: String,
    pub version: String,
}

#[derive(Serialize, Deserialize)]
struct ResolveCache {
    request: String,
    stamp: String,
    resolved: Resolved,
}

/// Resolves `requested` (or the metapackage's dependency) to a concrete package+version.
pub fn resolve(cache_dir: &Path, requested: Option<&str>) -> Result<Resolved, ImageError> {
    let request = requested.unwrap_or(METAPACKAGE).to_string();
    let stamp = apt_stamp();
    let cache_file = cache_dir.join("resolve.json");
    if let Ok(text) = fs::read_to_string(&cache_file)
        && let Ok(c) = serde_json::from_str::<ResolveCache>(&text)
        && c.request == request
        && c.stamp == stamp
    {
        tracing::debug!(package = %c.resolved.package, version = %c.resolved.version, "apt resolution from cache");
        return Ok(c.resolved);
    }
    let resolved = match resolve_uncached(requested) {
        Ok(r) => r,
        Err(first) => {
            // Empty or stale lists on a fresh machine: update once, then retry.
            tracing::warn!(error = %first, "kernel package not resolvable; running apt-get update once");
            run(Command::new("apt-get").args(["update", "-q"]))?;
            resolve_uncached(requested)?
        }
    };
    tracing::info!(package = %resolved.package, version = %resolved.version, "resolved kernel package");
    let entry = ResolveCache {
        request,
        // Recompute: an `apt-get update` above changed it.
        stamp: apt_stamp(),
        resolved: resolved.clone(),
    };
    // Best effort: failing to cache only costs time next run.
    if let Ok(json) = serde_json::to_vec_pretty(&entry) {
        let _ = fs::create_dir_all(cache_dir).and_then(|_| crate::write_atomic(&cache_file, &json));
    }
    Ok(resolved)
}

fn resolve_uncached(requested: Option<&str>) -> Result<Resolved, ImageError> {
    let package = match requested {
        Some(p) => p.to_string(),
        None => {
            let out = run(Command::new("apt-cache").args(["depends", METAPACKAGE]))?;
            parse_depends(&out).ok_or_else(|| {
                ImageError::Resolve(format!("no linux-image-* dependency of {METAPACKAGE}"))
            })?
        }
    };
    let out = run(Command::new("apt-cache").args(["policy", &package]))?;
    let version = parse_candidate(&out)
        .ok_or_else(|| ImageError::Resolve(format!("no installable candidate for {package}")))?;
    Ok(Resolved { package, version })
}

/// First `Depends: linux-image-…` line of `apt-cache depends`.
pub fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|d| d.trim().trim_start_matches('|').trim())
        .find(|d| d.starts_with("linux-image-") && !d.contains(' '))
        .map(str::to_string)
}

/// `Candidate:` of `apt-cache policy`, unless `(none)`.
pub fn parse_candidate(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
}

fn apt_stamp() -> String {
    let mut h = Sha256::new();
    let mut entries: Vec<PathBuf> = Vec::new();
    for dir in [
        "/var/lib/apt/lists",
        "/etc/apt/sources.list.d",
        "/etc/apt/preferences.d",
    ] {
        if let Ok(rd) = fs::read_dir(dir) {
            entries.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    entries.push("/etc/apt/sources.list".into());
    entries.push("/etc/apt/preferences".into());
    entries.sort();
    for p in entries {
        if let Ok(md) = fs::metadata(&p)
            && md.is_file()
        {
            h.update(p.as_os_str().as_encoded_bytes());
            h.update(md.len().to_le_bytes());
            h.update(md.mtime().to_le_bytes());
            h.update(md.mtime_nsec().to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Downloads `pkg=version` with `apt-get download` into `dest_dir` unless a matching
/// `.deb` is already there; returns its path. The file appears under its final name only
/// once complete (downloaded into a private subdirectory, then renamed).
pub fn download(
    dest_dir: &Path,
    resolved: &Resolved,
    progress: &dyn Progress,
) -> Result<PathBuf, ImageError> {
    if let Some(existing) = find_deb(dest_dir, &resolved.package)? {
        tracing::info!(deb = %existing.display(), "kernel package already downloaded");
        return Ok(existing);
    }
    let spec = format!("{}={}", resolved.package, resolved.version);
    // `--print-uris` gives the expected size for the progress bar without downloading.
    let total = run(Command::new("apt-get").args(["download", "--print-uris", &spec]))
        .ok()
        .and_then(|o| {
            o.split_whitespace()
                .nth(2)
                .and_then(|s| s.parse::<u64>().ok())
        });
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dest_dir)
        .map_err(|e| ImageError::io(dest_dir, e))?;
    tracing::info!(package = %spec, size = ?total, "downloading kernel package");
    let mut child = Command::new("apt-get")
        // Root downloads into a directory _apt can't write to; skip the sandbox warning.
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", &spec])
        .current_dir(tmp.path())
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Command {
            command: "apt-get download".into(),
            detail: e.to_string(),
        })?;
    // Poll the growing file for the progress bar until apt exits (the exit is the real signal).
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => {
                return Err(ImageError::Command {
                    command: "apt-get download".into(),
                    detail: e.to_string(),
                });
            }
        }
        progress.bytes(dir_size(tmp.path()), total);
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    if !status.success() {
        return Err(ImageError::Command {
            command: format!("apt-get download {spec}"),
            detail: format!("{status}: {}", stderr.trim()),
        });
    }
    let deb = find_deb(tmp.path(), &resolved.package)?.ok_or_else(|| ImageError::Command {
        command: format!("apt-get download {spec}"),
        detail: "no .deb produced".into(),
    })?;
    let file_name = deb.file_name().map(PathBuf::from).unwrap_or_default();
    let final_path = dest_dir.join(file_name);
    fs::rename(&deb, &final_path).map_err(|e| ImageError::io(&final_path, e))?;
    if let Some(total) = total {
        progress.bytes(total, Some(total));
    }
    Ok(final_path)
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>, ImageError> {
    let prefix = format!("{package}_");
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ImageError::io(dir, e)),
    };
    Ok(rd.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
    }))
}

fn dir_size(dir: &Path) -> u64 {
    // apt writes into `partial/` first, then moves the file up.
    let mut total = 0;
    for d in [dir.to_path_buf(), dir.join("partial")] {
        if let Ok(rd) = fs::read_dir(&d) {
            total += rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum::<u64>();
        }
    }
    total
}

/// Runs a command with `LC_ALL=C` and returns stdout; non-zero exit is a typed error.
pub fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::Command {
            command: desc.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            command: desc,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_output() {
        let dep = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(dep).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
        let pol = "linux-image-6.1.0-56-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n";
        assert_eq!(parse_candidate(pol).as_deref(), Some("6.1.192-2"));
        assert_eq!(parse_candidate("x:\n  Candidate: (none)\n"), None);
    }
}
