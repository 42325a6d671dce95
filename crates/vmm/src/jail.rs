//! A mount namespace per QEMU holding only what it needs: its view of the
//! host's file tree is a small tmpfs root with read-only binds of the
//! system files QEMU and its libraries load (`/usr`, `ld.so.cache`, a few
//! device nodes, `/sys`), a `/proc` that hides other users' processes, and
//! the one directory it opens by path: its writable disk's layer directory
//! (qcow2 backing chains are opened by the path in each overlay's header).
//! Everything else it uses arrives as fds (`crate::fds`). Other tenants'
//! files, the daemon's store, `/etc`, `/root`, `/home`, `/tmp` and every
//! other socket on the host are not there at all, whatever the uid.
//!
//! Built in the forked child before exec ([`Jail::enter`]): `unshare` of
//! the mount namespace, everything made private, a tmpfs mounted on the
//! daemon's (empty) jail directory — the same directory serves every VM,
//! each mount lives in its VM's namespace only — binds, `pivot_root`, the
//! old root detached. The plan is computed before the fork
//! ([`Jail::plan`]): the child only makes syscalls on prepared C strings.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::VmmError;
use crate::{Accel, DiskRole, VmSpec};

/// Top-level names that are symlinks into `/usr` on merged-usr systems
/// (replicated) or directories (bound read-only).
const SYSTEM_TOP: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Device nodes every QEMU may open.
const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];
/// The old root while it is being detached.
const OLD_ROOT: &str = ".old-root";
/// Read-only (system files, executables among them).
const RO: libc::c_ulong = libc::MS_RDONLY;
/// Read-only data: no devices, nothing executable.
const RO_DATA: libc::c_ulong = libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOEXEC;
/// Device nodes, writable.
const DEV: libc::c_ulong = libc::MS_NOEXEC;
/// Writable data.
const RW_DATA: libc::c_ulong = libc::MS_NODEV | libc::MS_NOEXEC;

/// One step of building the jail, paths already inside the new root.
#[derive(Debug)]
enum Op {
    Mkdir(CString),
    /// An empty file to bind a file onto.
    Touch(CString),
    Symlink {
        target: CString,
        at: CString,
    },
    /// A recursive bind, then remounted `nosuid` plus `flags`.
    Bind {
        src: CString,
        dst: CString,
        flags: libc::c_ulong,
    },
    Proc(CString),
}

/// The prepared jail of one QEMU.
#[derive(Debug)]
pub(crate) struct Jail {
    root: CString,
    /// The old root's mountpoint inside the new root, before the pivot…
    put_old: CString,
    /// …and after it.
    old_root: CString,
    ops: Vec<Op>,
}

fn cstr(p: &Path) -> Result<CString, VmmError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| VmmError::InvalidSpec(format!("path with a NUL byte: {}", p.display())))
}

/// `path` (absolute) as seen inside `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Collects the ops in order, creating each parent directory once.
struct Planner {
    root: PathBuf,
    made: std::collections::BTreeSet<PathBuf>,
    ops: Vec<Op>,
}

impl Planner {
    fn mkdir_all(&mut self, dir: &Path) -> Result<(), VmmError> {
        let mut cur = PathBuf::from("/");
        for c in dir.components().skip(1) {
            cur.push(c);
            if self.made.insert(cur.clone()) {
                self.ops.push(Op::Mkdir(cstr(&inside(&self.root, &cur))?));
            }
        }
        Ok(())
    }

    /// Binds `src` at the same path inside, if it exists on the host.
    fn bind(&mut self, src: &Path, flags: libc::c_ulong) -> Result<(), VmmError> {
        let Ok(meta) = std::fs::metadata(src) else {
            return Ok(());
        };
        let dst = inside(&self.root, src);
        if meta.is_dir() {
            self.mkdir_all(src)?;
        } else {
            if let Some(parent) = src.parent() {
                self.mkdir_all(parent)?;
            }
            self.ops.push(Op::Touch(cstr(&dst)?));
        }
        self.ops.push(Op::Bind {
            src: cstr(src)?,
            dst: cstr(&dst)?,
            flags,
        });
        Ok(())
    }

    /// `/bin`, `/lib`…: a symlink stays a symlink, a directory is bound.
    fn system_top(&mut self, name: &str) -> Result<(), VmmError> {
        let host = Path::new("/").join(name);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                let target =
                    std::fs::read_link(&host).map_err(|e| VmmError::io("readlink", &host, e))?;
                self.ops.push(Op::Symlink {
                    target: cstr(&target)?,
                    at: cstr(&inside(&self.root, &host))?,
                });
                Ok(())
            }
            Ok(_) => self.bind(&host, RO),
            Err(_) => Ok(()),
        }
    }
}

impl Jail {
    /// The jail `spec` asks for, if any.
    pub(crate) fn for_spec(spec: &VmSpec, qemu_bin: &Path) -> Result<Option<Self>, VmmError> {
        spec.jail
            .as_deref()
            .map(|root| Self::plan(spec, root, qemu_bin))
            .transpose()
    }

    /// The jail of `spec`'s QEMU (binary `qemu_bin`), mounted on `root`
    /// (an existing empty directory of the daemon's).
    pub(crate) fn plan(spec: &VmSpec, root: &Path, qemu_bin: &Path) -> Result<Self, VmmError> {
        if !root.is_absolute() || !root.is_dir() {
            return Err(VmmError::InvalidSpec(format!(
                "jail root {} must be an existing absolute directory",
                root.display()
            )));
        }
        let mut p = Planner {
            root: root.to_path_buf(),
            made: Default::default(),
            ops: Vec::new(),
        };
        for name in SYSTEM_TOP {
            p.system_top(name)?;
        }
        p.bind(Path::new("/usr"), RO)?;
        p.bind(Path::new("/etc/ld.so.cache"), RO_DATA)?;
        if !qemu_bin.starts_with("/usr") {
            p.bind(qemu_bin, RO)?;
        }
        for d in DEVICES {
            p.bind(&Path::new("/dev").join(d), DEV)?;
        }
        if spec.accel == Accel::Kvm {
            p.bind(Path::new("/dev/kvm"), DEV)?;
        }
        p.bind(Path::new("/sys"), RO_DATA)?;
        p.mkdir_all(Path::new("/proc"))?;
        p.ops
            .push(Op::Proc(cstr(&inside(root, Path::new("/proc")))?));
        for d in spec.disks.iter().filter(|d| d.role == DiskRole::Rw) {
            if let Some(dir) = d.path.parent() {
                p.bind(dir, RW_DATA)?;
            }
        }
        p.mkdir_all(&Path::new("/").join(OLD_ROOT))?;
        Ok(Jail {
            root: cstr(root)?,
            put_old: cstr(&root.join(OLD_ROOT))?,
            old_root: cstr(&Path::new("/").join(OLD_ROOT))?,
            ops: p.ops,
        })
    }

    /// In the forked child, before exec: only syscalls on prepared data.
    pub(crate) fn enter(&self) -> std::io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        // The jail's own directories must be traversable by QEMU's user
        // whatever the daemon's umask (077); QEMU gets the daemon's back.
        // SAFETY: umask only changes this process's mask.
        let umask = unsafe { libc::umask(0o022) };
        let built = self.build(none);
        // SAFETY: as above.
        unsafe { libc::umask(umask) };
        built
    }

    fn build(&self, none: *const libc::c_char) -> std::io::Result<()> {
        use libc::{MS_NODEV, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC};
        // SAFETY: a plain syscall on this (single-threaded, forked) process.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
        // SAFETY: static C strings and null pointers as mount(2) documents.
        check(unsafe {
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                MS_REC | MS_PRIVATE,
                std::ptr::null(),
            )
        })?;
        // SAFETY: `root` is a valid C string; the options are static.
        check(unsafe {
            libc::mount(
                c"forkvm-jail".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                MS_NOSUID | MS_NODEV,
                c"mode=0755,size=1m".as_ptr().cast(),
            )
        })?;
        for op in &self.ops {
            apply(op)?;
        }
        // SAFETY: valid C strings; pivot_root has no libc wrapper.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pivot_root,
                self.root.as_ptr(),
                self.put_old.as_ptr(),
            )
        };
        check(if r == 0 { 0 } else { -1 })?;
        // SAFETY: static C strings.
        check(unsafe { libc::chdir(c"/".as_ptr()) })?;
        // SAFETY: as above.
        check(unsafe { libc::umount2(self.old_root.as_ptr(), libc::MNT_DETACH) })?;
        // SAFETY: as above.
        check(unsafe { libc::rmdir(self.old_root.as_ptr()) })?;
        // The tmpfs itself read-only from here on.
        // SAFETY: static C strings and null pointers.
        check(unsafe {
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                MS_REMOUNT_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
                std::ptr::null(),
            )
        })?;
        Ok(())
    }
}

const MS_REMOUNT_BIND: libc::c_ulong = libc::MS_REMOUNT | libc::MS_BIND;

fn check(r: libc::c_int) -> std::io::Result<()> {
    match r {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

fn apply(op: &Op) -> std::io::Result<()> {
    use libc::{MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_REC};
    let none = std::ptr::null::<libc::c_char>();
    match op {
        // SAFETY: each arm passes prepared C strings to one syscall.
        Op::Mkdir(p) => match unsafe { libc::mkdir(p.as_ptr(), 0o755) } {
            -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => check(r),
        },
        Op::Touch(p) => {
            // SAFETY: as above.
            let fd = unsafe {
                libc::open(
                    p.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                )
            };
            check(fd)?;
            // SAFETY: the fd just opened.
            check(unsafe { libc::close(fd) })
        }
        // SAFETY: as above.
        Op::Symlink { target, at } => check(unsafe { libc::symlink(target.as_ptr(), at.as_ptr()) }),
        Op::Bind { src, dst, flags } => {
            // SAFETY: as above.
            check(unsafe {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    none,
                    MS_BIND | MS_REC,
                    std::ptr::null(),
                )
            })?;
            // SAFETY: as above. nosuid everywhere, the rest per bind.
            check(unsafe {
                libc::mount(
                    none,
                    dst.as_ptr(),
                    none,
                    MS_REMOUNT_BIND | MS_NOSUID | flags,
                    std::ptr::null(),
                )
            })
        }
        // SAFETY: as above; hidepid=2 hides other users' processes.
        Op::Proc(dst) => check(unsafe {
            libc::mount(
                c"proc".as_ptr(),
                dst.as_ptr(),
                c"proc".as_ptr(),
                MS_NOSUID | MS_NODEV | MS_NOEXEC,
                c"hidepid=2".as_ptr().cast(),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_disk(dir: &Path) -> VmSpec {
        let mut s = crate::args::test_spec();
        s.disks = vec![crate::DiskSpec {
            role: DiskRole::Rw,
            path: dir.join("top.qcow2"),
        }];
        s
    }

    #[test]
    fn the_plan_binds_system_files_read_only_and_the_layer_directory_writable() {
        let root = tempfile::tempdir().unwrap();
        let layers = tempfile::tempdir().unwrap();
        let j = Jail::plan(
            &spec_with_disk(layers.path()),
            root.path(),
            Path::new("/usr/bin/qemu-system-x86_64"),
        )
        .unwrap();
        let r = root.path().to_string_lossy().into_owned();
        let binds: Vec<(String, bool)> = j
            .ops
            .iter()
            .filter_map(|o| match o {
                Op::Bind { src, flags, .. } => Some((
                    src.to_string_lossy().into_owned(),
                    flags & libc::MS_RDONLY != 0,
                )),
                _ => None,
            })
            .collect();
        assert!(binds.contains(&("/usr".into(), true)), "{binds:?}");
        assert!(binds.contains(&("/dev/null".into(), false)), "{binds:?}");
        let l = layers.path().to_string_lossy().into_owned();
        assert!(binds.contains(&(l.clone(), false)), "{binds:?}");
        assert!(
            !binds
                .iter()
                .any(|(s, _)| s == "/etc" || s == "/" || s == "/root")
        );
        assert!(
            !binds.iter().any(|(s, _)| s == "/dev/kvm"),
            "TCG gets no /dev/kvm"
        );
        // Every target is inside the root, and parents come before children.
        let mut seen = std::collections::BTreeSet::new();
        for o in &j.ops {
            if let Op::Mkdir(p) = o {
                let p = PathBuf::from(p.to_string_lossy().into_owned());
                assert!(p.starts_with(&r), "{}", p.display());
                if let Some(parent) = p
                    .parent()
                    .filter(|q| q.starts_with(&r) && *q != root.path())
                {
                    assert!(seen.contains(parent), "{} before its parent", p.display());
                }
                seen.insert(p);
            }
        }
        assert!(matches!(
            j.ops.iter().filter(|o| matches!(o, Op::Proc(_))).count(),
            1
        ));
    }

    #[test]
    fn a_missing_root_is_refused() {
        let s = crate::args::test_spec();
        assert!(Jail::plan(&s, Path::new("/nonexistent-jail"), Path::new("/usr/bin/q")).is_err());
        assert!(Jail::plan(&s, Path::new("relative"), Path::new("/usr/bin/q")).is_err());
    }
}
