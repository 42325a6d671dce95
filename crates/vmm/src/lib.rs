//! forkvm-vmm: the [`Hypervisor`] trait and its QEMU backend.
//!
//! A VM is one QEMU process in a session of its own, confined (seccomp,
//! rlimits, a cgroup: `launch`, `rlimits`, `cgroup`), that outlives the
//! forkvm daemon; after a restart the daemon re-finds them from their pidfile
//! with [`Hypervisor::adopt`], and [`Hypervisor::is_alive`] checks the pid
//! still belongs to *that* VM's QEMU (pid-reuse guard).
//!
//! Control goes through QMP ([`QmpClient`]), one short connection per
//! operation: QEMU serves one QMP client at a time, and short connections keep
//! no state that a daemon restart could lose.
//!
//! Guest RAM lives in a file (`memory-backend-file`, normally on tmpfs), which
//! is what makes fast snapshots possible: [`Hypervisor::save_state`] writes
//! only device state (`x-ignore-shared`), and [`Hypervisor::load_state`] loads
//! it into a QEMU started with [`VmSpec::incoming`] on the same RAM file.
//!
//! [`detect_accel`] picks KVM only where a real probe boot works, else TCG.

mod accel;
mod args;
mod cgroup;
mod disk;
mod error;
mod fds;
pub mod guest_ram;
mod jail;
mod launch;
mod migrate;
mod process;
mod qemu;
mod qmp;
mod rlimits;
mod user;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use accel::{
    ACCEL_ENV, PROBE_MARKER, PROBE_TIMEOUT, detect_accel, detect_accel_with, probe_boot,
};
pub use args::build_qemu_args;
pub use cgroup::{QEMU_MEMORY_OVERHEAD, QEMU_PIDS_BASE, limits_for, release as release_cgroup};
pub use disk::DISK_RW_DRIVE;
pub use error::VmmError;
pub use forkvm_cgroup::{CgroupError, CgroupRoot, Layout as CgroupLayout, Limits as CgroupLimits};
pub use process::{is_qemu_for, qemu_name, take_tap_fd};
pub use qemu::{AGENT_PORT_NAME, QEMU_PATH, QemuHypervisor, qemu_log_path};
pub use qmp::{DEFAULT_COMMAND_TIMEOUT, QmpClient};
pub use rlimits::QEMU_NOFILE;
pub use user::VmUser;

/// CPU virtualisation backend for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation; QEMU runs with `-accel kvm -cpu host`.
    Kvm,
    /// Software emulation; QEMU runs with `-accel tcg,thread=multi,tb-size=64 -cpu max`.
    Tcg,
}

/// A virtio-net NIC and where its frames go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    pub backend: NetBackend,
    /// `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
}

/// The host side of a NIC. Only the NIC is migrated state, so VMs that load
/// one snapshot may differ here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetBackend {
    /// A TAP device by name: an existing one (created by the caller), or a
    /// new one QEMU creates for itself and removes when it exits (a VM that
    /// never runs: the device state needs a backend with vnet headers).
    Tap(String),
    /// The TAP `tap` that the running QEMU `from_pid` holds: its fd is
    /// duplicated into the new QEMU (a handover; the TAP admits one opener).
    TakeOver { tap: String, from_pid: u32 },
}

/// What a virtio-blk disk holds; the guest finds it by its serial
/// (`forkvm-image`, `forkvm-rw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskRole {
    /// An image's root filesystem: a raw file, read-only, shared by every
    /// VM of that image.
    Image,
    /// The VM's writable layer: a qcow2 file of its own whose backing chain
    /// holds what earlier captures froze.
    Rw,
}

impl DiskRole {
    /// The virtio serial the guest finds the disk by.
    pub fn serial(self) -> &'static str {
        match self {
            DiskRole::Image => "forkvm-image",
            DiskRole::Rw => "forkvm-rw",
        }
    }
}

/// A virtio-blk disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub role: DiskRole,
    /// Absolute path of the file (raw for `Image`, qcow2 for `Rw`).
    pub path: PathBuf,
}

/// What a [`Hypervisor::migrate`] took.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    pub total_ms: f64,
    /// The last phase, with the source's vCPUs stopped.
    pub downtime_ms: f64,
    pub transferred_bytes: u64,
}

/// Everything needed to launch one QEMU process.
///
/// All paths must be absolute: QEMU runs with `/` as its working
/// directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Instance id (`[A-Za-z0-9._-]`, at most 64 chars); QEMU runs as
    /// `-name forkvm-<id>`, which is how pids are verified.
    pub id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line; `console=ttyS0` is the caller's job. Readable
    /// by host users in `/proc/<qemu>/cmdline`: nothing secret goes here.
    pub cmdline: String,
    /// A file QEMU hands the guest as the fw_cfg file
    /// `opt/forkvm/boot` (the boot config with the instance's env); QEMU
    /// reads it at startup, so the caller may remove it once QEMU runs.
    #[serde(default)]
    pub boot_config: Option<PathBuf>,
    /// Guest RAM file. With `mem_share` QEMU creates it if missing (sparse)
    /// and the caller owns it afterwards (it survives `stop`). Without
    /// `mem_share` it must already exist.
    pub mem_path: PathBuf,
    /// `true`: `share=on` (guest writes reach the file). `false`: `share=off`,
    /// a private copy-on-write mapping of an immutable base file.
    pub mem_share: bool,
    pub net: Option<NetSpec>,
    /// At most one disk per role. Device state only loads into a VM with
    /// the same disks (roles), so every VM of one snapshot has the same set.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Unix socket QEMU listens on for the virtio-serial port `forkvm.agent`.
    pub agent_socket: PathBuf,
    pub qmp_socket: PathBuf,
    /// Serial console output (appended to). QEMU's own output (stdout,
    /// stderr) goes to [`qemu_log_path`], beside it.
    pub console_log: PathBuf,
    pub pidfile: PathBuf,
    pub accel: Accel,
    /// Start with `-S -incoming defer`, waiting for [`Hypervisor::load_state`].
    pub incoming: bool,
    /// The unprivileged user QEMU runs as (`None`: as the caller, root).
    #[serde(default)]
    pub user: Option<VmUser>,
    /// An empty directory of the daemon's: QEMU runs in a mount namespace
    /// of its own whose root is a tmpfs mounted there, holding only what it
    /// needs (`crate::jail`). `None`: the host's file tree.
    #[serde(default)]
    pub jail: Option<PathBuf>,
}

/// A running VM as the hypervisor knows it. Plain data: it can be stored and
/// rebuilt after a daemon restart with [`VmHandle::for_spec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandle {
    pub id: String,
    pub pid: u32,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub pidfile: PathBuf,
    /// QEMU's runtime log ([`qemu_log_path`]), quoted in errors.
    pub qemu_log: PathBuf,
    /// The guest RAM file the process maps (to find it in `/proc/<pid>/maps`).
    pub mem_path: PathBuf,
}

impl VmHandle {
    /// The handle of the QEMU process `pid` launched from `spec`.
    pub fn for_spec(spec: &VmSpec, pid: u32) -> Self {
        VmHandle {
            id: spec.id.clone(),
            pid,
            qmp_socket: spec.qmp_socket.clone(),
            agent_socket: spec.agent_socket.clone(),
            pidfile: spec.pidfile.clone(),
            qemu_log: qemu_log_path(spec),
            mem_path: spec.mem_path.clone(),
        }
    }
}

/// QEMU's run state (`query-status`), with the ones forkvm acts on named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Running,
    Paused,
    /// Started with `incoming`, waiting for device state.
    InMigrate,
    /// Device state was saved; vCPUs are stopped.
    PostMigrate,
    /// Started with `-S` and not yet continued.
    Prelaunch,
    FinishMigrate,
    Shutdown,
    GuestPanicked,
    InternalError,
    /// Any other QEMU run state, verbatim.
    Other(String),
}

impl RunState {
    /// Maps QEMU's `status` string.
    pub fn from_qemu(s: &str) -> Self {
        match s {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "inmigrate" => RunState::InMigrate,
            "postmigrate" => RunState::PostMigrate,
            "prelaunch" => RunState::Prelaunch,
            "finish-migrate" => RunState::FinishMigrate,
            "shutdown" => RunState::Shutdown,
            "guest-panicked" => RunState::GuestPanicked,
            "internal-error" => RunState::InternalError,
            other => RunState::Other(other.to_string()),
        }
    }
}

/// Boxed future returned by [`Hypervisor`] methods; boxing keeps the trait
/// object-safe (`Arc<dyn Hypervisor>`), which matters more than one allocation.
pub type VmmFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, VmmError>> + Send + 'a>>;

/// A backend that runs VMs.
pub trait Hypervisor: Send + Sync {
    /// Launches the VM; returns once QEMU runs and QMP answers.
    fn start<'a>(&'a self, spec: &'a VmSpec) -> VmmFuture<'a, VmHandle>;

    /// QMP `quit`, then SIGTERM, then SIGKILL, each after `grace`; returns once
    /// the process is gone and its sockets and pidfile are removed. Stopping a
    /// VM that is already gone succeeds.
    fn stop<'a>(&'a self, h: &'a VmHandle, grace: Duration) -> VmmFuture<'a, ()>;

    /// `pid` is alive and is the QEMU of VM `id`.
    fn is_alive(&self, id: &str, pid: u32) -> bool;

    /// Finds a still-running VM launched from `spec` (pidfile + [`is_alive`](Self::is_alive)).
    fn adopt(&self, spec: &VmSpec) -> Option<VmHandle>;

    /// Stops the vCPUs.
    fn pause<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, ()>;

    /// Continues the vCPUs (also after `load_state` or `save_state`).
    fn resume<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, ()>;

    /// Holds (`true`: SIGSTOP, returns once every thread is stopped) or
    /// releases (SIGCONT) the VMM *process*. Paused vCPUs are not enough to
    /// keep a memory file unchanged: QEMU's device emulation still writes
    /// guest RAM (virtio-serial announces a host disconnect into a queue
    /// even then), so a file captured as a base must not be written once
    /// its device state is saved. A held VMM answers nothing; [`stop`](Self::stop)
    /// kills it at once (it must not run again to quit), `resume` and
    /// QMP need it released first.
    fn hold<'a>(&'a self, h: &'a VmHandle, held: bool) -> VmmFuture<'a, ()>;

    fn status<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, RunState>;

    /// Pauses the VM and writes its device state to `state_file` (guest RAM
    /// stays in the memory file). The VM is left paused (`PostMigrate`); while
    /// it is, the RAM file and the state file form a consistent snapshot.
    fn save_state<'a>(&'a self, h: &'a VmHandle, state_file: &'a Path) -> VmmFuture<'a, ()>;

    /// Loads device state into a VM started with `incoming`; leaves it paused.
    fn load_state<'a>(&'a self, h: &'a VmHandle, state_file: &'a Path) -> VmmFuture<'a, ()>;

    /// Migrates `from` (running or paused) into `to`, a VM started with
    /// `incoming` over RAM of its own: all guest RAM and the device state
    /// travel (no `x-ignore-shared`). `from` ends paused (resume it to go
    /// on; also after an error); `to` ends paused holding the whole machine.
    ///
    /// Stop-and-copy: `from`'s vCPUs stop before its RAM is read, so the
    /// reported downtime is the whole copy. QEMU 7.2's live pre-copy of a
    /// running TCG guest lost guest writes here (one destination in ~5 came
    /// up with corrupted kernel memory; none in 22 runs stopped first).
    ///
    /// With `freeze_disk`, `from`'s writable disk is frozen onto that new
    /// top (as [`freeze_disk`](Self::freeze_disk)) at the switchover, while
    /// its vCPUs are stopped: the frozen disk matches the migrated memory.
    fn migrate<'a>(
        &'a self,
        from: &'a VmHandle,
        to: &'a VmHandle,
        freeze_disk: Option<&'a Path>,
    ) -> VmmFuture<'a, MigrationReport>;

    /// Freezes the writable disk of a paused VM (its I/O is drained): the
    /// current top file never changes again and the VM goes on writing to
    /// `new_top`, a qcow2 overlay over it that QEMU creates.
    fn freeze_disk<'a>(&'a self, h: &'a VmHandle, new_top: &'a Path) -> VmmFuture<'a, ()>;

    /// The file the VM's writable disk writes to now (`None`: no such disk).
    fn disk_top<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, Option<PathBuf>>;

    /// Creates `top`, an empty qcow2 overlay of `size_bytes` over `backing`
    /// (`backing_format` `raw` or `qcow2`), for a VM to start on. Never
    /// overwrites; does not open `backing` (it may be in use).
    fn create_overlay<'a>(
        &'a self,
        top: &'a Path,
        backing: &'a Path,
        backing_format: &'a str,
        size_bytes: u64,
    ) -> VmmFuture<'a, ()>;

    /// Copies what the layers between the writable disk's top and `base`
    /// hold into the top, which then sits directly on `base`; returns when
    /// done. The VM may run meanwhile; the layers in between become unused.
    fn flatten_disk<'a>(&'a self, h: &'a VmHandle, base: &'a Path) -> VmmFuture<'a, ()>;

    /// Where guest-physical address `gpa` lies in the RAM (file) of a VM
    /// with `memory_mb` MiB on this backend's machine type; `None` if it is
    /// not RAM.
    fn ram_offset(&self, memory_mb: u32, gpa: u64) -> Option<u64>;

    /// Reads `len` bytes of the VM's RAM at RAM offset `offset`, as the VM
    /// sees it (its private copy-on-write pages included).
    fn read_ram<'a>(&'a self, h: &'a VmHandle, offset: u64, len: usize) -> VmmFuture<'a, Vec<u8>>;

    /// Writes into the VM's RAM at `offset`, into this VM's own mapping: a
    /// base file it maps copy-on-write never changes. Meant for a paused VM.
    fn write_ram<'a>(&'a self, h: &'a VmHandle, offset: u64, data: &'a [u8]) -> VmmFuture<'a, ()>;
}

/// Default grace period callers may use for [`Hypervisor::stop`].
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
