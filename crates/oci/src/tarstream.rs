//! A bounded, streaming tar reader for hostile archives.
//!
//! The `tar` crate's iterator reads PAX and GNU long-name records into memory
//! whatever size their header claims; this reader parses the same formats (ustar,
//! GNU long names, PAX local and global headers, via `tar::Header` for the
//! fields) but caps every metadata record, counts every header and every data
//! byte (read or skipped) against [`UnpackLimits`], and never seeks.

use std::io::{self, Read};

use crate::OciError;
use crate::unpack::UnpackLimits;

const BLOCK: u64 = 512;
/// A PAX or GNU long-name record larger than this is refused.
const MAX_META: u64 = 1 << 20;

/// The kind of a tar member this crate materializes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Char,
    Block,
    Fifo,
}

/// One member's metadata, PAX and GNU overrides applied.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    pub size: u64,
    pub dev: (u32, u32),
    /// `SCHILY.xattr.NAME` records: (NAME, value).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Running totals, carried from one layer to the next.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Data bytes (file contents and metadata records) seen so far.
    pub bytes: u64,
    /// Tar headers seen so far.
    pub entries: u64,
}

#[derive(Default)]
struct Pending {
    pax: Vec<(String, Vec<u8>)>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// Streams members out of a tar; see the module docs.
pub(crate) struct TarReader<R: Read> {
    inner: R,
    what: String,
    limits: UnpackLimits,
    pub counters: Counters,
    /// Data bytes of the current member not yet read, then its padding.
    remaining: u64,
    padding: u64,
    ended: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R, what: &str, limits: UnpackLimits, counters: Counters) -> Self {
        TarReader {
            inner,
            what: what.to_string(),
            limits,
            counters,
            remaining: 0,
            padding: 0,
            ended: false,
        }
    }

    /// The underlying reader (e.g. to drain and hash what follows the archive).
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn bad(&self, reason: impl Into<String>) -> OciError {
        OciError::bad(&self.what, reason)
    }

    fn io_err(&self, e: io::Error) -> OciError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.bad("archive is truncated")
        } else {
            OciError::bad_src(&self.what, "reading the archive failed", e)
        }
    }

    fn count_bytes(&mut self, n: u64) -> Result<(), OciError> {
        self.counters.bytes = self.counters.bytes.saturating_add(n);
        if self.counters.bytes > self.limits.max_bytes {
            return Err(OciError::TooLarge {
                what: "unpacked image size".into(),
                actual: self.counters.bytes,
                limit: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    /// Skips what is left of the current member (data and padding).
    fn skip_rest(&mut self) -> Result<(), OciError> {
        let n = self.remaining + self.padding;
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())
            .map_err(|e| self.io_err(e))?;
        if copied != n {
            return Err(self.bad("archive is truncated"));
        }
        self.remaining = 0;
        self.padding = 0;
        Ok(())
    }

    /// Reads one 512-byte block; `None` at a clean end of input.
    fn read_block(&mut self) -> Result<Option<[u8; 512]>, OciError> {
        let mut block = [0u8; 512];
        let mut got = 0;
        while got < block.len() {
            match self.inner.read(&mut block[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(self.bad("archive is truncated inside a header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(e)),
            }
        }
        Ok(Some(block))
    }

    /// Reads a whole metadata record (PAX, long name) of `size` bytes, capped.
    fn read_meta(&mut self, size: u64) -> Result<Vec<u8>, OciError> {
        if size > MAX_META {
            return Err(self.bad(format!(
                "metadata record of {size} bytes (limit {MAX_META})"
            )));
        }
        self.count_bytes(size)?;
        let mut data = vec![0u8; size as usize];
        self.inner
            .read_exact(&mut data)
            .map_err(|e| self.io_err(e))?;
        self.remaining = 0;
        self.padding = pad(size);
        self.skip_rest()?;
        Ok(data)
    }

    /// The next member, skipping whatever of the previous one was not read.
    /// `None` at the end-of-archive marker (or a clean end of input).
    pub fn next_member(&mut self) -> Result<Option<Member>, OciError> {
        if self.ended {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut pending = Pending::default();
        loop {
            let Some(block) = self.read_block()? else {
                return self.end(&pending);
            };
            if block.iter().all(|b| *b == 0) {
                return self.end(&pending);
            }
            self.counters.entries += 1;
            if self.counters.entries > self.limits.max_entries {
                return Err(OciError::TooLarge {
                    what: "number of image entries".into(),
                    actual: self.counters.entries,
                    limit: self.limits.max_entries,
                });
            }
            let header = tar::Header::from_byte_slice(&block);
            self.check_sum(header)?;
            let pax_size = pax_number(&pending.pax, "size")?;
            let size = match pax_size {
                Some(s) => s,
                None => header.entry_size().map_err(|e| self.io_err(e))?,
            };
            let t = header.entry_type();
            if t.is_pax_local_extensions() {
                let data = self.read_meta(size)?;
                pending.pax = parse_pax(&data).map_err(|r| self.bad(r))?;
            } else if t.is_pax_global_extensions() {
                self.read_meta(size)?;
            } else if t.is_gnu_longname() {
                pending.long_name = Some(trim_nul(self.read_meta(size)?));
            } else if t.is_gnu_longlink() {
                pending.long_link = Some(trim_nul(self.read_meta(size)?));
            } else {
                return self.member(header, size, pending).map(Some);
            }
        }
    }

    fn end(&mut self, pending: &Pending) -> Result<Option<Member>, OciError> {
        if !pending.pax.is_empty() || pending.long_name.is_some() || pending.long_link.is_some() {
            return Err(self.bad("metadata record without a member after it"));
        }
        self.ended = true;
        Ok(None)
    }

    fn check_sum(&self, header: &tar::Header) -> Result<(), OciError> {
        let bytes = header.as_bytes();
        let sum: u32 = bytes[..148]
            .iter()
            .chain(&bytes[156..])
            .map(|b| u32::from(*b))
            .sum::<u32>()
            + 8 * 32;
        match header.cksum() {
            Ok(c) if c == sum => Ok(()),
            _ => Err(self.bad("tar header checksum mismatch (corrupt archive)")),
        }
    }

    fn member(&mut self, h: &tar::Header, size: u64, p: Pending) -> Result<Member, OciError> {
        let kind = self.kind_of(h.entry_type())?;
        if p.pax.iter().any(|(k, _)| k.starts_with("GNU.sparse.")) {
            return Err(self.bad("sparse files are not supported"));
        }
        let path = match (pax_value(&p.pax, "path"), p.long_name) {
            (Some(v), _) => v.to_vec(),
            (None, Some(n)) => n,
            (None, None) => h.path_bytes().into_owned(),
        };
        let link = match (pax_value(&p.pax, "linkpath"), p.long_link) {
            (Some(v), _) => v.to_vec(),
            (None, Some(n)) => n,
            (None, None) => h
                .link_name_bytes()
                .map(|c| c.into_owned())
                .unwrap_or_default(),
        };
        let (mode, uid, gid, mtime, dev) = self.numbers(h, &p.pax, kind)?;
        let xattrs = p
            .pax
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("SCHILY.xattr.")
                    .map(|n| (n.as_bytes().to_vec(), v.clone()))
            })
            .collect();
        self.count_bytes(size)?;
        self.remaining = size;
        self.padding = pad(size);
        Ok(Member {
            path,
            link,
            kind,
            mode,
            uid,
            gid,
            mtime,
            size,
            dev,
            xattrs,
        })
    }

    fn kind_of(&self, t: tar::EntryType) -> Result<Kind, OciError> {
        use tar::EntryType as E;
        Ok(match t {
            E::Regular | E::Continuous => Kind::File,
            E::Directory => Kind::Dir,
            E::Symlink => Kind::Symlink,
            E::Link => Kind::HardLink,
            E::Char => Kind::Char,
            E::Block => Kind::Block,
            E::Fifo => Kind::Fifo,
            other => {
                return Err(self.bad(format!(
                    "unsupported tar member type {:?}",
                    other.as_byte() as char
                )));
            }
        })
    }

    /// Mode, uid, gid, mtime and device numbers, PAX overrides applied; blank
    /// numeric fields (some writers leave them so) read as 0.
    #[allow(clippy::type_complexity)]
    fn numbers(
        &self,
        h: &tar::Header,
        pax: &[(String, Vec<u8>)],
        kind: Kind,
    ) -> Result<(u32, u32, u32, (i64, u32), (u32, u32)), OciError> {
        let e = |e: io::Error| OciError::bad_src(&self.what, "bad tar header field", e);
        let old = h.as_old();
        let uid = match pax_number(pax, "uid")? {
            Some(v) => v,
            None if blank(&old.uid) => 0,
            None => h.uid().map_err(e)?,
        };
        let gid = match pax_number(pax, "gid")? {
            Some(v) => v,
            None if blank(&old.gid) => 0,
            None => h.gid().map_err(e)?,
        };
        let mtime = match pax_value(pax, "mtime") {
            Some(v) => parse_time(v).ok_or_else(|| self.bad("bad PAX mtime"))?,
            None if blank(&old.mtime) => (0, 0),
            None => (i64::try_from(h.mtime().map_err(e)?).unwrap_or(i64::MAX), 0),
        };
        let mode = if blank(&old.mode) {
            0
        } else {
            h.mode().map_err(e)? & 0o7777
        };
        let dev = match kind {
            Kind::Char | Kind::Block => (
                h.device_major().map_err(e)?.unwrap_or(0),
                h.device_minor().map_err(e)?.unwrap_or(0),
            ),
            _ => (0, 0),
        };
        let to_u32 = |v: u64, f: &str| {
            u32::try_from(v).map_err(|_| self.bad(format!("{f} {v} out of range")))
        };
        Ok((mode, to_u32(uid, "uid")?, to_u32(gid, "gid")?, mtime, dev))
    }

    /// Reads the current member's data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive is truncated inside a file",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A `Read` over the current member's data.
pub(crate) struct Data<'a, R: Read>(pub &'a mut TarReader<R>);

impl<R: Read> Read for Data<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_data(buf)
    }
}

fn pad(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// An all-NUL or all-space numeric field (some writers leave them so) reads as 0.
fn blank(field: &[u8]) -> bool {
    field.iter().all(|b| *b == 0 || *b == b' ')
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn parse_pax(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
        let key = ext.key().map_err(|_| "PAX key is not UTF-8".to_string())?;
        out.push((key.to_string(), ext.value_bytes().to_vec()));
    }
    Ok(out)
}

fn pax_value<'a>(pax: &'a [(String, Vec<u8>)], key: &str) -> Option<&'a [u8]> {
    pax.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
}

fn pax_number(pax: &[(String, Vec<u8>)], key: &str) -> Result<Option<u64>, OciError> {
    match pax_value(pax, key) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| OciError::bad("tar", format!("bad PAX {key}"))),
    }
}

/// PAX time: `secs[.frac]`, possibly negative.
fn parse_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nanos = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    Some((secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> UnpackLimits {
        UnpackLimits {
            max_bytes: 1 << 20,
            max_entries: 100,
        }
    }

    fn archive(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    #[test]
    fn reads_long_names_and_data() {
        let long = format!("d/{}", "n".repeat(300));
        let tar = archive(|b| {
            file(b, &long, b"abc");
            file(b, "short", b"");
        });
        let mut r = TarReader::new(&tar[..], "t", limits(), Counters::default());
        let m = r.next_member().unwrap().unwrap();
        assert_eq!(m.path, long.as_bytes());
        let mut s = Vec::new();
        Data(&mut r).read_to_end(&mut s).unwrap();
        assert_eq!(s, b"abc");
        assert_eq!(r.next_member().unwrap().unwrap().path, b"short");
        assert!(r.next_member().unwrap().is_none());
    }

    #[test]
    fn truncated_and_corrupt_archives() {
        let tar = archive(|b| file(b, "f", &[7u8; 2000]));
        let mut r = TarReader::new(&tar[..1200], "t", limits(), Counters::default());
        assert!(r.next_member().unwrap().is_some());
        assert_eq!(r.next_member().unwrap_err().code(), "bad_archive");
        let mut bad = tar.clone();
        bad[10] ^= 1;
        let mut r = TarReader::new(&bad[..], "t", limits(), Counters::default());
        assert!(
            r.next_member()
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
    }

    #[test]
    fn limits_enforced() {
        let tar = archive(|b| file(b, "f", &[0u8; 5000]));
        let l = UnpackLimits {
            max_bytes: 4096,
            max_entries: 10,
        };
        let mut r = TarReader::new(&tar[..], "t", l, Counters::default());
        assert_eq!(r.next_member().unwrap_err().code(), "too_large");
        let tar = archive(|b| (0..5).for_each(|i| file(b, &format!("f{i}"), b"")));
        let l = UnpackLimits {
            max_bytes: 4096,
            max_entries: 3,
        };
        let mut r = TarReader::new(&tar[..], "t", l, Counters::default());
        let mut err = None;
        for _ in 0..5 {
            if let Err(e) = r.next_member() {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err.map(|e| e.code()), Some("too_large"));
    }

    #[test]
    fn huge_pax_record_refused_without_reading_it() {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(1 << 40);
        h.set_path("pax").unwrap();
        h.set_cksum();
        let tar = h.as_bytes().to_vec();
        let l = UnpackLimits {
            max_bytes: u64::MAX,
            max_entries: 10,
        };
        let mut r = TarReader::new(&tar[..], "t", l, Counters::default());
        assert!(
            r.next_member()
                .unwrap_err()
                .to_string()
                .contains("metadata record")
        );
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_time(b"12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_time(b"-3"), Some((-3, 0)));
        assert_eq!(parse_time(b"x"), None);
    }
}
