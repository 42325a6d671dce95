//! Finding the mailbox page in guest memory: verify at a known offset (hot
//! path) or scan a memory file page by page (fallback).

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use crate::error::MailboxError;
use crate::layout::{Header, MAGIC, MarkerId, OFF_MARKER, PAGE_SIZE, verify_marker};

/// Read granularity of scans: large enough to amortise syscalls, a whole
/// number of pages so pages never straddle two reads.
const SCAN_CHUNK: usize = 256 * PAGE_SIZE;

/// Host: verify that the page at `offset` in `mem` (guest RAM, file offset ==
/// guest-physical address) is a valid mailbox armed with `marker`.
pub fn locate_at(mem: &[u8], offset: u64, marker: &MarkerId) -> Result<Header, MailboxError> {
    if !offset.is_multiple_of(PAGE_SIZE as u64) {
        return Err(MailboxError::Misaligned { offset });
    }
    let len = mem.len() as u64;
    let end = offset.checked_add(PAGE_SIZE as u64);
    match (usize::try_from(offset), end) {
        (Ok(start), Some(end)) if end <= len => {
            verify_marker(&mem[start..start + PAGE_SIZE], marker)
        }
        _ => Err(MailboxError::OutOfRange { offset, len }),
    }
}

/// Tracks hits so a marker seen at two offsets is an error, not a guess.
struct Hits {
    marker: MarkerId,
    found: Option<u64>,
}

impl Hits {
    fn check(&mut self, offset: u64, page: &[u8]) -> Result<(), MailboxError> {
        // Cheap prefilter before the CRC: magic and marker bytes.
        if page[..8] != MAGIC || page[OFF_MARKER..OFF_MARKER + 16] != self.marker.0 {
            return Ok(());
        }
        // A corrupt page carrying our marker is not a mailbox we may patch.
        if verify_marker(page, &self.marker).is_err() {
            return Ok(());
        }
        match self.found {
            Some(first) => Err(MailboxError::AmbiguousMarker {
                first,
                second: offset,
            }),
            None => {
                self.found = Some(offset);
                Ok(())
            }
        }
    }
}

/// Reads until `buf` is full or EOF; returns bytes read.
fn fill<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, MailboxError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

fn new_hits(marker: &MarkerId) -> Result<Hits, MailboxError> {
    if !marker.is_valid() {
        return Err(MailboxError::InvalidMarker);
    }
    Ok(Hits {
        marker: *marker,
        found: None,
    })
}

/// Host fallback: scan a memory image from its start, page by page, with
/// `read()` (never mmap: mapping holes of a tmpfs file allocates them).
/// Returns the offset of the single valid page armed with `marker`, `None`
/// if there is none, and an error if there are two. A trailing partial page
/// is ignored.
pub fn scan<R: Read + Seek>(
    reader: &mut R,
    marker: &MarkerId,
) -> Result<Option<u64>, MailboxError> {
    let mut hits = new_hits(marker)?;
    reader.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; SCAN_CHUNK];
    let mut base = 0u64;
    loop {
        let n = fill(reader, &mut buf)?;
        for (i, page) in buf[..n].chunks_exact(PAGE_SIZE).enumerate() {
            hits.check(base + (i * PAGE_SIZE) as u64, page)?;
        }
        if n < buf.len() {
            return Ok(hits.found);
        }
        base += n as u64;
    }
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
mod holes {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    const SEEK_DATA: i32 = 3;
    const SEEK_HOLE: i32 = 4;

    // Declared by hand: the `libc` crate is outside this crate's allowed
    // dependencies and this is the one C call needed (off_t is i64 here).
    unsafe extern "C" {
        fn lseek(fd: i32, offset: i64, whence: i32) -> i64;
    }

    /// `Ok(None)`: no data at or after `pos`. `Err(())`: SEEK_DATA is not
    /// supported, the caller scans everything.
    fn seek(file: &File, pos: u64, whence: i32) -> Result<Option<u64>, std::io::Error> {
        let pos = i64::try_from(pos).map_err(|_| std::io::Error::from_raw_os_error(22))?;
        // SAFETY: plain syscall on a descriptor `file` keeps open.
        let r = unsafe { lseek(file.as_raw_fd(), pos, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after pos.
            if e.raw_os_error() == Some(6) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(u64::try_from(r).ok())
    }

    /// Data ranges `[start, end)` of `file` up to `size`, or `None` when the
    /// filesystem does not support SEEK_DATA/SEEK_HOLE.
    pub fn data_ranges(file: &File, size: u64) -> Option<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < size {
            let start = match seek(file, pos, SEEK_DATA) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(_) => return None,
            };
            let end = match seek(file, start, SEEK_HOLE) {
                Ok(Some(e)) => e.min(size),
                Ok(None) => size,
                Err(_) => return None,
            };
            if end <= start {
                break;
            }
            out.push((start, end));
            pos = end;
        }
        Some(out)
    }
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
mod holes {
    pub fn data_ranges(_file: &std::fs::File, _size: u64) -> Option<Vec<(u64, u64)>> {
        None
    }
}

/// Host fallback for a memory *file*: like [`scan`] but skips holes with
/// `SEEK_DATA`/`SEEK_HOLE` (a mostly-empty 256 MiB tmpfs file is read in a
/// fraction of the time) and reads with `pread`. Falls back to reading the
/// whole file when the filesystem can't report holes. Moves the file offset.
pub fn scan_file(file: &File, marker: &MarkerId) -> Result<Option<u64>, MailboxError> {
    let mut hits = new_hits(marker)?;
    let size = file.metadata()?.len();
    let ranges = holes::data_ranges(file, size).unwrap_or_else(|| vec![(0, size)]);
    let page = PAGE_SIZE as u64;
    let mut buf = vec![0u8; SCAN_CHUNK];
    // First offset not yet checked: filesystems with sub-page blocks may
    // report two data ranges inside one page; check each page only once.
    let mut next = 0u64;
    for (start, end) in ranges {
        // Data ranges are block-aligned on tmpfs/ext4; align down anyway.
        let mut off = (start - start % page).max(next);
        while off < end {
            let want = usize::try_from((end - off).min(SCAN_CHUNK as u64)).unwrap_or(SCAN_CHUNK);
            let want = want.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            let n = read_at_full(file, &mut buf[..want.min(SCAN_CHUNK)], off)?;
            for (i, p) in buf[..n].chunks_exact(PAGE_SIZE).enumerate() {
                hits.check(off + (i * PAGE_SIZE) as u64, p)?;
            }
            if n < PAGE_SIZE {
                break;
            }
            off += (n - n % PAGE_SIZE) as u64;
        }
        next = next.max(off);
    }
    Ok(hits.found)
}

fn read_at_full(file: &File, buf: &mut [u8], off: u64) -> Result<usize, MailboxError> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}
