//! Guest memory files.
//!
//! Strategy: **per-fork sparse copy**. Every instance owns one memory file on
//! the tmpfs memory directory and maps it `share=on`; a snapshot owns an
//! immutable copy. A fork copies only the allocated extents of the snapshot's
//! file (`SEEK_DATA`/`SEEK_HOLE`), so its cost follows the memory the guest
//! actually touched, not the configured size: a 1 GiB guest that touched
//! 40 MiB copies 40 MiB. Every instance can then be snapshotted, put in
//! standby, restored and forked again the same way, and no file is ever
//! shared writable. The price is density: forks do not share the pages they
//! have in common (a shared base mapped copy-on-write would; see
//! docs/memory.md for the trade-off).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Copy `src` to `dst` (created or truncated) keeping holes; returns the
/// number of data bytes copied. Blocks of zeroes inside data extents are
/// skipped too, so the copy never uses more space than the source.
pub fn sparse_copy(src: &Path, dst: &Path) -> io::Result<u64> {
    let input = File::open(src)?;
    let len = input.metadata()?.len();
    let output = File::create(dst)?;
    output.set_len(len)?;
    const CHUNK: usize = 1 << 20;
    const PAGE: usize = 4096;
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek(&input, pos, libc::SEEK_DATA)? else {
            break; // only a hole remains
        };
        let hole = seek(&input, data, libc::SEEK_HOLE)?.unwrap_or(len);
        let mut off = data;
        while off < hole {
            let n = ((hole - off) as usize).min(CHUNK);
            input.read_exact_at(&mut buf[..n], off)?;
            // Write page runs that contain data; leave zero pages as holes.
            let mut p = 0;
            while p < n {
                let end = (p + PAGE).min(n);
                if buf[p..end].iter().any(|&b| b != 0) {
                    let mut run_end = end;
                    while run_end < n {
                        let next = (run_end + PAGE).min(n);
                        if buf[run_end..next].iter().all(|&b| b == 0) {
                            break;
                        }
                        run_end = next;
                    }
                    output.write_all_at(&buf[p..run_end], off + p as u64)?;
                    copied += (run_end - p) as u64;
                    p = run_end;
                } else {
                    p = end;
                }
            }
            off += n as u64;
        }
        pos = hole;
    }
    Ok(copied)
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` when there is no data at or after
/// `off` (ENXIO).
fn seek(f: &File, off: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid fd has no memory-safety requirements.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Bytes the file really occupies (allocated blocks).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_data_keeps_holes() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"hello", 4096 * 3).unwrap();
        f.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
        f.write_all_at(&[0u8; 4096 * 4], 50 << 20).unwrap(); // allocated zeroes
        drop(f);
        let dst = dir.path().join("dst");
        let copied = sparse_copy(&src, &dst).unwrap();
        assert_eq!(copied, 4096 + 8192);
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&dst).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a == b, "contents differ");
        assert!(
            allocated_bytes(&dst) <= 4096 * 4,
            "{}",
            allocated_bytes(&dst)
        );
    }

    #[test]
    fn empty_file_copies_to_empty_sparse_file() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let src = dir.path().join("src");
        File::create(&src).unwrap().set_len(1 << 20).unwrap();
        let dst = dir.path().join("dst");
        assert_eq!(sparse_copy(&src, &dst).unwrap(), 0);
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 1 << 20);
        assert_eq!(allocated_bytes(&dst), 0);
    }
}
