//! One VM's cgroup: made with its limits, joined by QEMU before exec,
//! removed when QEMU is gone.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::error::CgroupError;
use crate::{CONTROLLERS, CgroupRoot, Layout};

/// Every per-VM cgroup's name starts with this; nothing else is ever
/// removed.
pub const VM_PREFIX: &str = "forkvm-";
/// The leaf a v2 daemon moves into so its cgroup may delegate.
const DAEMON_LEAF: &str = "forkvm-daemon";

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `memory.limit_in_bytes` (v1) / `memory.max` (v2).
    pub memory_bytes: u64,
    /// CPU time per period (µs): `cpu.cfs_quota_us` / first of `cpu.max`.
    pub cpu_quota_us: u64,
    /// `cpu.cfs_period_us` / second of `cpu.max`.
    pub cpu_period_us: u64,
    /// `pids.max`: processes and threads.
    pub pids_max: u64,
}

/// A VM's cgroup: one directory (v2) or one per controller (v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
}

fn write(path: &Path, v: &str) -> Result<(), CgroupError> {
    std::fs::write(path, v).map_err(CgroupError::io("write", path))
}

impl CgroupRoot {
    /// Creates VM cgroup `name` (starting with [`VM_PREFIX`], one path
    /// component) with `limits`. An empty leftover of the same name is
    /// replaced; on error nothing is left behind.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<VmCgroup, CgroupError> {
        check_name(name)?;
        let cg = VmCgroup {
            dirs: self.dirs_for(name),
        };
        // A cgroup of that name left by a crash: empty ones go (a busy one
        // belongs to a live VM and is an error).
        cg.remove()?;
        let made = cg.make(self.layout(), limits);
        if made.is_err() {
            let _ = cg.remove();
        }
        made.map(|()| cg)
    }
}

fn check_name(name: &str) -> Result<(), CgroupError> {
    let ok = name.len() > VM_PREFIX.len()
        && name.len() <= 200
        && name.starts_with(VM_PREFIX)
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_string()))
    }
}

impl VmCgroup {
    /// A VM cgroup known by its directories (as [`dirs`](Self::dirs) gave
    /// them, e.g. recorded before a daemon restart). Each must end in a
    /// [`VM_PREFIX`] name and be absolute, without `..`.
    pub fn from_dirs(dirs: Vec<PathBuf>) -> Result<Self, CgroupError> {
        for d in &dirs {
            let plain = d.is_absolute()
                && !d
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir));
            if !plain {
                return Err(CgroupError::BadName(d.display().to_string()));
            }
            check_name(d.file_name().and_then(|n| n.to_str()).unwrap_or(""))?;
        }
        Ok(VmCgroup { dirs })
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn make(&self, layout: &Layout, l: &Limits) -> Result<(), CgroupError> {
        for d in &self.dirs {
            std::fs::create_dir(d).map_err(CgroupError::io("create", d))?;
        }
        match layout {
            Layout::V2 { .. } => {
                let d = &self.dirs[0];
                write(&d.join("memory.max"), &l.memory_bytes.to_string())?;
                write(
                    &d.join("cpu.max"),
                    &format!("{} {}", l.cpu_quota_us, l.cpu_period_us),
                )?;
                write(&d.join("pids.max"), &l.pids_max.to_string())
            }
            Layout::V1 { .. } => {
                // Same order as CONTROLLERS.
                let (mem, cpu, pids) = (&self.dirs[0], &self.dirs[1], &self.dirs[2]);
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &l.memory_bytes.to_string(),
                )?;
                write(&cpu.join("cpu.cfs_period_us"), &l.cpu_period_us.to_string())?;
                let quota = v1_quota_within_parent(cpu, l.cpu_quota_us, l.cpu_period_us);
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&pids.join("pids.max"), &l.pids_max.to_string())
            }
        }
    }

    /// Opens each directory's `cgroup.procs` for a child to join with.
    pub fn joiner(&self) -> Result<Joiner, CgroupError> {
        let mut fds = Vec::with_capacity(self.dirs.len());
        for d in &self.dirs {
            let p = d.join("cgroup.procs");
            let f = OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(CgroupError::io("open", &p))?;
            fds.push(OwnedFd::from(f));
        }
        Ok(Joiner { fds })
    }

    /// Removes the cgroup's directories. Gone ones are fine; one that still
    /// has processes is [`CgroupError::Busy`] (the others are removed).
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut busy = None;
        for d in &self.dirs {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => busy = Some(d.clone()),
                // A fake root in tests holds the limit files as plain files.
                #[cfg(test)]
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && is_plain_dir(d) => {
                    std::fs::remove_dir_all(d).map_err(CgroupError::io("remove", d))?
                }
                Err(e) => return Err(CgroupError::io("remove", d)(e)),
            }
        }
        match busy {
            Some(d) => Err(CgroupError::Busy(d)),
            None => Ok(()),
        }
    }
}

/// A directory that is not on a cgroup file system (only a test's fake
/// root; a real cgroup directory is removed with `rmdir` alone).
#[cfg(test)]
fn is_plain_dir(d: &Path) -> bool {
    use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs};
    match statfs(d) {
        Ok(s) => ![CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC].contains(&s.filesystem_type()),
        Err(_) => false,
    }
}

/// Open `cgroup.procs` files of a VM cgroup; a child joins them with
/// [`JoinFds::join_self`] between fork and exec.
#[derive(Debug)]
pub struct Joiner {
    fds: Vec<OwnedFd>,
}

impl Joiner {
    /// The raw fds, to copy into a `pre_exec` closure; valid while `self`
    /// lives.
    pub fn fds(&self) -> JoinFds {
        let mut raw = [-1; CONTROLLERS.len()];
        for (r, f) in raw.iter_mut().zip(&self.fds) {
            *r = f.as_raw_fd();
        }
        JoinFds { raw }
    }
}

/// Plain fd numbers of a [`Joiner`] (Copy, for a child after fork).
#[derive(Debug, Clone, Copy)]
pub struct JoinFds {
    raw: [RawFd; CONTROLLERS.len()],
}

impl JoinFds {
    /// Moves the calling process into the cgroup: writes `0` (the writer
    /// itself) to each `cgroup.procs`. Only `write`: async-signal-safe, for
    /// a child between fork and exec.
    pub fn join_self(&self) -> std::io::Result<()> {
        for fd in self.raw.iter().copied().filter(|fd| *fd >= 0) {
            // SAFETY: writes one byte from a static buffer to an fd the
            // parent opened and keeps open until the child has exec'd.
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// v1 refuses (EINVAL) a child CFS quota above its parent's (per period):
/// a VM in a daemon limited to fewer CPUs than the VM's quota gets the
/// daemon's share instead of failing to start. v2 has no such rule.
fn v1_quota_within_parent(dir: &Path, quota: u64, period: u64) -> u64 {
    let read = |f: &str| -> Option<i64> {
        let parent = dir.parent()?;
        std::fs::read_to_string(parent.join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    match (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")) {
        (Some(pq), Some(pp)) if pq > 0 && pp > 0 => {
            let cap = (pq as u128 * u128::from(period) / pp as u128) as u64;
            quota.min(cap.max(1000))
        }
        _ => quota,
    }
}

/// Enables [`CONTROLLERS`] for the children of v2 cgroup `dir`. v2 allows
/// that only while `dir` holds no processes: if the daemon is alone there,
/// it moves itself into a leaf first.
pub(crate) fn enable_v2_controllers(dir: &Path) -> Result<(), CgroupError> {
    let sub = dir.join("cgroup.subtree_control");
    let on = std::fs::read_to_string(&sub).map_err(CgroupError::io("read", &sub))?;
    let on: Vec<&str> = on.split_whitespace().collect();
    let want: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| !on.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if want.is_empty() {
        return Ok(());
    }
    let want = want.join(" ");
    let first = std::fs::write(&sub, &want);
    let Err(e) = first else { return Ok(()) };
    if e.raw_os_error() != Some(libc::EBUSY) || !alone_in(dir) {
        return Err(CgroupError::Delegation {
            controllers: want,
            path: dir.to_path_buf(),
            source: e,
        });
    }
    let leaf = dir.join(DAEMON_LEAF);
    if !leaf.exists() {
        std::fs::create_dir(&leaf).map_err(CgroupError::io("create", &leaf))?;
    }
    write(&leaf.join("cgroup.procs"), "0")?;
    tracing::info!(leaf = %leaf.display(), "moved the daemon into a leaf cgroup to delegate controllers");
    std::fs::write(&sub, &want).map_err(|source| CgroupError::Delegation {
        controllers: want,
        path: dir.to_path_buf(),
        source,
    })
}

/// This process is the only one in v2 cgroup `dir`.
fn alone_in(dir: &Path) -> bool {
    let me = std::process::id().to_string();
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|p| p.split_whitespace().all(|x| x == me))
        .unwrap_or(false)
}

#[cfg(test)]
#[path = "vm/tests.rs"]
mod tests;
