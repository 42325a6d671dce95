//! Applying an image's layers, in order, into a directory: the flattened root
//! file system that [`crate::build_erofs`] turns into an image.
//!
//! Semantics follow Docker's layer application: `.wh.NAME` removes `NAME` from
//! the layers below, `.wh..wh..opq` empties its directory of everything the
//! layers below put there, an entry replaces whatever is at its path unless both
//! are directories (then they merge), hard links point at entries of the same or
//! an earlier layer. Owners (numeric uid/gid), modes (setuid, setgid, sticky
//! included), mtimes, `SCHILY.xattr.*` extended attributes, symlinks, device
//! nodes and fifos are reproduced; this needs root (CAP_CHOWN, CAP_MKNOD,
//! CAP_SYS_ADMIN for `trusted.*`).
//!
//! Safety: every path is split into components; `..` is refused, `.` and empty
//! components dropped, leading `/` ignored. Parents are reached through
//! [`fsops::RootDir`] (resolution confined to the root), the last component is
//! never followed, and files are created with `O_EXCL | O_NOFOLLOW` after
//! whatever was there is removed, so no write ever lands outside the root or
//! through a hard link into another file.

mod fsops;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmodat, makedev, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat, linkat, symlinkat};
use sha2::{Digest as _, Sha256};

use crate::manifest::{Compression, Fetched, Layer};
use crate::tarstream::{Counters, Data, Kind, Member, TarReader};
use crate::{BlobStore, OciError};
use fsops::{DirError, RootDir, is_dir, lstat_at, remove_at};

/// Bounds on what unpacking may write, over all layers together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// File contents plus tar metadata records, in bytes.
    pub max_bytes: u64,
    /// Tar headers (files, directories, links, whiteouts, metadata records).
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    /// 32 GiB and one million entries.
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 32 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// What an unpack wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnpackStats {
    pub layers: usize,
    pub bytes: u64,
    pub entries: u64,
}

/// Bytes after a layer's end-of-archive marker that are tolerated (block padding).
const MAX_TRAILER: u64 = 1 << 20;
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Applies `fetched`'s layers, lowest first, into `root`.
///
/// `root` must not exist or be an empty directory, and its parent must be
/// private (no group/other access): the tree holds the image's setuid files and
/// device nodes, which must not be reachable by other host users.
pub fn unpack(
    fetched: &Fetched,
    blobs: &BlobStore,
    root: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, OciError> {
    prepare_root(root)?;
    let dir = RootDir::open(root).map_err(|e| OciError::io("opening", root, e.into()))?;
    let mut state = State {
        root: dir,
        dir_times: BTreeMap::new(),
        counters: Counters::default(),
    };
    for (i, layer) in fetched.layers.iter().enumerate() {
        apply_layer(&mut state, blobs, layer, i, limits)?;
    }
    state.restore_dir_times()?;
    Ok(UnpackStats {
        layers: fetched.layers.len(),
        bytes: state.counters.bytes,
        entries: state.counters.entries,
    })
}

fn prepare_root(root: &Path) -> Result<(), OciError> {
    let parent = match root.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(parent).map_err(|e| OciError::io("inspecting", parent, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(OciError::InvalidInput(format!(
            "the unpack root's parent {} must be private (chmod 0700): the image's setuid files and device nodes must not be reachable by other users",
            parent.display()
        )));
    }
    match std::fs::read_dir(root) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(OciError::InvalidInput(format!(
                    "unpack root {} is not empty; unpack into a new directory",
                    root.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir(root).map_err(|e| OciError::io("creating", root, e))?;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| OciError::io("chmod", root, e))
        }
        Err(e) => Err(OciError::io("reading", root, e)),
    }
}

fn apply_layer(
    state: &mut State,
    blobs: &BlobStore,
    layer: &Layer,
    index: usize,
    limits: &UnpackLimits,
) -> Result<(), OciError> {
    let what = format!("layer {index} ({})", layer.digest);
    let file = blobs.open_blob(&layer.digest)?;
    let reader: Box<dyn Read> = match layer.compression {
        Compression::None => Box::new(BufReader::new(file)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(file)
                .map_err(|e| OciError::bad_src(&what, "zstd decoder failed to start", e))?,
        ),
    };
    let mut tar = TarReader::new(Hashing::new(reader), &what, *limits, state.counters);
    let mut touched = HashSet::new();
    while let Some(member) = tar.next_member()? {
        state.apply(&mut tar, &member, &mut touched, &what)?;
    }
    state.counters = tar.counters;
    let mut rest = tar.into_inner();
    let trailer = io::copy(&mut (&mut rest).take(MAX_TRAILER + 1), &mut io::sink())
        .map_err(|e| OciError::bad_src(&what, "reading the layer failed", e))?;
    if trailer > MAX_TRAILER {
        return Err(OciError::bad(
            &what,
            "data after the end of the tar archive",
        ));
    }
    if let Some(expected) = &layer.diff_id {
        let actual = rest.finish();
        if &actual != expected {
            return Err(OciError::DigestMismatch {
                what: format!("uncompressed {what} (diff_id)"),
                expected: expected.clone(),
                actual,
            });
        }
    }
    tracing::debug!(
        layer = index,
        entries = state.counters.entries,
        "layer applied"
    );
    Ok(())
}

/// A reader that hashes what passes through (the layer's diff_id).
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Splits a tar path into components: leading `/`, `.` and empty components
/// dropped, `..` and NUL refused.
fn split_path<'a>(path: &'a [u8], what: &str) -> Result<Vec<&'a [u8]>, OciError> {
    let mut comps = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(OciError::bad(
                    what,
                    format!("path {:?} contains '..'", String::from_utf8_lossy(path)),
                ));
            }
            c if c.contains(&0) => return Err(OciError::bad(what, "path contains a NUL byte")),
            c => comps.push(c),
        }
    }
    Ok(comps)
}

/// Whether an extended attribute from an image is applied. `trusted.overlay.*`
/// would steer the guest's overlayfs (the image becomes its lower layer) and
/// `system.*` holds kernel-interpreted ACL blobs: both are dropped.
fn xattr_allowed(key: &[u8]) -> bool {
    (key.starts_with(b"user.") || key.starts_with(b"security.") || key.starts_with(b"trusted."))
        && !key.starts_with(b"trusted.overlay.")
}

struct State {
    root: RootDir,
    /// Directory mtimes, set at the very end (children change them while unpacking).
    dir_times: BTreeMap<Vec<u8>, (i64, u32)>,
    counters: Counters,
}

impl State {
    fn os_err(&self, op: &'static str, path: &[u8], e: Errno) -> OciError {
        let p = self
            .root
            .path()
            .join(String::from_utf8_lossy(path).as_ref());
        OciError::io(op, p, e.into())
    }

    /// The directory `comps`, created if missing when `create`.
    fn parent(
        &self,
        comps: &[&[u8]],
        create: bool,
        what: &str,
    ) -> Result<Option<OwnedFd>, OciError> {
        self.root.dir(comps, create).map_err(|e| match e {
            DirError::NotDir(p) => OciError::bad(
                what,
                format!(
                    "{:?} is in the way of a directory (not a directory, or a dangling symlink)",
                    String::from_utf8_lossy(&p)
                ),
            ),
            DirError::Os(op, e) => self.os_err(op, &comps.join(&b'/'), e),
        })
    }

    fn apply<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        m: &Member,
        touched: &mut HashSet<Vec<u8>>,
        what: &str,
    ) -> Result<(), OciError> {
        let comps = split_path(&m.path, what)?;
        let Some((name, parents)) = comps.split_last() else {
            if m.kind != Kind::Dir {
                return Err(OciError::bad(what, "a non-directory entry names the root"));
            }
            self.set_meta(self.root.fd(), b".", m, &[])?;
            self.dir_times.insert(Vec::new(), m.mtime);
            return Ok(());
        };
        if let Some(target) = name.strip_prefix(WHITEOUT) {
            return self.whiteout(parents, target, touched, what);
        }
        for i in 1..=comps.len() {
            touched.insert(comps[..i].join(&b'/'));
        }
        let dir = self
            .parent(parents, true, what)?
            .ok_or_else(|| OciError::bad(what, "parent directory vanished"))?;
        let full = comps.join(&b'/');
        match m.kind {
            Kind::Dir => {
                self.make_dir(&dir, name, &full)?;
                self.set_meta(&dir, name, m, &full)?;
                self.dir_times.insert(full, m.mtime);
                Ok(())
            }
            Kind::File => {
                self.replace(&dir, name, &full)?;
                self.write_file(tar, &dir, name, &full, what)?;
                self.set_meta(&dir, name, m, &full)
            }
            Kind::HardLink => self.hard_link(&dir, name, &comps, m, what),
            Kind::Symlink => {
                if m.link.is_empty() || m.link.contains(&0) {
                    return Err(OciError::bad(
                        what,
                        "symlink with an empty or NUL-containing target",
                    ));
                }
                self.replace(&dir, name, &full)?;
                symlinkat(m.link.as_slice(), &dir, *name)
                    .map_err(|e| self.os_err("symlink", &full, e))?;
                self.set_meta(&dir, name, m, &full)
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                self.replace(&dir, name, &full)?;
                let kind = match m.kind {
                    Kind::Char => SFlag::S_IFCHR,
                    Kind::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let dev = makedev(u64::from(m.dev.0), u64::from(m.dev.1));
                mknodat(&dir, *name, kind, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| self.os_err("mknod", &full, e))?;
                self.set_meta(&dir, name, m, &full)
            }
        }
    }

    /// `.wh.NAME` removes NAME; `.wh..wh..opq` empties the directory of what
    /// lower layers put there. Whiteouts are not materialized.
    fn whiteout(
        &mut self,
        parents: &[&[u8]],
        target: &[u8],
        touched: &HashSet<Vec<u8>>,
        what: &str,
    ) -> Result<(), OciError> {
        let Some(dir) = self.parent(parents, false, what)? else {
            return Ok(());
        };
        let base = parents.join(&b'/');
        let join = |n: &[u8]| {
            if base.is_empty() {
                n.to_vec()
            } else {
                [&base[..], b"/", n].concat()
            }
        };
        if [WHITEOUT, target].concat() == OPAQUE {
            let names = fsops::list_dir(&dir).map_err(|e| self.os_err("listing", &base, e))?;
            for n in names.iter().filter(|n| !touched.contains(&join(n))) {
                remove_at(&dir, n).map_err(|e| self.os_err("removing", &join(n), e))?;
            }
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(OciError::bad(what, "whiteout without a valid name"));
        }
        remove_at(&dir, target).map_err(|e| self.os_err("removing", &join(target), e))
    }

    /// Removes what is at `name` so that a new entry can take its place.
    fn replace(&self, dir: &OwnedFd, name: &[u8], full: &[u8]) -> Result<(), OciError> {
        remove_at(dir, name).map_err(|e| self.os_err("removing", full, e))
    }

    fn make_dir(&self, dir: &OwnedFd, name: &[u8], full: &[u8]) -> Result<(), OciError> {
        let existing = lstat_at(dir, name).map_err(|e| self.os_err("stat", full, e))?;
        match existing {
            Some(st) if is_dir(&st) => Ok(()),
            Some(_) => {
                self.replace(dir, name, full)?;
                nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700))
                    .map_err(|e| self.os_err("mkdir", full, e))
            }
            None => nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700))
                .map_err(|e| self.os_err("mkdir", full, e)),
        }
    }

    fn write_file<R: Read>(
        &self,
        tar: &mut TarReader<R>,
        dir: &OwnedFd,
        name: &[u8],
        full: &[u8],
        what: &str,
    ) -> Result<(), OciError> {
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(dir, name, flags, Mode::from_bits_truncate(0o600))
            .map_err(|e| self.os_err("creating", full, e))?;
        let mut file = File::from(fd);
        let mut buf = vec![0u8; 256 * 1024];
        let mut data = Data(tar);
        loop {
            let n = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(OciError::bad_src(
                        what,
                        "layer data is truncated or corrupt",
                        e,
                    ));
                }
            };
            file.write_all(&buf[..n])
                .map_err(|e| self.os_err("writing", full, fsops::io_errno(&e)))?;
        }
        Ok(())
    }

    fn hard_link(
        &self,
        dir: &OwnedFd,
        name: &[u8],
        comps: &[&[u8]],
        m: &Member,
        what: &str,
    ) -> Result<(), OciError> {
        let target = split_path(&m.link, what)?;
        let full = comps.join(&b'/');
        let Some((tname, tparents)) = target.split_last() else {
            return Err(OciError::bad(what, "hard link to the root"));
        };
        if target == comps {
            return Ok(());
        }
        let missing = || {
            OciError::bad(
                what,
                format!(
                    "hard link target {:?} is not an earlier entry",
                    String::from_utf8_lossy(&m.link)
                ),
            )
        };
        let tdir = self.parent(tparents, false, what)?.ok_or_else(missing)?;
        match lstat_at(&tdir, tname).map_err(|e| self.os_err("stat", &m.link, e))? {
            None => return Err(missing()),
            Some(st) if is_dir(&st) => return Err(OciError::bad(what, "hard link to a directory")),
            Some(_) => {}
        }
        self.replace(dir, name, &full)?;
        linkat(&tdir, *tname, dir, name, AtFlags::empty())
            .map_err(|e| self.os_err("link", &full, e))
    }

    /// Owner, then mode (chown clears setuid), then xattrs (chown clears
    /// capabilities), then mtime; directory mtimes are deferred.
    fn set_meta(
        &self,
        dir: &OwnedFd,
        name: &[u8],
        m: &Member,
        full: &[u8],
    ) -> Result<(), OciError> {
        let nofollow = AtFlags::AT_SYMLINK_NOFOLLOW;
        fchownat(
            dir,
            name,
            Some(Uid::from_raw(m.uid)),
            Some(Gid::from_raw(m.gid)),
            nofollow,
        )
        .map_err(|e| self.os_err("chown", full, e))?;
        if m.kind != Kind::Symlink {
            fchmodat(
                dir,
                name,
                Mode::from_bits_truncate(m.mode),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| self.os_err("chmod", full, e))?;
        }
        for (key, value) in &m.xattrs {
            if !xattr_allowed(key) {
                tracing::debug!(key = %String::from_utf8_lossy(key), "extended attribute dropped");
                continue;
            }
            fsops::set_xattr(dir, name, key, value)
                .map_err(|e| self.os_err("setxattr", full, e))?;
        }
        if m.kind != Kind::Dir {
            let t = TimeSpec::new(m.mtime.0, i64::from(m.mtime.1));
            utimensat(dir, name, &t, &t, UtimensatFlags::NoFollowSymlink)
                .map_err(|e| self.os_err("utimensat", full, e))?;
        }
        Ok(())
    }

    /// Sets the recorded directory mtimes, deepest first.
    fn restore_dir_times(&mut self) -> Result<(), OciError> {
        let times = std::mem::take(&mut self.dir_times);
        for (path, (secs, nanos)) in times.iter().rev() {
            let comps: Vec<&[u8]> = path
                .split(|b| *b == b'/')
                .filter(|c| !c.is_empty())
                .collect();
            let (dir, name): (OwnedFd, &[u8]) = match comps.split_last() {
                None => (
                    self.root
                        .fd()
                        .try_clone()
                        .map_err(|e| OciError::io("dup", self.root.path(), e))?,
                    b".",
                ),
                Some((name, parents)) => match self.root.dir(parents, false) {
                    Ok(Some(d)) => (d, name),
                    _ => continue,
                },
            };
            if !lstat_at(&dir, name)
                .ok()
                .flatten()
                .is_some_and(|st| is_dir(&st))
            {
                continue;
            }
            let t = TimeSpec::new(*secs, i64::from(*nanos));
            utimensat(&dir, name, &t, &t, UtimensatFlags::NoFollowSymlink)
                .map_err(|e| self.os_err("utimensat", path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
