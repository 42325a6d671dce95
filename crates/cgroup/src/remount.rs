//! A daemon started with `ip netns exec` runs in a mount namespace of its
//! own whose `/sys` is a fresh sysfs: the host's cgroup hierarchies are not
//! mounted there. The daemon then mounts the ones it needs (those holding
//! [`CONTROLLERS`], and cgroup2) in that namespace, with the host's options
//! (read from pid 1's mounts): the same hierarchies, so the same cgroups.
//! Only when this process sees no cgroup mount at all while pid 1 does (so
//! its mount namespace is not pid 1's); the mounts are private to it.

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use crate::CONTROLLERS;
use crate::error::CgroupError;

/// Where the hierarchies go: sysfs keeps `/sys/fs/cgroup` as an empty
/// mount point for them.
const CGROUP_DIR: &str = "/sys/fs/cgroup";

/// One mount to make: file system type, its options, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wanted {
    fstype: &'static str,
    options: String,
    point: PathBuf,
}

/// The cgroup mounts of `host_mountinfo` that hold [`CONTROLLERS`] (v1) or
/// are cgroup2, each to be mounted under [`CGROUP_DIR`] by the last
/// component of its host mount point.
pub(crate) fn wanted(host_mountinfo: &str) -> Vec<Wanted> {
    let mut out: Vec<Wanted> = Vec::new();
    for line in host_mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let name = Path::new(pre[4]).file_name().map(PathBuf::from);
        let Some(name) = name.filter(|n| n.to_str().is_some_and(|s| !s.contains(".."))) else {
            continue;
        };
        let opts: Vec<&str> = post[2]
            .split(',')
            .filter(|o| !matches!(*o, "rw" | "ro"))
            .collect();
        let w = match post[0] {
            "cgroup2" => Wanted {
                fstype: "cgroup2",
                options: opts.join(","),
                point: Path::new(CGROUP_DIR).join(name),
            },
            "cgroup" if opts.iter().any(|o| CONTROLLERS.contains(o)) => Wanted {
                fstype: "cgroup",
                options: opts.join(","),
                point: Path::new(CGROUP_DIR).join(name),
            },
            _ => continue,
        };
        if !out.iter().any(|o| o.point == w.point) {
            out.push(w);
        }
    }
    out
}

/// Mounts the host's cgroup hierarchies here if this process is in a mount
/// namespace of its own where none is mounted. Returns whether it did.
pub(crate) fn mount_if_hidden(own_mountinfo: &str) -> Result<bool, CgroupError> {
    let any = own_mountinfo
        .lines()
        .any(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "));
    if any {
        return Ok(false);
    }
    let host =
        std::fs::read_to_string("/proc/1/mountinfo").map_err(|source| CgroupError::Proc {
            what: "/proc/1/mountinfo",
            source,
        })?;
    // Pid 1 sees cgroup mounts and this process does not: it is in a
    // mount namespace of its own (pid 1's `ns/mnt` link is not always
    // readable, its mountinfo is).
    let want = wanted(&host);
    if want.is_empty() {
        return Ok(false);
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let root = Path::new(CGROUP_DIR);
    mount(Some("tmpfs"), root, Some("tmpfs"), flags, Some("mode=755"))
        .map_err(|e| CgroupError::io("mount tmpfs on", root)(e.into()))?;
    // Private: nothing mounted here reaches any other namespace.
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| CgroupError::io("make private", root)(e.into()))?;
    for w in &want {
        std::fs::create_dir_all(&w.point).map_err(CgroupError::io("create", &w.point))?;
        mount(
            Some(w.fstype),
            &w.point,
            Some(w.fstype),
            flags,
            Some(w.options.as_str()),
        )
        .map_err(|e| CgroupError::io("mount cgroup on", &w.point)(e.into()))?;
    }
    tracing::info!(mounts = ?want, "mounted the host's cgroup hierarchies in this mount namespace");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hierarchies_holding_our_controllers_and_cgroup2_are_wanted() {
        let host = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";
        let w = wanted(host);
        let got: Vec<(&str, &str, &str)> = w
            .iter()
            .map(|w| (w.fstype, w.options.as_str(), w.point.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("cgroup", "cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct"),
                ("cgroup", "memory", "/sys/fs/cgroup/memory"),
                ("cgroup", "pids", "/sys/fs/cgroup/pids"),
                ("cgroup2", "nsdelegate", "/sys/fs/cgroup/unified"),
            ]
        );
    }
}
