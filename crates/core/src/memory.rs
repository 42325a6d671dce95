//! Operations on guest memory files: a sparse copy (only the allocated
//! extents, `SEEK_DATA`/`SEEK_HOLE`: the cost follows what the guest touched),
//! punching zero pages back into holes, and allocated size. Where memory lives
//! and who shares it is `bases.rs` (docs/fork.md, "Memory").

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Copy `src` to `dst` keeping holes; returns the number of data bytes
/// copied. `dst` is absent or holds nothing but zeros (as
/// [`preallocate_like`] leaves it: not truncated, so its blocks are
/// reused). Each allocated extent is copied in the kernel with
/// `copy_file_range` (no round trip through user space; this runs while a
/// source VM is paused).
pub fn sparse_copy(src: &Path, dst: &Path) -> io::Result<u64> {
    let input = File::open(src)?;
    let len = input.metadata()?.len();
    let output = sized(dst, len)?;
    let mut copied = 0u64;
    for extent in data_extents(&input, len) {
        let (data, hole) = extent?;
        let (mut off_in, mut off_out) = (data as libc::loff_t, data as libc::loff_t);
        let mut left = (hole - data) as usize;
        while left > 0 {
            // SAFETY: valid fds and offset pointers that live across the call.
            let n = unsafe {
                libc::copy_file_range(
                    input.as_raw_fd(),
                    &mut off_in,
                    output.as_raw_fd(),
                    &mut off_out,
                    left,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break; // source shrank under us
            }
            left -= n as usize;
            copied += n as u64;
        }
    }
    Ok(copied)
}

/// `dst` created (or opened, its content kept) with length `len`: a base's
/// file must have its full size before a VMM maps it.
fn sized(dst: &Path, len: u64) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dst)?;
    f.set_len(len)?;
    Ok(f)
}

/// `dst`, new or empty, as long as `src` (no blocks allocated): forks may
/// map a base before the capture fills it.
pub fn sized_like(src: &Path, dst: &Path) -> io::Result<()> {
    sized(dst, std::fs::metadata(src)?.len()).map(drop)
}

/// Make `dst` (new, or from [`sized_like`]) as long as `src` with blocks allocated
/// (zeroed) wherever `src` has data, so a [`sparse_copy`] into it later
/// writes in place instead of allocating: tmpfs page allocation is most of
/// a copy's cost on a cold host (240 ms vs 70–90 ms for 110 MiB measured
/// here), and the capture's copy runs while the source is paused. Returns
/// the bytes allocated.
pub fn preallocate_like(src: &Path, dst: &Path) -> io::Result<u64> {
    let input = File::open(src)?;
    let len = input.metadata()?.len();
    let output = sized(dst, len)?;
    let mut allocated = 0u64;
    for extent in data_extents(&input, len) {
        let (data, hole) = extent?;
        // SAFETY: fallocate on an fd we own, offsets within i64 (file sizes).
        let r = unsafe {
            libc::fallocate(
                output.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                data as libc::off_t,
                (hole - data) as libc::off_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        allocated += hole - data;
    }
    Ok(allocated)
}

/// The allocated extents `[data, hole)` of the first `len` bytes of `f`, in
/// order (`SEEK_DATA`/`SEEK_HOLE`); the walk every function here shares.
fn data_extents(f: &File, len: u64) -> impl Iterator<Item = io::Result<(u64, u64)>> + '_ {
    let mut pos = 0u64;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let next = (|| {
            let Some(data) = seek(f, pos, libc::SEEK_DATA)? else {
                return Ok(None); // only a hole remains
            };
            let hole = seek(f, data, libc::SEEK_HOLE)?.unwrap_or(len);
            Ok(Some((data, hole)))
        })();
        match next {
            Ok(Some((data, hole))) => {
                pos = hole;
                Some(Ok((data, hole)))
            }
            Ok(None) => None,
            Err(e) => {
                pos = len; // stop after an error
                Some(Err(e))
            }
        }
    })
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

/// Punches holes where whole 4 KiB pages of `path` are zero; returns the
/// bytes freed. The content does not change, so it is safe on a file other
/// processes map privately (their copied pages are their own; the rest reads
/// zeros either way). Never on a file a VM maps shared and writes.
pub fn punch_zero_pages(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    const CHUNK: usize = 1 << 20;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; CHUNK];
    let mut freed = 0u64;
    for extent in data_extents(&f, len) {
        let (data, end) = extent?;
        let mut at = data;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            f.read_exact_at(&mut buf[..n], at)?;
            // Runs of zero pages become one hole each.
            let mut run: Option<u64> = None;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                let off = at + (i * PAGE) as u64;
                match (page.iter().all(|&b| b == 0), run) {
                    (true, None) => run = Some(off),
                    (false, Some(start)) => {
                        freed += punch(&f, start, off - start)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(start) = run {
                freed += punch(&f, start, at + n as u64 - start)?;
            }
            at += n as u64;
        }
    }
    Ok(freed)
}

fn punch(f: &File, off: u64, len: u64) -> io::Result<u64> {
    // SAFETY: fallocate on a valid fd; offsets are plain integers.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len)
}

/// Bytes the file really occupies (allocated blocks).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Whether every byte of `path` is allocated (a memory file a migration
/// loaded page by page), 0-length files excepted.
pub fn allocated_whole(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0 && allocated_bytes(path) >= m.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_preallocated_copy_is_the_same_and_allocates_where_the_source_has_data() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(32 << 20).unwrap();
        f.write_all_at(&[3u8; 8192], 1 << 20).unwrap();
        f.write_all_at(b"tail", (32 << 20) - 4).unwrap();
        let dst = dir.path().join("dst");
        let pre = preallocate_like(&src, &dst).unwrap();
        assert_eq!(pre, allocated_bytes(&src));
        assert_eq!(allocated_bytes(&dst), allocated_bytes(&src));
        // The source changes between the preallocation and the copy.
        f.write_all_at(&[5u8; 4096], 20 << 20).unwrap();
        drop(f);
        sparse_copy(&src, &dst).unwrap();
        assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
        assert_eq!(allocated_bytes(&dst), allocated_bytes(&src));
    }

    #[test]
    fn only_a_file_written_everywhere_is_allocated_whole() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = dir.path().join("f");
        let f = File::create(&p).unwrap();
        assert!(!allocated_whole(&p), "empty");
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        assert!(!allocated_whole(&p), "sparse");
        f.write_all_at(&vec![0u8; 1 << 20], 0).unwrap();
        assert!(allocated_whole(&p), "every page written");
        assert!(!allocated_whole(&dir.path().join("missing")));
    }

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
        // Data extents only: the written pages and the allocated zero pages.
        assert_eq!(copied, 4096 + 8192 + 4096 * 4);
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&dst).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a == b, "contents differ");
        assert!(
            allocated_bytes(&dst) <= allocated_bytes(&src),
            "{}",
            allocated_bytes(&dst)
        );
    }

    #[test]
    fn zero_pages_become_holes_and_data_stays() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = dir.path().join("base");
        let f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&vec![0u8; 4 << 20], 0).unwrap(); // allocated zeros
        f.write_all_at(b"keep", 4096 * 7).unwrap();
        f.write_all_at(&[9u8; 4096], 6 << 20).unwrap();
        drop(f);
        let before = std::fs::read(&p).unwrap();
        let freed = punch_zero_pages(&p).unwrap();
        assert_eq!(
            freed,
            (4 << 20) - 4096,
            "all zero pages but the one with data"
        );
        assert_eq!(std::fs::read(&p).unwrap(), before, "content unchanged");
        assert_eq!(allocated_bytes(&p), 2 * 4096);
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
