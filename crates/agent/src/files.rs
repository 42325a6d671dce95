//! The guest's files for the host: `Stat`, `CopyIn` (one file or directory
//! written), `CopyOut` (a file or a tree streamed) — hypeman's cp and stat.
//!
//! Paths are resolved from a root descriptor with `openat2(RESOLVE_IN_ROOT)`:
//! the guest's `/`, or with `image_root` the OCI image's root as the
//! workload sees it, so an image's symbolic link (`/etc -> /`) resolves
//! inside the image exactly as it would for the workload and never leads
//! into the agent's side. Trees are walked through directory descriptors
//! without following symbolic links. All of it is blocking file I/O: the
//! RPC handlers run it on tokio's blocking threads.

use crate::workload::mounts;
use forkvm_proto::agent::{
    CopyError, CopyInStart, CopyOutMessage, FileEnd, FileHeader, StatResponse, copy_out_message,
};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, mkdirat};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tokio::sync::mpsc;

/// Bytes per data message out.
const CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {errno}")]
    Os { path: String, errno: Errno },
    #[error("{0}")]
    Invalid(String),
    #[error("no image root is mounted (StartWorkload of an OCI image mounts it)")]
    NoImageRoot,
}

impl FileError {
    fn os(path: &str) -> impl Fn(Errno) -> Self + '_ {
        move |errno| Self::Os {
            path: path.to_string(),
            errno,
        }
    }

    fn io(path: &str) -> impl Fn(std::io::Error) -> Self + '_ {
        move |e| Self::Os {
            path: path.to_string(),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    pub fn status(&self) -> tonic::Status {
        match self {
            Self::Os {
                errno: Errno::ENOENT | Errno::ENOTDIR,
                ..
            } => tonic::Status::not_found(self.to_string()),
            Self::Os {
                errno: Errno::EEXIST | Errno::EISDIR | Errno::EACCES | Errno::ELOOP,
                ..
            }
            | Self::NoImageRoot => tonic::Status::failed_precondition(self.to_string()),
            Self::Invalid(_) => tonic::Status::invalid_argument(self.to_string()),
            Self::Os { .. } => tonic::Status::internal(self.to_string()),
        }
    }
}

/// The root paths are resolved in.
pub fn root(image_root: bool) -> Result<OwnedFd, FileError> {
    let dir = if image_root {
        if !mounts::image_root_mounted().unwrap_or(false) {
            return Err(FileError::NoImageRoot);
        }
        mounts::ROOT_DIR
    } else {
        "/"
    };
    nix::fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(FileError::os(dir))
}

/// `path` resolved in `root`; `follow`: whether a last component that is
/// a symbolic link is followed.
fn open_in(
    root: &OwnedFd,
    path: &str,
    flags: OFlag,
    mode: Mode,
    follow: bool,
) -> Result<OwnedFd, FileError> {
    if path.is_empty() || path.as_bytes().contains(&0) {
        return Err(FileError::Invalid(format!("bad path {path:?}")));
    }
    let nofollow = if follow {
        OFlag::empty()
    } else {
        OFlag::O_NOFOLLOW
    };
    let how = OpenHow::new()
        .flags(flags | nofollow | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(root, path, how).map_err(FileError::os(path))
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

fn link_target(fd: &OwnedFd) -> String {
    nix::fcntl::readlinkat(fd, "")
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn stat(root: &OwnedFd, path: &str, follow: bool) -> StatResponse {
    let fd = match open_in(root, path, OFlag::O_PATH, Mode::empty(), follow) {
        Ok(fd) => fd,
        Err(FileError::Os {
            errno: Errno::ENOENT | Errno::ENOTDIR,
            ..
        }) => return StatResponse::default(),
        Err(e) => {
            return StatResponse {
                error: e.to_string(),
                ..Default::default()
            };
        }
    };
    let st = match fstat(&fd) {
        Ok(st) => st,
        Err(e) => {
            return StatResponse {
                error: e.to_string(),
                ..Default::default()
            };
        }
    };
    let k = kind(&st);
    StatResponse {
        exists: true,
        is_dir: k == SFlag::S_IFDIR,
        is_file: k == SFlag::S_IFREG,
        is_symlink: k == SFlag::S_IFLNK,
        link_target: if k == SFlag::S_IFLNK {
            link_target(&fd)
        } else {
            String::new()
        },
        mode: st.st_mode & 0o7777,
        size: u64::try_from(st.st_size).unwrap_or(0),
        error: String::new(),
    }
}

/// `mkdir -p` of `path` in `root`.
fn make_dirs(root: &OwnedFd, path: &str, mode: Mode) -> Result<(), FileError> {
    let mut prefix = String::new();
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        let parent = if prefix.is_empty() {
            root.try_clone().map_err(FileError::io(path))?
        } else {
            open_in(
                root,
                &prefix,
                OFlag::O_PATH | OFlag::O_DIRECTORY,
                Mode::empty(),
                true,
            )?
        };
        match mkdirat(&parent, comp, mode) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(FileError::os(path)(e)),
        }
        prefix.push('/');
        prefix.push_str(comp);
    }
    // What is there now must be a directory (EEXIST may have been a file).
    open_in(
        root,
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        Mode::empty(),
        true,
    )
    .map(|_| ())
}

/// A file being written by `CopyIn`.
pub struct Incoming {
    file: Option<std::fs::File>,
    start: CopyInStart,
    pub written: u64,
}

/// Makes the directory, or creates (truncates) the file, of `start`.
pub fn begin(root: &OwnedFd, start: CopyInStart) -> Result<Incoming, FileError> {
    let path = start.path.trim_end_matches('/');
    if path.is_empty() {
        return Err(FileError::Invalid("a path is required".into()));
    }
    let default = if start.is_dir { 0o755 } else { 0o644 };
    let mode = Mode::from_bits_truncate(if start.mode == 0 {
        default
    } else {
        start.mode & 0o7777
    });
    if start.is_dir {
        make_dirs(root, path, mode)?;
        return Ok(Incoming {
            file: None,
            start,
            written: 0,
        });
    }
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (if d.is_empty() { "/" } else { d }, n),
        None => ("/", path),
    };
    make_dirs(root, dir, Mode::from_bits_truncate(0o755))?;
    let parent = open_in(
        root,
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        Mode::empty(),
        true,
    )?;
    // The last component is never followed: a symbolic link there is
    // refused (ELOOP), not written through.
    let fd = openat(
        &parent,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        mode,
    )
    .map_err(FileError::os(path))?;
    Ok(Incoming {
        file: Some(std::fs::File::from(fd)),
        start,
        written: 0,
    })
}

impl Incoming {
    pub fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        let Some(f) = self.file.as_mut() else {
            return Err(FileError::Invalid("data sent for a directory".into()));
        };
        f.write_all(data).map_err(FileError::io(&self.start.path))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Mode, owner and time as asked, then closed.
    pub fn finish(self, root: &OwnedFd) -> Result<u64, FileError> {
        let fd: OwnedFd = match self.file {
            Some(f) => f.into(),
            None => open_in(
                root,
                &self.start.path,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
                true,
            )?,
        };
        let path = self.start.path.as_str();
        if self.start.mode != 0 {
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(self.start.mode & 0o7777))
                .map_err(FileError::os(path))?;
        }
        if self.start.set_owner {
            nix::unistd::fchown(
                fd.as_fd(),
                Some(nix::unistd::Uid::from_raw(self.start.uid)),
                Some(nix::unistd::Gid::from_raw(self.start.gid)),
            )
            .map_err(FileError::os(path))?;
        }
        if self.start.mtime > 0 {
            let t = nix::sys::time::TimeSpec::new(self.start.mtime, 0);
            nix::sys::stat::futimens(&fd, &t, &t).map_err(FileError::os(path))?;
        }
        Ok(self.written)
    }
}

type Tx = mpsc::Sender<CopyOutMessage>;

fn send(tx: &Tx, kind: copy_out_message::Kind) -> bool {
    tx.blocking_send(CopyOutMessage { kind: Some(kind) })
        .is_ok()
}

fn header(rel: &str, st: &FileStat, link: Option<String>) -> copy_out_message::Kind {
    let k = kind(st);
    copy_out_message::Kind::Header(FileHeader {
        path: rel.to_string(),
        mode: st.st_mode & 0o7777,
        is_dir: k == SFlag::S_IFDIR,
        is_symlink: k == SFlag::S_IFLNK,
        link_target: link.unwrap_or_default(),
        size: if k == SFlag::S_IFREG {
            u64::try_from(st.st_size).unwrap_or(0)
        } else {
            0
        },
        mtime: st.st_mtime,
        uid: st.st_uid,
        gid: st.st_gid,
    })
}

fn end(tx: &Tx, last: bool) -> bool {
    send(tx, copy_out_message::Kind::End(FileEnd { r#final: last }))
}

fn error(tx: &Tx, e: &FileError, path: &str) {
    send(
        tx,
        copy_out_message::Kind::Error(CopyError {
            message: e.to_string(),
            path: path.to_string(),
        }),
    );
}

/// Streams `path` out to `tx` (header, data, end per entry; the last end
/// final, or an error message), until done or the receiver goes away.
pub fn copy_out(root: &OwnedFd, path: &str, follow: bool, tx: &Tx) {
    let name = Path::new(path.trim_end_matches('/'))
        .file_name()
        .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned());
    let fd = match open_in(root, path, OFlag::O_PATH, Mode::empty(), follow) {
        Ok(fd) => fd,
        Err(e) => return error(tx, &e, path),
    };
    if let Err(e) = entry(fd, &name, path, tx) {
        return error(tx, &e, path);
    }
    end(tx, true);
}

/// One entry (an O_PATH descriptor of it) and, for a directory, all below.
fn entry(fd: OwnedFd, rel: &str, shown: &str, tx: &Tx) -> Result<bool, FileError> {
    let st = fstat(&fd).map_err(FileError::os(shown))?;
    match kind(&st) {
        SFlag::S_IFLNK => Ok(send(tx, header(rel, &st, Some(link_target(&fd)))) && end(tx, false)),
        SFlag::S_IFREG => {
            let f = reopen(&fd, OFlag::O_RDONLY).map_err(FileError::os(shown))?;
            Ok(send(tx, header(rel, &st, None)) && data(f, shown, tx)? && end(tx, false))
        }
        SFlag::S_IFDIR => {
            if !(send(tx, header(rel, &st, None)) && end(tx, false)) {
                return Ok(false);
            }
            let dir =
                reopen(&fd, OFlag::O_RDONLY | OFlag::O_DIRECTORY).map_err(FileError::os(shown))?;
            let mut names: Vec<Vec<u8>> =
                nix::dir::Dir::from_fd(dir.try_clone().map_err(FileError::io(shown))?)
                    .map_err(FileError::os(shown))?
                    .iter()
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_bytes().to_vec())
                    .filter(|n| n != b"." && n != b"..")
                    .collect();
            names.sort();
            for n in names {
                let child_rel = format!("{rel}/{}", String::from_utf8_lossy(&n));
                let child = openat(
                    &dir,
                    std::ffi::OsStr::from_bytes(&n),
                    OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(FileError::os(&child_rel))?;
                if !entry(child, &child_rel, &child_rel, tx)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        // Devices, sockets, fifos: the header says what it is, no bytes.
        _ => Ok(send(tx, header(rel, &st, None)) && end(tx, false)),
    }
}

/// Opens what an O_PATH descriptor names for reading (through its /proc
/// link; the O_PATH descriptor already pinned the object).
fn reopen(fd: &OwnedFd, flags: OFlag) -> Result<OwnedFd, Errno> {
    use std::os::fd::AsRawFd;
    nix::fcntl::open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(),
        flags | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn data(f: OwnedFd, shown: &str, tx: &Tx) -> Result<bool, FileError> {
    let mut f = std::fs::File::from(f);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(FileError::io(shown))?;
        if n == 0 {
            return Ok(true);
        }
        if !send(tx, copy_out_message::Kind::Data(buf[..n].to_vec())) {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_fd(p: &Path) -> OwnedFd {
        nix::fcntl::open(p, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
    }

    #[test]
    fn paths_resolve_inside_the_root_and_trees_stream_out() {
        let t = tempfile::tempdir().unwrap();
        let root = dir_fd(t.path());
        // A link escaping the root resolves inside it.
        std::os::unix::fs::symlink("/", t.path().join("up")).unwrap();
        let mut inc = begin(
            &root,
            CopyInStart {
                path: "/up/d/f.bin".into(),
                mode: 0o600,
                ..Default::default()
            },
        )
        .unwrap();
        inc.write(b"\x00\xffdata").unwrap();
        assert_eq!(inc.finish(&root).unwrap(), 6);
        assert_eq!(
            std::fs::read(t.path().join("d/f.bin")).unwrap(),
            b"\x00\xffdata"
        );
        let st = stat(&root, "/d/f.bin", false);
        assert!(
            st.exists && st.is_file && st.mode == 0o600 && st.size == 6,
            "{st:?}"
        );
        let st = stat(&root, "/up", false);
        assert!(st.is_symlink && st.link_target == "/", "{st:?}");
        assert!(!stat(&root, "/nope", false).exists);
        // A symbolic link as the last component is not written through.
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("d/l")).unwrap();
        let e = begin(
            &root,
            CopyInStart {
                path: "/d/l".into(),
                ..Default::default()
            },
        );
        assert!(e.is_err());

        let (tx, mut rx) = mpsc::channel(64);
        std::thread::scope(|s| {
            s.spawn(|| copy_out(&root, "/d", false, &tx));
        });
        drop(tx);
        let mut seen = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m.kind.unwrap() {
                copy_out_message::Kind::Header(h) => seen.push(h.path),
                copy_out_message::Kind::Data(d) => assert_eq!(d, b"\x00\xffdata"),
                copy_out_message::Kind::End(e) if e.r#final => seen.push("FINAL".into()),
                copy_out_message::Kind::End(_) => {}
                copy_out_message::Kind::Error(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(seen, ["d", "d/f.bin", "d/l", "FINAL"]);
    }
}
