//! Where image content comes from and how it becomes a root disk: the narrow
//! trait the pull pipeline consumes ([`ImageBackend`]), and the real one over
//! `forkvm-oci` ([`OciBackend`]). Tests of the pipeline use a fake.

use forkvm_oci::{
    BlobStore, Credentials, Fetched, ImageName, OciError, Reference, RegistryOptions, UnpackLimits,
};
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;

pub type OciFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, OciError>> + Send + 'a>>;

/// Where a pull reports its progress.
pub type ProgressFn<'a> = dyn Fn(forkvm_oci::Progress) + Send + Sync + 'a;

/// Fetching and converting images.
pub trait ImageBackend: Send + Sync {
    /// Pulls `r`'s linux/amd64 manifest, config and layers (verified).
    fn pull<'a>(
        &'a self,
        r: &'a Reference,
        creds: Option<Credentials>,
        progress: &'a ProgressFn<'a>,
    ) -> OciFuture<'a, Fetched>;
    /// Reads an OCI layout or `docker save` archive at `path`.
    fn import<'a>(&'a self, path: &'a Path) -> OciFuture<'a, (Option<ImageName>, Fetched)>;
    /// Applies `fetched`'s layers and writes the root filesystem to `out`
    /// (atomically); returns its size in bytes.
    fn convert<'a>(&'a self, fetched: &'a Fetched, out: &'a Path) -> OciFuture<'a, u64>;
    /// The digests of the blobs kept (the pull cache).
    fn blobs(&self) -> Vec<String>;
    /// Removes these blobs (missing ones are no error).
    fn remove_blobs(&self, digests: &[String]);
}

/// `forkvm-oci` with a blob store and a private scratch directory under the
/// daemon's data directory.
pub struct OciBackend {
    blobs: BlobStore,
    scratch: PathBuf,
    insecure: Vec<String>,
    limits: UnpackLimits,
}

impl OciBackend {
    /// Blobs in `<oci_dir>/blobs`, unpacking in `<oci_dir>/tmp` (emptied
    /// here: what is in it was left by an interrupted conversion).
    pub fn open(oci_dir: &Path, insecure: Vec<String>) -> Result<Self, OciError> {
        let blobs = BlobStore::open(oci_dir.join("blobs"))?;
        let scratch = oci_dir.join("tmp");
        let io = |op, e| OciError::Io {
            op,
            path: scratch.clone(),
            source: e,
        };
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch).map_err(|e| io("emptying", e))?;
        }
        std::fs::create_dir_all(&scratch).map_err(|e| io("creating", e))?;
        // The unpacked trees hold the images' setuid files and devices.
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("restricting", e))?;
        Ok(Self {
            blobs,
            scratch,
            insecure,
            limits: UnpackLimits::default(),
        })
    }
}

impl ImageBackend for OciBackend {
    fn blobs(&self) -> Vec<String> {
        let dir = self.blobs.root().join("sha256");
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn remove_blobs(&self, digests: &[String]) {
        for d in digests {
            if let Ok(p) = self.blobs.path(d)
                && let Err(e) = std::fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(blob = %d, error = %e, "removing a blob failed");
            }
        }
    }

    fn pull<'a>(
        &'a self,
        r: &'a Reference,
        creds: Option<Credentials>,
        progress: &'a ProgressFn<'a>,
    ) -> OciFuture<'a, Fetched> {
        Box::pin(async move {
            let opts = RegistryOptions {
                insecure: self.insecure.clone(),
                credentials: creds,
            };
            forkvm_oci::pull(r, &opts, &self.blobs, progress).await
        })
    }

    fn import<'a>(&'a self, path: &'a Path) -> OciFuture<'a, (Option<ImageName>, Fetched)> {
        Box::pin(async move {
            let (path, blobs) = (path.to_path_buf(), self.blobs.clone());
            blocking(move || forkvm_oci::import(&path, &blobs)).await
        })
    }

    fn convert<'a>(&'a self, fetched: &'a Fetched, out: &'a Path) -> OciFuture<'a, u64> {
        Box::pin(async move {
            let (fetched, out) = (fetched.clone(), out.to_path_buf());
            let (blobs, limits) = (self.blobs.clone(), self.limits);
            let work = self.scratch.join(uuid::Uuid::new_v4().simple().to_string());
            blocking(move || {
                let r = unpack_and_build(&fetched, &blobs, &work, &limits, &out);
                // The tree is only an intermediate; the disk is the product.
                let _ = std::fs::remove_dir_all(&work);
                r
            })
            .await
        })
    }
}

fn unpack_and_build(
    fetched: &Fetched,
    blobs: &BlobStore,
    work: &Path,
    limits: &UnpackLimits,
    out: &Path,
) -> Result<u64, OciError> {
    std::fs::create_dir(work).map_err(|e| OciError::Io {
        op: "creating",
        path: work.to_path_buf(),
        source: e,
    })?;
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
        OciError::Io {
            op: "restricting",
            path: work.to_path_buf(),
            source: e,
        }
    })?;
    let root = work.join("root");
    forkvm_oci::unpack(fetched, blobs, &root, limits)?;
    forkvm_oci::build_erofs(&root, out)
}

/// Runs filesystem-heavy work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OciError> + Send + 'static,
) -> Result<T, OciError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OciError::InvalidInput(format!("image task failed: {e}")))?
}
