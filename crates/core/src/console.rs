//! Guest consoles on the host, bounded. QEMU appends a VM's serial output to
//! `console.log` (`O_APPEND`), which a guest can write to without end. The
//! daemon's watch rotates a file past [`Config::console_max_bytes`]: its last
//! half goes to `console.log.1` and `console.log` is truncated (QEMU's next
//! append lands at the new end). A guest can therefore make its console take
//! at most ~1.5× the limit plus what it writes in one watch period (1 s),
//! and reads of it are bounded alike. Lines written during a rotation's few
//! microseconds may be lost: the console is a log, not a channel.
//!
//! [`Config::console_max_bytes`]: crate::Config::console_max_bytes

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// `console.log.1`: the older half kept at the last rotation.
pub(crate) fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    p.into()
}

/// Rotates `path` if it is larger than `max` bytes; returns whether it did.
pub(crate) fn bound(path: &Path, max: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let keep = tail_bytes(path, max / 2)?;
    let old = rotated(path);
    let mut tmp = old.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    File::create(&tmp)?.write_all(&keep)?;
    std::fs::rename(&tmp, &old)?;
    // QEMU holds the file with O_APPEND: after this its writes start at 0.
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    info!(path = %path.display(), was = len, "console rotated");
    Ok(true)
}

/// The last `n` bytes of `path` (all of it if shorter).
fn tail_bytes(path: &Path, n: u64) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(n)))?;
    let mut buf = Vec::with_capacity(n.min(len) as usize);
    f.take(n).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The console's text, older rotated half first, at most `max` bytes from
/// the end (cut at a line start when possible).
pub(crate) fn read(path: &Path, max: u64) -> std::io::Result<String> {
    let mut bytes = match tail_bytes(&rotated(path), max) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    match tail_bytes(path, max) {
        Ok(b) => bytes.extend(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let cut = bytes.len().saturating_sub(max as usize);
    let start = match bytes[cut..].iter().position(|&b| b == b'\n') {
        Some(i) if cut > 0 => cut + i + 1,
        _ => cut,
    };
    Ok(String::from_utf8_lossy(&bytes[start..]).into_owned())
}

/// Bounds the consoles of `paths` (one watch pass, off the async threads).
pub(crate) async fn bound_all(paths: Vec<PathBuf>, max: u64) {
    let r = tokio::task::spawn_blocking(move || {
        for p in paths {
            if let Err(e) = bound(&p, max) {
                warn!(path = %p.display(), error = %e, "bounding a console failed");
            }
        }
    })
    .await;
    if let Err(e) = r {
        warn!(error = %e, "console watch failed");
    }
}

/// Reads what is appended to a console from a point on. A file shorter
/// than what was read has been rotated: it is read again from its start
/// (what was appended between the last read and the rotation is in the
/// rotated half, and not returned).
#[derive(Clone, Debug)]
pub(crate) struct Follower {
    path: PathBuf,
    offset: u64,
}

impl Follower {
    /// From the file's current end (its start if it does not exist yet).
    pub fn from_end(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: std::fs::metadata(path).map_or(0, |m| m.len()),
        }
    }

    /// Bytes appended since the last call, at most `max`.
    pub fn read_new(&mut self, max: u64) -> std::io::Result<Vec<u8>> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        if len < self.offset {
            self.offset = 0;
        }
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.take(max).read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_reads_appends_in_bounded_chunks_and_survives_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        std::fs::write(&p, "old\n").unwrap();
        let mut f = Follower::from_end(&p);
        assert!(f.read_new(4).unwrap().is_empty());
        let mut file = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        file.write_all(b"hello world\n").unwrap();
        assert_eq!(f.read_new(6).unwrap(), b"hello ");
        assert_eq!(f.read_new(64).unwrap(), b"world\n");
        assert!(bound(&p, 8).unwrap(), "rotated");
        file.write_all(b"new\n").unwrap();
        assert_eq!(f.read_new(64).unwrap(), b"new\n");
    }

    #[test]
    fn a_console_past_its_limit_keeps_its_last_half_and_starts_over() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        // An appender like QEMU's.
        let mut qemu = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        for i in 0..200 {
            writeln!(qemu, "line {i:04} {}", "x".repeat(40)).unwrap();
        }
        assert!(!bound(&p, 1 << 20).unwrap(), "under the limit");
        assert!(bound(&p, 4096).unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        assert_eq!(std::fs::metadata(rotated(&p)).unwrap().len(), 2048);
        writeln!(qemu, "after rotation").unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            15,
            "the appender writes at the new end, no hole"
        );
        let text = read(&p, 4096).unwrap();
        assert!(text.contains("line 0199"), "{text}");
        assert!(text.ends_with("after rotation\n"), "{text}");
        assert!(!text.contains("line 0000"));
        // A read is bounded and starts at a line.
        let short = read(&p, 100).unwrap();
        assert!(short.len() <= 100, "{short}");
        assert!(
            short.starts_with("line") || short.starts_with("after"),
            "{short}"
        );
    }
}
