//! What an instance boots: a guest image built by `forkvm image build`
//! (kernel + initramfs with the agent, e.g. `default`), or an OCI image —
//! the `default` guest image plus the image's root filesystem on a
//! read-only disk (`<data_dir>/oci/rootfs/<digest>.erofs`).

mod backend;
pub(crate) mod catalog;
pub(crate) mod progress;
pub(crate) mod pull;

pub use backend::{ImageBackend, OciBackend, OciFuture, ProgressFn};

pub use progress::PullProgress;
pub use pull::{PLATFORM, PullRequest};

use crate::error::{CoreError, Result};
use crate::model::{ImageRecord, ImageRunConfig, ImageStatus};
use crate::services::Services;
use std::path::PathBuf;

/// Everything a VMM of an instance needs from its image.
#[derive(Clone, Debug)]
pub(crate) struct BootImage {
    /// The name instances record: a guest image's as given, an OCI image's
    /// normalized reference.
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The image's root filesystem (erofs), attached read-only; `None`:
    /// the guest runs from its initramfs alone.
    pub rootfs: Option<PathBuf>,
    /// How the image's process runs (OCI images).
    pub run: Option<ImageRunConfig>,
}

/// The blobs an image is made of (what the pull cache keeps for it).
pub(crate) fn blobs_of(f: &forkvm_oci::Fetched) -> Vec<String> {
    let mut v = vec![f.manifest_digest.clone(), f.config_digest.clone()];
    v.extend(f.layers.iter().map(|l| l.digest.clone()));
    v
}

/// The guest image OCI images boot with (its kernel, initramfs and agent).
pub(crate) const GUEST_IMAGE: &str = "default";

/// Where the images' root filesystems are.
pub(crate) fn rootfs_dir(svc: &Services) -> PathBuf {
    svc.cfg.data_dir.join("oci").join("rootfs")
}

/// The root filesystem of the image whose manifest digest is `sha256:<hex>`.
pub(crate) fn rootfs_path(svc: &Services, hex: &str) -> PathBuf {
    rootfs_dir(svc).join(format!("{hex}.erofs"))
}

/// Resolves image `name` for booting: a built guest image by that name,
/// else a ready OCI image.
pub(crate) fn resolve(svc: &Services, name: &str) -> Result<BootImage> {
    match load_guest(svc, name) {
        Ok(guest) => {
            return Ok(BootImage {
                name: name.to_string(),
                kernel: guest.kernel,
                initrd: guest.initrd,
                rootfs: None,
                run: None,
            });
        }
        Err(CoreError::NotFound(_) | CoreError::Invalid(_)) => {}
        Err(e) => return Err(e),
    }
    let rec = find_ready(svc, name)?;
    let hex = rec
        .digest_hex()
        .ok_or_else(|| CoreError::Internal(format!("ready image {} has no digest", rec.name)))?;
    let guest = load_guest(svc, GUEST_IMAGE)?;
    Ok(BootImage {
        name: rec.name.clone(),
        kernel: guest.kernel,
        initrd: guest.initrd,
        rootfs: Some(rootfs_path(svc, hex)),
        run: Some(rec.config),
    })
}

/// The record of OCI image `name` (as given or normalized), if ready.
fn find_ready(svc: &Services, name: &str) -> Result<ImageRecord> {
    let rec = svc.store.find_image(&normalize(name)?)?.ok_or_else(|| {
        CoreError::NotFound(format!(
            "image {name:?} not found: pull it first (POST /images or `forkvm image pull`)"
        ))
    })?;
    match rec.status {
        ImageStatus::Ready => Ok(rec),
        ImageStatus::Failed => Err(CoreError::Conflict(format!(
            "image {} failed: {}",
            rec.name,
            rec.error.as_deref().unwrap_or("no reason recorded")
        ))),
        s => Err(CoreError::Conflict(format!(
            "image {} is {}; wait until it is ready",
            rec.name,
            s.as_str()
        ))),
    }
}

/// The name images are recorded under: the reference in normalized form.
fn normalize(name: &str) -> Result<String> {
    pull::parse(name).map(|r| r.to_string())
}

fn load_guest(svc: &Services, name: &str) -> Result<forkvm_image::GuestImage> {
    forkvm_image::load_image(&svc.cfg.data_dir, name).map_err(|e| match e {
        forkvm_image::ImageError::NotFound { .. } => CoreError::NotFound(format!(
            "image {name:?} not found: build it with `forkvm image build`"
        )),
        forkvm_image::ImageError::InvalidName(_) => {
            CoreError::Invalid(format!("invalid image name {name:?}"))
        }
        e => CoreError::Image(Box::new(e)),
    })
}
