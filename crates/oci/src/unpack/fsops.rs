//! File system primitives relative to directory file descriptors, so that no
//! path from an image is ever resolved outside the unpack root.
//!
//! Parent directories are opened with `openat2(RESOLVE_IN_ROOT)`: the root
//! directory acts as `/` for the resolution, so symlinks inside the tree (e.g.
//! merged-usr `lib -> usr/lib`) resolve inside it, like a chrooted extraction,
//! and `..` or absolute targets are clamped to the root. Kernels without
//! `openat2` (before 5.6) get a stricter walk that refuses any symlink on the
//! way. The last component of a path is never followed.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Directory flags for descriptors used only as `*at` anchors.
fn dir_flags() -> OFlag {
    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

/// The unpack root, held open.
pub(crate) struct RootDir {
    fd: OwnedFd,
    path: PathBuf,
    openat2: bool,
}

/// Why a directory could not be reached.
#[derive(Debug)]
pub(crate) enum DirError {
    /// A component exists but is not a directory (or, without openat2, is a symlink).
    NotDir(Vec<u8>),
    Os(&'static str, Errno),
}

impl RootDir {
    pub fn open(path: &Path) -> Result<RootDir, Errno> {
        let fd = openat(
            nix::fcntl::AT_FDCWD,
            path,
            dir_flags() | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        let probe = openat2(
            &fd,
            ".",
            OpenHow::new().flags(dir_flags()).resolve(in_root()),
        );
        Ok(RootDir {
            fd,
            path: path.to_path_buf(),
            openat2: probe.is_ok(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Opens the directory `comps` below the root; missing components are created
    /// (mode 0755) when `create`, else `Ok(None)`.
    pub fn dir(&self, comps: &[&[u8]], create: bool) -> Result<Option<OwnedFd>, DirError> {
        let mut cur = self
            .fd
            .try_clone()
            .map_err(|e| DirError::Os("dup", io_errno(&e)))?;
        for i in 0..comps.len() {
            match self.step(&cur, comps, i) {
                Ok(fd) => cur = fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(&cur, comps[i], Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(DirError::Os("mkdir", e)),
                    }
                    // EEXIST with ENOENT before: a dangling symlink is in the way.
                    cur = self.step(&cur, comps, i).map_err(|e| match e {
                        Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP => {
                            DirError::NotDir(comps[..=i].join(&b'/'))
                        }
                        e => DirError::Os("open", e),
                    })?;
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(Errno::ENOTDIR | Errno::ELOOP) => {
                    return Err(DirError::NotDir(comps[..=i].join(&b'/')));
                }
                Err(e) => return Err(DirError::Os("open", e)),
            }
        }
        Ok(Some(cur))
    }

    /// Opens component `i`: with openat2, the whole prefix resolved in the root;
    /// without, one component below `cur`, never through a symlink.
    fn step(&self, cur: &OwnedFd, comps: &[&[u8]], i: usize) -> Result<OwnedFd, Errno> {
        if self.openat2 {
            let prefix = comps[..=i].join(&b'/');
            let how = OpenHow::new().flags(dir_flags()).resolve(in_root());
            openat2(&self.fd, prefix.as_slice(), how)
        } else {
            openat(
                cur,
                comps[i],
                dir_flags() | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )
        }
    }
}

fn in_root() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

pub(crate) fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// `lstat` of `name` in `dir`; `None` if it does not exist.
pub(crate) fn lstat_at(dir: &OwnedFd, name: &[u8]) -> Result<Option<FileStat>, Errno> {
    match fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// A path naming `name` in `dir` through `/proc/self/fd`: the directory is pinned
/// by its descriptor, and the last component is not followed by the `l*` calls.
pub(crate) fn proc_path(dir: &OwnedFd, name: &[u8]) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(OsStr::from_bytes(name));
    p
}

/// Removes `name` from `dir` whatever it is; a directory with everything in it
/// (std's `remove_dir_all` never follows symlinks). Missing is fine.
pub(crate) fn remove_at(dir: &OwnedFd, name: &[u8]) -> Result<(), Errno> {
    match lstat_at(dir, name)? {
        None => Ok(()),
        Some(st) if is_dir(&st) => {
            std::fs::remove_dir_all(proc_path(dir, name)).map_err(|e| io_errno(&e))
        }
        Some(_) => match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// The names in `dir` (without `.` and `..`).
pub(crate) fn list_dir(dir: &OwnedFd) -> Result<Vec<Vec<u8>>, Errno> {
    let fd = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut d = nix::dir::Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// Sets an extended attribute on `name` in `dir` without following it.
pub(crate) fn set_xattr(dir: &OwnedFd, name: &[u8], key: &[u8], value: &[u8]) -> Result<(), Errno> {
    let path = std::ffi::CString::new(proc_path(dir, name).into_os_string().into_vec())
        .map_err(|_| Errno::EINVAL)?;
    let key = std::ffi::CString::new(key.to_vec()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: both strings are NUL-terminated and live across the call; the value
    // pointer and length describe a valid slice.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(rc).map(|_| ())
}
