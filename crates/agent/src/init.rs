//! PID-1 duties: early mounts, console, kernel modules, boot config, hostname,
//! and the last-resort halt.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use forkvm_proto::{BootConfig, BootConfigError};
use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};
use nix::mount::{MsFlags, mount};
use tracing::{info, warn};

/// Modules to load, one path per line relative to `/lib/modules/<release>/`.
pub const MODULES_LIST: &str = "/etc/forkvm/modules";
/// The disk modules (virtio_blk, erofs, ext4, overlay and their dependencies),
/// same format, loaded when a workload starts rather than at boot.
pub const DISK_MODULES_LIST: &str = "/etc/forkvm/modules-disk";

/// Mounts the pseudo filesystems. Failures are logged (stderr; logging is not
/// up yet) and skipped: an agent with fewer mounts beats a dead PID 1.
pub fn early_mounts() {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, &str, MsFlags, Option<&str>); 7] = [
        ("proc", "/proc", "proc", nodev, None),
        ("sysfs", "/sys", "sysfs", nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (src, target, fstype, flags, data) in table {
        if let Err(e) = std::fs::create_dir_all(target) {
            eprintln!("forkvm-agent: mkdir {target}: {e}");
            continue;
        }
        match mount(Some(src), target, Some(fstype), flags, data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => eprintln!("forkvm-agent: mount {fstype} on {target}: {e}"),
        }
    }
}

/// Points stdin/stdout/stderr at /dev/console (the kernel only does this if
/// /dev/console existed in the initramfs before devtmpfs was mounted over it).
pub fn attach_console() {
    let Ok(console) = File::options().read(true).write(true).open("/dev/console") else {
        return;
    };
    for target in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors; both fds are valid.
        unsafe { libc::dup2(console.as_raw_fd(), target) };
    }
}

/// Loads the modules listed in [`MODULES_LIST`] in order. Returns (loaded, failed).
pub fn load_modules() -> (usize, usize) {
    load_module_list(MODULES_LIST)
}

/// Loads the modules listed in the file `list_path` in order (a missing list
/// loads nothing). Returns (loaded, failed); an already loaded module counts
/// as loaded.
pub fn load_module_list(list_path: &str) -> (usize, usize) {
    let list = match std::fs::read_to_string(list_path) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (0, 0),
        Err(e) => {
            warn!(path = list_path, error = %e, "cannot read module list");
            return (0, 0);
        }
    };
    let release = match nix::sys::utsname::uname() {
        Ok(u) => u.release().to_string_lossy().into_owned(),
        Err(e) => {
            warn!(error = %e, "uname failed; cannot locate modules");
            return (0, 0);
        }
    };
    let base = Path::new("/lib/modules").join(&release);
    let started = std::time::Instant::now();
    let (mut ok, mut failed) = (0, 0);
    for rel in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = base.join(rel);
        let res = File::open(&path)
            .map_err(|e| e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO))
            .and_then(|f| finit_module(&f, c"", ModuleInitFlags::empty()));
        match res {
            Ok(()) => ok += 1,
            // Already loaded (built in, or loaded as a dependency) is success.
            Err(Errno::EEXIST) => ok += 1,
            Err(e) => {
                failed += 1;
                warn!(module = %path.display(), error = %e, "module load failed");
            }
        }
    }
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    info!(
        list = list_path,
        loaded = ok,
        failed,
        elapsed_ms,
        "modules loaded"
    );
    (ok, failed)
}

/// Reads the boot config: the fw_cfg file forkvm passes (`qemu_fw_cfg` is
/// a boot module), else the kernel command line. A missing config is normal
/// (plain boot: defaults); a malformed one is logged and also falls back to
/// defaults, keeping the agent reachable so the host can diagnose.
pub fn read_boot_config() -> BootConfig {
    if let Some(c) = read_fw_cfg(Path::new(forkvm_proto::boot::FW_CFG_GUEST_PATH)) {
        return c;
    }
    let cmdline = match std::fs::read_to_string("/proc/cmdline") {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot read /proc/cmdline; using defaults");
            return BootConfig::default();
        }
    };
    match BootConfig::from_cmdline(&cmdline) {
        Ok(c) => c,
        Err(BootConfigError::Missing) => {
            info!("no boot config in fw_cfg or on the kernel command line; using defaults");
            BootConfig::default()
        }
        Err(e) => {
            warn!(error = %e, "bad forkvm.cfg; using defaults");
            BootConfig::default()
        }
    }
}

/// The fw_cfg document at `path`, read with a bound; `None` if absent or bad.
fn read_fw_cfg(path: &Path) -> Option<BootConfig> {
    use std::io::Read;
    let f = File::open(path).ok()?;
    let mut bytes = Vec::new();
    let limit = forkvm_proto::boot::MAX_FW_CFG_LEN as u64 + 1;
    if let Err(e) = f.take(limit).read_to_end(&mut bytes) {
        warn!(error = %e, "cannot read the fw_cfg boot config");
        return None;
    }
    match BootConfig::from_fw_cfg(&bytes) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "bad fw_cfg boot config");
            None
        }
    }
}

/// The kernel's uptime in milliseconds (`/proc/uptime`), for boot timing
/// in the log; `None` if unreadable.
pub fn kernel_uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1e3) as u64)
}

/// Last resort when the agent cannot continue: PID 1 must not exit (the kernel
/// would panic), so log, keep reaping orphans, and wait forever. Chosen over
/// power-off so the console log and a debugger stay available to the host.
pub fn halt_forever(reason: &str) -> ! {
    eprintln!("forkvm-agent: fatal: {reason}; agent halted (PID 1 keeps reaping)");
    loop {
        if let Err(Errno::ECHILD) = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(-1), None) {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}
