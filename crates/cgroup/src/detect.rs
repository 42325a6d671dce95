//! Where the daemon's own cgroups are: from `/proc/self/cgroup` (its path
//! in each hierarchy) and `/proc/self/mountinfo` (where each hierarchy is
//! mounted, and which part of it the mount shows).

use std::path::{Path, PathBuf};

use crate::error::CgroupError;
use crate::{CONTROLLERS, Layout};

/// One cgroup mount: v1 with its controllers, or v2.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// The hierarchy's path that the mount shows at `point`.
    root: String,
    point: PathBuf,
    /// `None` for cgroup2; the controllers (and `name=`s) for v1.
    v1: Option<Vec<String>>,
}

/// The cgroup mounts in a mountinfo text.
fn mounts(mountinfo: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let (root, point) = (unescape(pre[3]), PathBuf::from(unescape(pre[4])));
        match post[0] {
            "cgroup2" => out.push(Mount {
                root,
                point,
                v1: None,
            }),
            "cgroup" => out.push(Mount {
                root,
                point,
                v1: Some(post[2].split(',').map(str::to_string).collect()),
            }),
            _ => {}
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// `(controllers, path)` per line of `/proc/self/cgroup`; v2 has no
/// controllers (empty list).
fn memberships(self_cgroup: &str) -> Vec<(Vec<String>, String)> {
    self_cgroup
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
            let ctrls = ctrls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            Some((ctrls.collect(), path.to_string()))
        })
        .collect()
}

/// The directory of cgroup `path` under a mount showing `root` at `point`
/// (under `prefix`, `/` outside tests). `None` if the mount doesn't show it.
fn dir_of(prefix: &Path, m: &Mount, path: &str) -> Option<PathBuf> {
    let rel = if m.root == "/" {
        path.trim_start_matches('/')
    } else {
        let r = path.strip_prefix(m.root.as_str())?;
        if !(r.is_empty() || r.starts_with('/')) {
            return None;
        }
        r.trim_start_matches('/')
    };
    let point = m.point.strip_prefix("/").unwrap_or(&m.point);
    Some(prefix.join(point).join(rel))
}

/// The daemon's v2 cgroup directory, if a cgroup2 mount shows it.
pub(crate) fn v2_dir(prefix: &Path, self_cgroup: &str, mountinfo: &str) -> Option<PathBuf> {
    let (_, path) = memberships(self_cgroup)
        .into_iter()
        .find(|(c, _)| c.is_empty())?;
    mounts(mountinfo)
        .iter()
        .filter(|m| m.v1.is_none())
        .find_map(|m| dir_of(prefix, m, &path))
}

/// The daemon's cgroup directory in the v1 hierarchy of each controller.
pub(crate) fn v1_layout(
    prefix: &Path,
    self_cgroup: &str,
    mountinfo: &str,
) -> Result<Layout, CgroupError> {
    let ms = mounts(mountinfo);
    let member = memberships(self_cgroup);
    let mut dirs = Vec::with_capacity(CONTROLLERS.len());
    for c in CONTROLLERS {
        let has = |l: &[String]| l.iter().any(|x| x == c);
        let dir = member
            .iter()
            .filter(|(l, _)| has(l))
            .find_map(|(_, path)| {
                ms.iter()
                    .filter(|m| m.v1.as_deref().is_some_and(has))
                    .find_map(|m| dir_of(prefix, m, path))
            })
            .ok_or(CgroupError::NoController { controller: c })?;
        dirs.push(dir);
    }
    Ok(Layout::V1 { dirs })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// As on the machines forkvm is developed on.
    pub(crate) const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    pub(crate) const SELF_CGROUP: &str = "\
8:pids:/
4:memory:/process_api/4546
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn v1_dirs_are_the_daemons_cgroup_in_each_hierarchy() {
        let p = Path::new("/fake");
        let Layout::V1 { dirs } = v1_layout(p, SELF_CGROUP, MOUNTINFO).unwrap() else {
            panic!("v1 expected")
        };
        assert_eq!(
            dirs,
            [
                PathBuf::from("/fake/sys/fs/cgroup/memory/process_api/4546"),
                PathBuf::from("/fake/sys/fs/cgroup/cpu"),
                PathBuf::from("/fake/sys/fs/cgroup/pids"),
            ]
        );
        assert_eq!(
            v2_dir(p, SELF_CGROUP, MOUNTINFO),
            Some(PathBuf::from("/fake/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn combined_mounts_and_mount_roots_are_understood() {
        let mi = "\
1 0 0:1 /kube/pod /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
2 0 0:2 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
3 0 0:3 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
";
        let sc = "3:cpu,cpuacct:/kube/pod/d\n2:memory:/m\n1:pids:/p\n";
        let Layout::V1 { dirs } = v1_layout(Path::new("/"), sc, mi).unwrap() else {
            panic!("v1 expected")
        };
        assert_eq!(dirs[1], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/d"));
        // A path outside what the mount shows is not ours to use.
        let sc = "3:cpu,cpuacct:/elsewhere\n2:memory:/m\n1:pids:/p\n";
        assert!(matches!(
            v1_layout(Path::new("/"), sc, mi),
            Err(CgroupError::NoController { controller: "cpu" })
        ));
    }

    #[test]
    fn a_missing_controller_is_an_error() {
        let mi = "2 0 0:2 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert!(matches!(
            v1_layout(Path::new("/"), "2:memory:/\n", mi),
            Err(CgroupError::NoController { controller: "cpu" })
        ));
        assert_eq!(v2_dir(Path::new("/"), "2:memory:/\n", mi), None);
    }

    #[test]
    fn a_pure_v2_host() {
        let mi = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            v2_dir(Path::new("/r"), "0::/system.slice/forkvm.service\n", mi),
            Some(PathBuf::from(
                "/r/sys/fs/cgroup/system.slice/forkvm.service"
            ))
        );
    }
}
