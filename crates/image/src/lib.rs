//! forkvm guest image builder.
//!
//! Builds the image every forkvm guest boots: Debian's own kernel (resolved and
//! downloaded with apt, never installed), unpacked to an uncompressed PVH-bootable
//! `vmlinux` because that boots ~2 s faster under TCG than the bzImage, and an
//! uncompressed cpio initramfs holding the forkvm agent as `/init`, busybox, the
//! virtio modules the agent loads in order from `/etc/forkvm/modules`, and the disk
//! modules (`/etc/forkvm/modules-disk`) it loads when an OCI workload starts.
//!
//! Layout under the data directory:
//! - `images/<name>/{vmlinux,initrd.cpio,manifest.json}` — replaced atomically as a whole;
//! - `cache/kernel/<pkg>_<version>/` — the downloaded `.deb` and `extracted/` (vmlinux,
//!   config, decompressed modules, `kernel.json`).
//!
//! A build whose inputs digest (agent, busybox, kernel package+version, module list,
//! format version) matches the existing manifest returns at once. See `docs/image.md`.

mod apt;
mod decompress;
mod elf;
mod error;
mod initramfs;
mod modules;

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use apt::METAPACKAGE;
pub use initramfs::{APPLETS, DISK_MODULES_LIST, MODULES_LIST};
pub use modules::{BOOT_MODULES, DISK_MODULES};

/// Bump when the image layout or builder logic changes: it invalidates every cached image.
pub const FORMAT_VERSION: u32 = 3;
/// Name of the image [`build_default_image`] builds.
pub const DEFAULT_IMAGE: &str = "default";
/// Default busybox binary (Debian's `busybox-static`).
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

const MANIFEST: &str = "manifest.json";
const KERNEL_FILE: &str = "vmlinux";
const INITRD_FILE: &str = "initrd.cpio";

/// What an image is built from.
#[derive(Debug, Clone)]
pub struct ImageInputs {
    /// forkvm's data directory; images and caches live under it.
    pub data_dir: PathBuf,
    /// Static guest agent binary; becomes `/init`.
    pub agent_binary: PathBuf,
    /// Static busybox; default [`DEFAULT_BUSYBOX`].
    pub busybox: PathBuf,
    /// Kernel package; `None` = the dependency of [`METAPACKAGE`].
    pub kernel_package: Option<String>,
}

impl ImageInputs {
    /// Inputs with the default busybox and kernel package.
    pub fn new(data_dir: impl Into<PathBuf>, agent_binary: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            agent_binary: agent_binary.into(),
            busybox: PathBuf::from(DEFAULT_BUSYBOX),
            kernel_package: None,
        }
    }
}

/// A built image, as stored in `images/<name>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    pub name: String,
    /// Uncompressed ELF kernel (PVH entry), for `-kernel`.
    pub kernel: PathBuf,
    /// Uncompressed cpio newc initramfs, for `-initrd`.
    pub initrd: PathBuf,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// Modules packed, in load order, relative to `/lib/modules/<kernel_version>/`:
    /// the boot modules, then the disk modules the agent loads on demand.
    pub modules: Vec<String>,
    pub built_at: DateTime<Utc>,
    /// sha256 (hex) over the build inputs; equal digest = same image.
    pub inputs_digest: String,
    /// Debian package the kernel came from, e.g. `linux-image-6.1.0-56-amd64`.
    pub kernel_package: String,
    /// Debian version of that package, e.g. `6.1.192-2`.
    pub kernel_package_version: String,
}

pub use error::ImageError;

/// Build progress sink. Stages are coarse ("download kernel", …); `bytes` reports the
/// current stage's byte progress when known.
pub trait Progress {
    fn stage(&self, name: &str);
    fn bytes(&self, done: u64, total: Option<u64>);
    fn finish(&self);
}

/// Discards progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _name: &str) {}
    fn bytes(&self, _done: u64, _total: Option<u64>) {}
    fn finish(&self) {}
}

/// Terminal progress bar (indicatif; hidden automatically when stderr is not a tty).
pub struct BarProgress {
    bar: ProgressBar,
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl BarProgress {
    pub fn new() -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_style(Self::spinner_style());
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar }
    }

    fn spinner_style() -> ProgressStyle {
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
    }

    fn bar_style() -> ProgressStyle {
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
    }
}

impl Progress for BarProgress {
    fn stage(&self, name: &str) {
        self.bar.set_style(Self::spinner_style());
        self.bar.set_position(0);
        self.bar.set_message(name.to_string());
    }

    fn bytes(&self, done: u64, total: Option<u64>) {
        if let Some(t) = total
            && self.bar.length() != Some(t)
        {
            self.bar.set_style(Self::bar_style());
            self.bar.set_length(t);
        }
        self.bar.set_position(done);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Builds (or returns the cached) image named [`DEFAULT_IMAGE`].
pub fn build_default_image(
    inputs: &ImageInputs,
    progress: &dyn Progress,
) -> Result<GuestImage, ImageError> {
    build_image(inputs, DEFAULT_IMAGE, progress)
}

/// Builds (or returns the cached) image `name` from `inputs`.
pub fn build_image(
    inputs: &ImageInputs,
    name: &str,
    progress: &dyn Progress,
) -> Result<GuestImage, ImageError> {
    validate_name(name)?;
    let started = Instant::now();
    let agent =
        fs::read(&inputs.agent_binary).map_err(|e| ImageError::io(&inputs.agent_binary, e))?;
    if let Some(reason) = elf::not_static(&agent) {
        return Err(ImageError::AgentNotStatic {
            path: inputs.agent_binary.clone(),
            reason,
        });
    }
    let busybox = fs::read(&inputs.busybox).map_err(|e| ImageError::io(&inputs.busybox, e))?;
    let kernel_cache = inputs.data_dir.join("cache").join("kernel");
    fs::create_dir_all(&kernel_cache).map_err(|e| ImageError::io(&kernel_cache, e))?;

    progress.stage("resolving kernel package");
    let resolved = apt::resolve(&kernel_cache, inputs.kernel_package.as_deref())?;
    let digest = inputs_digest(&agent, &busybox, &resolved);

    if let Some(img) = cached(&inputs.data_dir, name, &digest) {
        tracing::info!(image = name, digest = %digest, elapsed_ms = started.elapsed().as_millis() as u64, "image up to date");
        progress.finish();
        return Ok(img);
    }

    let images_dir = inputs.data_dir.join("images");
    fs::create_dir_all(&images_dir).map_err(|e| ImageError::io(&images_dir, e))?;
    // Serialise builders (CLI and daemon may race); re-check once we hold the lock.
    let _lock = BuildLock::acquire(&images_dir.join(".build.lock"))?;
    if let Some(img) = cached(&inputs.data_dir, name, &digest) {
        progress.finish();
        return Ok(img);
    }
    // Holding the lock, any temp dir left is from a crashed build.
    sweep_temp_dirs(&images_dir, &[".build-"]);

    let kernel = ensure_kernel(&kernel_cache, &resolved, progress)?;

    progress.stage("assembling initramfs");
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".build-{name}-"))
        .tempdir_in(&images_dir)
        .map_err(|e| ImageError::io(&images_dir, e))?;
    let size = write_initrd(
        &tmp.path().join(INITRD_FILE),
        inputs,
        &agent,
        &busybox,
        &kernel,
    )?;
    progress.bytes(size, Some(size));

    progress.stage("installing kernel");
    let kernel_tmp = tmp.path().join(KERNEL_FILE);
    // The cached vmlinux is never modified in place, so sharing its inode is safe.
    if fs::hard_link(&kernel.vmlinux, &kernel_tmp).is_err() {
        fs::copy(&kernel.vmlinux, &kernel_tmp).map_err(|e| ImageError::io(&kernel_tmp, e))?;
    }

    let final_dir = images_dir.join(name);
    let image = GuestImage {
        name: name.to_string(),
        kernel: final_dir.join(KERNEL_FILE),
        initrd: final_dir.join(INITRD_FILE),
        kernel_version: kernel.kernel_version.clone(),
        modules: kernel
            .modules
            .iter()
            .chain(&kernel.disk_modules)
            .map(|m| m.rel_path.clone())
            .collect(),
        built_at: Utc::now(),
        inputs_digest: digest,
        kernel_package: resolved.package.clone(),
        kernel_package_version: resolved.version.clone(),
    };
    write_manifest(tmp.path(), &final_dir, &image)?;
    install_dir(tmp.path(), &final_dir)?;
    // `tmp` now holds the previous image (or nothing); dropping it removes that.
    drop(tmp);
    tracing::info!(
        image = name,
        kernel_version = %image.kernel_version,
        modules = image.modules.len(),
        initrd_bytes = size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "image built"
    );
    progress.finish();
    Ok(image)
}

/// Reads `images/<name>/manifest.json`. Paths are re-anchored at the directory actually
/// read, so a moved data directory still works.
pub fn load_image(data_dir: &Path, name: &str) -> Result<GuestImage, ImageError> {
    validate_name(name)?;
    let dir = data_dir.join("images").join(name);
    let path = dir.join(MANIFEST);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::NotFound {
                name: name.to_string(),
                dir: data_dir.join("images"),
            });
        }
        Err(e) => return Err(ImageError::io(&path, e)),
    };
    let mut img: GuestImage =
        serde_json::from_slice(&text).map_err(|e| ImageError::Manifest { path, source: e })?;
    img.kernel = dir.join(KERNEL_FILE);
    img.initrd = dir.join(INITRD_FILE);
    Ok(img)
}

/// All images with a readable manifest, sorted by name. Unreadable ones are logged and
/// skipped so one broken directory does not hide the rest.
pub fn list_images(data_dir: &Path) -> Result<Vec<GuestImage>, ImageError> {
    let dir = data_dir.join("images");
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| ImageError::io(&dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        // Dot-prefixed entries are in-progress builds and the lock file.
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        match load_image(data_dir, &name) {
            Ok(img) => out.push(img),
            Err(ImageError::NotFound { .. }) => {}
            Err(e) => tracing::warn!(image = %name, error = %e, "skipping unreadable image"),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn validate_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidName(name.to_string()))
    }
}

fn cached(data_dir: &Path, name: &str, digest: &str) -> Option<GuestImage> {
    let img = load_image(data_dir, name).ok()?;
    let nonempty = |p: &Path| fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false);
    (img.inputs_digest == digest && nonempty(&img.kernel) && nonempty(&img.initrd)).then_some(img)
}

fn inputs_digest(agent: &[u8], busybox: &[u8], resolved: &apt::Resolved) -> String {
    let mut h = Sha256::new();
    // Length-prefixed fields so no two input sets hash the same byte stream.
    let mut field = |tag: &str, data: &[u8]| {
        h.update(tag.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    };
    field("format", &FORMAT_VERSION.to_le_bytes());
    field("agent", agent);
    field("busybox", busybox);
    field("kernel-package", resolved.package.as_bytes());
    field("kernel-version", resolved.version.as_bytes());
    field("modules", BOOT_MODULES.join(",").as_bytes());
    field("disk-modules", DISK_MODULES.join(",").as_bytes());
    field("applets", APPLETS.join(",").as_bytes());
    hex::encode(h.finalize())
}

/// Kernel artifacts ready for an image.
struct KernelArtifacts {
    vmlinux: PathBuf,
    kernel_version: String,
    /// Loaded at boot, in order.
    modules: Vec<modules::SelectedModule>,
    /// Loaded when a workload starts, in order, after `modules`.
    disk_modules: Vec<modules::SelectedModule>,
}

#[derive(Serialize, Deserialize)]
struct KernelMeta {
    format: u32,
    package: String,
    version: String,
    kernel_version: String,
    wanted: Vec<String>,
    wanted_disk: Vec<String>,
    /// (name, rel_path) in load order: at boot.
    modules: Vec<(String, String)>,
    /// (name, rel_path) in load order: when a workload starts, after `modules`.
    disk_modules: Vec<(String, String)>,
}

/// The initramfs (agent as `/init`, busybox, modules) at `path`, synced;
/// returns its size.
fn write_initrd(
    path: &Path,
    inputs: &ImageInputs,
    agent: &[u8],
    busybox: &[u8],
    kernel: &KernelArtifacts,
) -> Result<u64, ImageError> {
    let applets = initramfs::available_applets(&inputs.busybox);
    let file = File::create(path).map_err(|e| ImageError::io(path, e))?;
    let mut out = BufWriter::new(file);
    let size = initramfs::write(
        &mut out,
        &initramfs::Contents {
            init: agent,
            busybox,
            applets: &applets,
            kernel_version: &kernel.kernel_version,
            modules: &kernel.modules,
            disk_modules: &kernel.disk_modules,
        },
    )
    .map_err(|e| ImageError::io(path, e))?;
    let file = out
        .into_inner()
        .map_err(|e| ImageError::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| ImageError::io(path, e))?;
    Ok(size)
}

/// The extracted kernel tree in `out`: vmlinux, optional extras (kept for
/// debugging), the selected modules, and `kernel.json` written last (its
/// presence marks a complete extraction).
fn write_extraction(
    out: &Path,
    vmlinux: &[u8],
    extras: &[(PathBuf, &str)],
    selected: &[modules::SelectedModule],
    meta: &KernelMeta,
) -> Result<(), ImageError> {
    let mods_out = out.join("modules");
    fs::create_dir_all(&mods_out).map_err(|e| ImageError::io(&mods_out, e))?;
    write_atomic(&out.join(KERNEL_FILE), vmlinux)
        .map_err(|e| ImageError::io(out.join(KERNEL_FILE), e))?;
    for (src, dst) in extras {
        if src.exists() {
            fs::copy(src, out.join(dst)).map_err(|e| ImageError::io(src, e))?;
        }
    }
    for m in selected {
        let p = mods_out.join(&m.rel_path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
        }
        fs::write(&p, &m.data).map_err(|e| ImageError::io(&p, e))?;
    }
    let meta_path = out.join("kernel.json");
    let json = serde_json::to_vec_pretty(meta).map_err(|e| ImageError::Manifest {
        path: meta_path.clone(),
        source: e,
    })?;
    write_atomic(&meta_path, &json).map_err(|e| ImageError::io(&meta_path, e))
}

/// The image's manifest in the build directory `dir` (errors name its final
/// place in `final_dir`).
fn write_manifest(dir: &Path, final_dir: &Path, image: &GuestImage) -> Result<(), ImageError> {
    let json = serde_json::to_vec_pretty(image).map_err(|e| ImageError::Manifest {
        path: final_dir.join(MANIFEST),
        source: e,
    })?;
    write_atomic(&dir.join(MANIFEST), &json).map_err(|e| ImageError::io(dir.join(MANIFEST), e))
}

/// Returns the cached extraction for `resolved`, downloading and unpacking if needed.
fn ensure_kernel(
    kernel_cache: &Path,
    resolved: &apt::Resolved,
    progress: &dyn Progress,
) -> Result<KernelArtifacts, ImageError> {
    let dir = kernel_cache.join(format!("{}_{}", resolved.package, resolved.version));
    let extracted = dir.join("extracted");
    let wanted: Vec<String> = BOOT_MODULES.iter().map(|s| s.to_string()).collect();
    let wanted_disk: Vec<String> = DISK_MODULES.iter().map(|s| s.to_string()).collect();
    if let Some(k) = load_extracted(&extracted, resolved, &wanted, &wanted_disk) {
        tracing::info!(dir = %extracted.display(), "kernel cache hit");
        return Ok(k);
    }
    fs::create_dir_all(&dir).map_err(|e| ImageError::io(&dir, e))?;
    sweep_temp_dirs(&dir, &[".download-", ".unpack-"]);

    progress.stage(&format!("downloading {}", resolved.package));
    let deb = apt::download(&dir, resolved, progress)?;

    progress.stage("unpacking kernel package");
    let work = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(&dir)
        .map_err(|e| ImageError::io(&dir, e))?;
    let root = work.path().join("root");
    apt::run(
        std::process::Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&root),
    )?;
    let boot = root.join("boot");
    let (vmlinuz, kernel_version) = find_vmlinuz(&boot)?;

    progress.stage("extracting vmlinux");
    let bz = fs::read(&vmlinuz).map_err(|e| ImageError::io(&vmlinuz, e))?;
    let vmlinux = decompress::extract_vmlinux(&bz, progress)?;

    progress.stage("selecting modules");
    let modules_dir = root.join("lib/modules").join(&kernel_version);
    let mut sets = modules::select_module_sets(&modules_dir, &[BOOT_MODULES, DISK_MODULES])?;
    let disk = sets.pop().unwrap_or_default();
    let at_boot = sets.pop().unwrap_or_default();
    let pairs = |set: &[modules::SelectedModule]| -> Vec<(String, String)> {
        set.iter()
            .map(|m| (m.name.clone(), m.rel_path.clone()))
            .collect()
    };

    let out = work.path().join("extracted");
    let meta = KernelMeta {
        format: FORMAT_VERSION,
        package: resolved.package.clone(),
        version: resolved.version.clone(),
        kernel_version: kernel_version.clone(),
        wanted,
        wanted_disk,
        modules: pairs(&at_boot),
        disk_modules: pairs(&disk),
    };
    let extras = [
        (boot.join(format!("config-{kernel_version}")), "config"),
        (modules_dir.join("modules.builtin"), "modules.builtin"),
    ];
    let all: Vec<modules::SelectedModule> = at_boot.iter().chain(&disk).cloned().collect();
    write_extraction(&out, &vmlinux, &extras, &all, &meta)?;
    install_dir(&out, &extracted)?;
    tracing::info!(
        kernel_version = %kernel_version,
        vmlinux_bytes = vmlinux.len(),
        modules = ?meta.modules.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(),
        disk_modules = ?meta.disk_modules.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(),
        "kernel extracted"
    );
    Ok(KernelArtifacts {
        vmlinux: extracted.join(KERNEL_FILE),
        kernel_version,
        modules: at_boot,
        disk_modules: disk,
    })
}

fn load_extracted(
    extracted: &Path,
    resolved: &apt::Resolved,
    wanted: &[String],
    wanted_disk: &[String],
) -> Option<KernelArtifacts> {
    let meta: KernelMeta =
        serde_json::from_slice(&fs::read(extracted.join("kernel.json")).ok()?).ok()?;
    if meta.format != FORMAT_VERSION
        || meta.package != resolved.package
        || meta.version != resolved.version
        || meta.wanted != wanted
        || meta.wanted_disk != wanted_disk
    {
        return None;
    }
    let read = |pairs: Vec<(String, String)>| -> Option<Vec<modules::SelectedModule>> {
        pairs
            .into_iter()
            .map(|(name, rel_path)| {
                let data = fs::read(extracted.join("modules").join(&rel_path)).ok()?;
                Some(modules::SelectedModule {
                    name,
                    rel_path,
                    data,
                })
            })
            .collect()
    };
    let modules = read(meta.modules)?;
    let disk_modules = read(meta.disk_modules)?;
    let vmlinux = extracted.join(KERNEL_FILE);
    fs::metadata(&vmlinux).ok()?;
    Some(KernelArtifacts {
        vmlinux,
        kernel_version: meta.kernel_version,
        modules,
        disk_modules,
    })
}

/// Removes leftovers of crashed builds; only called while holding the build lock.
fn sweep_temp_dirs(dir: &Path, prefixes: &[&str]) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p)) {
            tracing::info!(path = %e.path().display(), "removing leftover from an interrupted build");
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn find_vmlinuz(boot: &Path) -> Result<(PathBuf, String), ImageError> {
    let rd = fs::read_dir(boot).map_err(|e| ImageError::io(boot, e))?;
    for e in rd.filter_map(Result::ok) {
        if let Some(ver) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("vmlinuz-"))
        {
            return Ok((e.path(), ver.to_string()));
        }
    }
    Err(ImageError::Package(format!(
        "no vmlinuz-* in {}",
        boot.display()
    )))
}

/// Moves the complete directory `src` to `dst`. An existing `dst` is swapped atomically
/// (`RENAME_EXCHANGE`), so readers see the old or the new image, never a mix; the old
/// contents end up at `src` for the caller to delete.
fn install_dir(src: &Path, dst: &Path) -> Result<(), ImageError> {
    if fs::symlink_metadata(dst).is_err() {
        fs::rename(src, dst).map_err(|e| ImageError::io(dst, e))?;
    } else if let Err(e) = rename_exchange(src, dst) {
        // Filesystems without RENAME_EXCHANGE: a crash between the two renames leaves
        // no image (rebuilt next time), never a half one.
        tracing::debug!(error = %e, "RENAME_EXCHANGE unsupported; two-step replace");
        let old = src.with_extension("old");
        fs::rename(dst, &old).map_err(|e| ImageError::io(dst, e))?;
        fs::rename(src, dst).map_err(|e| ImageError::io(dst, e))?;
        fs::rename(&old, src).map_err(|e| ImageError::io(src, e))?;
    }
    // Persist the rename itself; best effort, the data files were already synced.
    if let Some(parent) = dst.parent()
        && let Ok(d) = File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

fn rename_exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Writes `path` via a temp file + fsync + rename so it is never seen half-written.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Exclusive `flock` held for the duration of a build.
struct BuildLock(#[allow(dead_code)] File);

impl BuildLock {
    fn acquire(path: &Path) -> Result<Self, ImageError> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| ImageError::io(path, e))?;
        // SAFETY: flock on a file descriptor we own; released when `f` is closed.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(ImageError::io(path, std::io::Error::last_os_error()));
        }
        Ok(Self(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_changes_with_each_input() {
        let r = apt::Resolved {
            package: "linux-image-x".into(),
            version: "1".into(),
        };
        let base = inputs_digest(b"agent", b"bb", &r);
        assert_eq!(base, inputs_digest(b"agent", b"bb", &r));
        assert_ne!(base, inputs_digest(b"agent2", b"bb", &r));
        assert_ne!(base, inputs_digest(b"agent", b"bb2", &r));
        // Moving bytes between fields must not collide.
        assert_ne!(base, inputs_digest(b"agentb", b"b", &r));
        let r2 = apt::Resolved {
            version: "2".into(),
            ..r.clone()
        };
        assert_ne!(base, inputs_digest(b"agent", b"bb", &r2));
    }

    #[test]
    fn load_missing_image_is_typed_not_found_and_names_are_checked() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_image(d.path(), "default"),
            Err(ImageError::NotFound { .. })
        ));
        assert!(matches!(
            load_image(d.path(), "../etc"),
            Err(ImageError::InvalidName(_))
        ));
        assert!(list_images(d.path()).unwrap().is_empty());
    }

    #[test]
    fn install_dir_swaps_whole_directories() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("img");
        let a = d.path().join(".a");
        fs::create_dir(&a).unwrap();
        fs::write(a.join("f"), "old").unwrap();
        install_dir(&a, &dst).unwrap();
        assert!(!a.exists());
        let b = d.path().join(".b");
        fs::create_dir(&b).unwrap();
        fs::write(b.join("f"), "new").unwrap();
        install_dir(&b, &dst).unwrap();
        assert_eq!(fs::read_to_string(dst.join("f")).unwrap(), "new");
        // The previous contents are handed back at the source path for deletion.
        assert_eq!(fs::read_to_string(b.join("f")).unwrap(), "old");
    }

    #[test]
    fn list_skips_temp_dirs_and_reanchors_paths() {
        let d = tempfile::tempdir().unwrap();
        let img = GuestImage {
            name: "x".into(),
            kernel: "/elsewhere/vmlinux".into(),
            initrd: "/elsewhere/initrd.cpio".into(),
            kernel_version: "6.1".into(),
            modules: vec!["kernel/a.ko".into()],
            built_at: Utc::now(),
            inputs_digest: "00".into(),
            kernel_package: "p".into(),
            kernel_package_version: "1".into(),
        };
        let dir = d.path().join("images/x");
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(d.path().join("images/.build-x-123")).unwrap();
        fs::create_dir_all(d.path().join("images/empty")).unwrap();
        fs::write(dir.join(MANIFEST), serde_json::to_vec(&img).unwrap()).unwrap();
        let list = list_images(d.path()).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].kernel, dir.join(KERNEL_FILE));
        assert_eq!(list[0].modules, img.modules);
        fs::write(dir.join(MANIFEST), b"{not json").unwrap();
        assert!(matches!(
            load_image(d.path(), "x"),
            Err(ImageError::Manifest { .. })
        ));
        assert!(list_images(d.path()).unwrap().is_empty());
    }
}
