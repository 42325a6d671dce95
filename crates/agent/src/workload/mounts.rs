//! The workload's root from the host's two disks (docs/guest-workload.md):
//! the erofs image (serial `forkvm-image`, read-only) at [`IMAGE_DIR`], the
//! ext4 writable layer (serial `forkvm-rw`) at [`RW_DIR`], an overlay of the
//! two at [`ROOT_DIR`], and proc, sys, dev and a tmpfs /tmp inside it.
//!
//! Idempotent: every mount is skipped when its target already is a mount
//! point. A resumed fork finds everything in place (the host switched the
//! disk files under it to copy-on-write overlays of the same content), and a
//! start that failed half-way completes on the next try.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use tracing::info;

use super::WorkloadError;
use crate::init;

/// virtio-blk serial of the read-only erofs image of the OCI rootfs.
pub const IMAGE_SERIAL: &str = "forkvm-image";
/// virtio-blk serial of the writable ext4 layer.
pub const RW_SERIAL: &str = "forkvm-rw";
pub const IMAGE_DIR: &str = "/run/forkvm/image";
pub const RW_DIR: &str = "/run/forkvm/rw";
pub const ROOT_DIR: &str = "/run/forkvm/root";
/// How long to wait for a disk to appear after its driver was loaded
/// (probing and the devtmpfs node are asynchronous).
const DISK_WAIT: Duration = Duration::from_secs(10);

/// Mounts whatever is missing and returns the workload root.
/// Blocking (module loading, mounts): run it off the runtime thread.
pub fn prepare_root() -> Result<PathBuf, WorkloadError> {
    let started = Instant::now();
    let table =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| WorkloadError::Io {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    let mounted = mount_points(&table);
    let is_mounted = |p: &str| mounted.iter().any(|m| m == p);
    let root = Path::new(ROOT_DIR);
    let inside = inside_mounts(root);
    if is_mounted(ROOT_DIR) && inside.iter().all(|m| is_mounted(&m.target_str())) {
        return Ok(root.to_path_buf());
    }
    if !is_mounted(IMAGE_DIR) || !is_mounted(RW_DIR) {
        init::load_module_list(init::DISK_MODULES_LIST);
    }
    if !is_mounted(IMAGE_DIR) {
        let dev = wait_for_disk(Path::new("/sys/block"), IMAGE_SERIAL)?;
        mount_one(&dev_mount(&dev, IMAGE_DIR, "erofs", MsFlags::MS_RDONLY))?;
    }
    if !is_mounted(RW_DIR) {
        let dev = wait_for_disk(Path::new("/sys/block"), RW_SERIAL)?;
        mount_one(&dev_mount(&dev, RW_DIR, "ext4", MsFlags::empty()))?;
    }
    let upper = Path::new(RW_DIR).join("upper");
    let work = Path::new(RW_DIR).join("work");
    if !is_mounted(ROOT_DIR) {
        ensure_dir(&upper)?;
        ensure_dir(&work)?;
        let data = format!(
            "lowerdir={IMAGE_DIR},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        mount_one(&Mount {
            source: "overlay".into(),
            target: root.to_path_buf(),
            fstype: Some("overlay"),
            flags: MsFlags::empty(),
            data: Some(data),
        })?;
    }
    for m in &inside {
        if !is_mounted(&m.target_str()) {
            mount_one(m)?;
        }
    }
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    info!(root = ROOT_DIR, elapsed_ms, "workload root mounted");
    Ok(root.to_path_buf())
}

/// One mount(2) call.
struct Mount {
    source: String,
    target: PathBuf,
    fstype: Option<&'static str>,
    flags: MsFlags,
    data: Option<String>,
}

impl Mount {
    fn target_str(&self) -> String {
        self.target.display().to_string()
    }
}

fn dev_mount(dev: &Path, target: &str, fstype: &'static str, flags: MsFlags) -> Mount {
    Mount {
        source: dev.display().to_string(),
        target: target.into(),
        fstype: Some(fstype),
        flags,
        data: None,
    }
}

/// proc, sys, the agent's /dev (recursive bind: devpts and shm come along)
/// and a fresh /tmp inside the workload root.
fn inside_mounts(root: &Path) -> [Mount; 4] {
    let pseudo = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let m = |source: &str, rel: &str, fstype, flags, data: Option<&str>| Mount {
        source: source.into(),
        target: root.join(rel),
        fstype,
        flags,
        data: data.map(Into::into),
    };
    [
        m("proc", "proc", Some("proc"), pseudo, None),
        m("sysfs", "sys", Some("sysfs"), pseudo, None),
        m(
            "/dev",
            "dev",
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        ),
        m(
            "tmpfs",
            "tmp",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ]
}

fn mount_one(m: &Mount) -> Result<(), WorkloadError> {
    ensure_dir(&m.target)?;
    let res = mount(
        Some(m.source.as_str()),
        &m.target,
        m.fstype,
        m.flags,
        m.data.as_deref(),
    );
    match res {
        Ok(()) => Ok(()),
        Err(errno) => Err(WorkloadError::Mount {
            what: format!("{} ({})", m.source, m.fstype.unwrap_or("bind")),
            target: m.target_str(),
            errno,
        }),
    }
}

/// Creates `dir` (and parents) if missing. An existing symbolic link is
/// refused: in the image it could point anywhere in the agent's root, where
/// mount would follow it.
fn ensure_dir(dir: &Path) -> Result<(), WorkloadError> {
    let path = || dir.display().to_string();
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) if m.file_type().is_symlink() => Err(WorkloadError::Symlink { path: path() }),
        Ok(_) => Err(WorkloadError::NotADirectory { path: path() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|source| WorkloadError::Io {
                path: path(),
                source,
            })
        }
        Err(source) => Err(WorkloadError::Io {
            path: path(),
            source,
        }),
    }
}

/// Mount points of a `/proc/self/mountinfo` text (the fifth field; the
/// kernel escapes spaces and the like as `\ooo`, which none of ours has).
pub fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(str::to_owned)
        .collect()
}

/// Whether the mount visible at [`ROOT_DIR`] in a `/proc/self/mountinfo`
/// text is the overlay [`prepare_root`] mounts (fstype `overlay`, lower
/// layer [`IMAGE_DIR`]), not a plain directory or some other filesystem.
/// With mounts stacked on the same point the last one is the visible one.
pub fn is_image_root(mountinfo: &str) -> bool {
    let top = mountinfo
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(ROOT_DIR));
    let Some((_, tail)) = top.and_then(|l| l.split_once(" - ")) else {
        return false;
    };
    let mut fields = tail.split(' ');
    let (fstype, _source, opts) = (fields.next(), fields.next(), fields.next());
    let lower = format!("lowerdir={IMAGE_DIR}");
    fstype == Some("overlay") && opts.is_some_and(|o| o.split(',').any(|opt| opt == lower))
}

/// [`is_image_root`] of this process's mount table: whether StartWorkload
/// mounted the image's root.
pub fn image_root_mounted() -> Result<bool, WorkloadError> {
    let path = "/proc/self/mountinfo";
    let table = std::fs::read_to_string(path).map_err(|source| WorkloadError::Io {
        path: path.into(),
        source,
    })?;
    Ok(is_image_root(&table))
}

/// The device node of the block device whose `serial` is `serial`, among the
/// entries of `sys_block` (`/sys/block`); `None` if there is none.
pub fn find_disk(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    entries.flatten().find_map(|e| {
        let s = std::fs::read_to_string(e.path().join("serial")).ok()?;
        (s.trim() == serial).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// [`find_disk`], polled until the disk and its device node appear or
/// [`DISK_WAIT`] passes.
fn wait_for_disk(sys_block: &Path, serial: &'static str) -> Result<PathBuf, WorkloadError> {
    let started = Instant::now();
    loop {
        if let Some(dev) = find_disk(sys_block, serial)
            && dev.exists()
        {
            return Ok(dev);
        }
        if started.elapsed() >= DISK_WAIT {
            return Err(WorkloadError::NoDisk {
                serial,
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a mount failed because its disk or filesystem is missing (the
/// host attached no such disk, or the module is absent): a precondition.
pub fn is_missing_fs(errno: Errno) -> bool {
    matches!(errno, Errno::ENODEV | Errno::ENOENT | Errno::ENXIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_of_mountinfo() {
        let text = "22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw\n\
            30 22 254:0 / /run/forkvm/image ro,relatime - erofs /dev/vda ro\n\
            garbage\n";
        assert_eq!(mount_points(text), ["/proc", "/run/forkvm/image"]);
    }

    #[test]
    fn image_root_is_the_agents_overlay() {
        let overlay = "40 1 0:30 / /run/forkvm/root rw,relatime - overlay overlay \
            rw,lowerdir=/run/forkvm/image,upperdir=/run/forkvm/rw/upper,workdir=/run/forkvm/rw/work\n";
        let proc_inside = "41 40 0:5 / /run/forkvm/root/proc rw - proc proc rw\n";
        assert!(is_image_root(overlay));
        assert!(is_image_root(&format!("{overlay}{proc_inside}")));
        // Nothing mounted there (a plain directory), or only below it.
        assert!(!is_image_root(""));
        assert!(!is_image_root(proc_inside));
        // Something else on the point, or another overlay.
        let tmpfs = "42 1 0:31 / /run/forkvm/root rw - tmpfs tmpfs rw\n";
        assert!(!is_image_root(tmpfs));
        let other = "43 1 0:32 / /run/forkvm/root rw - overlay overlay \
            rw,lowerdir=/elsewhere,upperdir=/u,workdir=/w\n";
        assert!(!is_image_root(other));
        // Stacked: the last mount on the point is the visible one.
        assert!(!is_image_root(&format!("{overlay}{tmpfs}")));
        assert!(is_image_root(&format!("{tmpfs}{overlay}")));
        // Optional fields before the separator.
        let shared = "44 1 0:30 / /run/forkvm/root rw shared:7 master:2 - overlay overlay \
            rw,lowerdir=/run/forkvm/image,upperdir=/x,workdir=/y\n";
        assert!(is_image_root(shared));
    }

    #[test]
    fn disks_are_found_by_serial() {
        let d = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", "forkvm-image\n"), ("vdb", "forkvm-rw")] {
            std::fs::create_dir(d.path().join(name)).unwrap();
            std::fs::write(d.path().join(name).join("serial"), serial).unwrap();
        }
        // A device without a serial file (loop, ram) is skipped.
        std::fs::create_dir(d.path().join("loop0")).unwrap();
        assert_eq!(
            find_disk(d.path(), IMAGE_SERIAL),
            Some(PathBuf::from("/dev/vda"))
        );
        assert_eq!(
            find_disk(d.path(), RW_SERIAL),
            Some(PathBuf::from("/dev/vdb"))
        );
        assert_eq!(find_disk(d.path(), "forkvm-other"), None);
        assert_eq!(find_disk(&d.path().join("absent"), RW_SERIAL), None);
    }

    #[test]
    fn ensure_dir_refuses_symlinks_and_files() {
        let d = tempfile::tempdir().unwrap();
        let new = d.path().join("a/b");
        ensure_dir(&new).unwrap();
        ensure_dir(&new).unwrap();
        std::os::unix::fs::symlink("/", d.path().join("link")).unwrap();
        assert!(matches!(
            ensure_dir(&d.path().join("link")),
            Err(WorkloadError::Symlink { .. })
        ));
        std::fs::write(d.path().join("file"), "").unwrap();
        assert!(matches!(
            ensure_dir(&d.path().join("file")),
            Err(WorkloadError::NotADirectory { .. })
        ));
    }
}
