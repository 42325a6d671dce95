//! Getting an OCI image ready: record it (`pending`), wait for a slot,
//! fetch and verify it (`pulling`), build its root disk once per manifest
//! digest (`converting`), then `ready` — or `failed` with a code and a
//! reason. Pulls run in the background; the record is the progress report.
//!
//! Crash safety: every status change is stored first. At start
//! ([`resume_interrupted`]) a pull or import that was under way starts
//! over (blobs already verified are not fetched again), except a pull with
//! credentials, which were never stored: it fails as `interrupted`.

use super::rootfs_path;
use crate::error::{CoreError, Result};
use crate::model::{ImageRecord, ImageRunConfig, ImageSource, ImageStatus};
use crate::services::Services;
use forkvm_oci::{Credentials, Fetched, ImageName, OciError, Reference};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{Instrument, info, info_span, warn};

/// The only platform guests run here.
pub const PLATFORM: &str = "linux/amd64";
const MAX_TAGS: usize = 50;
const MAX_TAG_KEY: usize = 128;
const MAX_TAG_VALUE: usize = 256;

/// `POST /images`.
#[derive(Clone, Debug, Default)]
pub struct PullRequest {
    /// An image reference (`nginx:1.25`, `127.0.0.1:5000/app@sha256:…`).
    pub name: String,
    /// Basic (user and password) or a bearer token; used for this pull
    /// only, never stored or logged.
    pub credentials: Option<Credentials>,
    /// `os/arch[/variant]`; only `linux/amd64` runs here.
    pub platform: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// What a background job fetches.
enum Job {
    Pull(Reference, Option<Credentials>),
    Import(PathBuf),
}

/// Records the pull of `req.name` and starts it. An image already known
/// and not failed is returned as it is (pulling is idempotent); a failed
/// one is pulled again.
pub(crate) async fn request(svc: &Arc<Services>, req: PullRequest) -> Result<ImageRecord> {
    check_platform(req.platform.as_deref())?;
    check_tags(&req.tags)?;
    let r = parse(&req.name)?;
    let name = r.to_string();
    let _guard = svc.locks.acquire(&lock_key(&name)).await;
    let source = match req.credentials {
        Some(_) => ImageSource::RegistryWithCredentials,
        None => ImageSource::Registry,
    };
    let known = match svc.store.find_image(&name)? {
        Some(rec) if rec.status != ImageStatus::Failed => return Ok(rec),
        known => known.is_some(),
    };
    let rec = record_pending(svc, known, pending(svc, &name, req.tags, source))?;
    info!(image = %name, "image pull queued");
    spawn(svc, &rec, Job::Pull(r, req.credentials));
    Ok(rec)
}

/// Imports the OCI layout or `docker save` archive at `path` (on the
/// daemon's host) as `name`, or as the name the archive gives its image.
/// Returns once the image is ready or failed.
pub(crate) async fn import(
    svc: &Arc<Services>,
    path: &Path,
    name: Option<&str>,
    tags: BTreeMap<String, String>,
) -> Result<ImageRecord> {
    check_tags(&tags)?;
    if !path.is_absolute() {
        return Err(CoreError::Invalid(format!(
            "archive path {} must be absolute (it is read by the daemon)",
            path.display()
        )));
    }
    let meta = std::fs::metadata(path)
        .map_err(|_| CoreError::NotFound(format!("no archive at {}", path.display())))?;
    // Devices and FIFOs are no archives (and could block a reader forever).
    if !meta.is_file() && !meta.is_dir() {
        return Err(CoreError::Invalid(format!(
            "{} is neither a file nor a directory",
            path.display()
        )));
    }
    let given = name.map(parse).transpose()?;
    let (named, fetched) = svc.images.import(path).await.map_err(import_error)?;
    let name = match (given, named) {
        (Some(r), _) | (None, Some(ImageName::Reference(r))) => r.to_string(),
        (None, Some(ImageName::Tag(t))) => {
            return Err(CoreError::Invalid(format!(
                "the archive names its image only by the tag {t:?}; give the image a name"
            )));
        }
        (None, None) => {
            return Err(CoreError::Invalid(
                "the archive does not name its image; give the image a name".into(),
            ));
        }
    };
    let guard = svc.locks.acquire(&lock_key(&name)).await;
    let source = ImageSource::Archive {
        path: path.to_path_buf(),
    };
    let known = match svc.store.find_image(&name)? {
        Some(rec) if rec.status.in_progress() => {
            return Err(CoreError::Conflict(format!(
                "image {name} is {}; wait until it is done",
                rec.status.as_str()
            )));
        }
        known => known.is_some(),
    };
    let rec = record_pending(svc, known, pending(svc, &name, tags, source))?;
    drop(guard);
    finish(svc, &name, &rec.attempt, Ok(fetched)).await;
    svc.store
        .find_image(&name)?
        .ok_or_else(|| CoreError::Internal(format!("image {name} vanished while imported")))
}

/// After a restart: pulls and imports that were under way start over.
pub(crate) fn resume_interrupted(svc: &Arc<Services>) -> Result<()> {
    for rec in svc.store.list_images()? {
        if !rec.status.in_progress() {
            continue;
        }
        let job = match &rec.source {
            ImageSource::Registry => parse(&rec.name).map(|r| Job::Pull(r, None)),
            ImageSource::Archive { path } => Ok(Job::Import(path.clone())),
            ImageSource::RegistryWithCredentials => Err(CoreError::Conflict(
                "interrupted by a daemon restart; credentials are never stored, so pull it again with them".into(),
            )),
        };
        match job {
            Ok(job) => {
                info!(image = %rec.name, "resuming an interrupted image pull");
                let rec = ImageRecord {
                    status: ImageStatus::Pending,
                    attempt: new_attempt(),
                    ..rec
                };
                svc.store.update_image(&rec)?;
                spawn(svc, &rec, job);
            }
            Err(e) => svc.store.update_image(&ImageRecord {
                attempt: new_attempt(),
                ..failed(rec, "interrupted", &e.to_string())
            })?,
        }
    }
    Ok(())
}

fn spawn(svc: &Arc<Services>, rec: &ImageRecord, job: Job) {
    let (svc, name, attempt) = (svc.clone(), rec.name.clone(), rec.attempt.clone());
    let span = info_span!("image", image = %name);
    tokio::spawn(
        async move {
            let Ok(_slot) = svc.image_slots.clone().acquire_owned().await else {
                return;
            };
            if !advance(&svc, &name, &attempt, |r| r.status = ImageStatus::Pulling) {
                return;
            }
            let report = |p| svc.pulls.report(&name, p);
            let fetched = match job {
                Job::Pull(r, creds) => svc.images.pull(&r, creds, &report).await,
                Job::Import(path) => svc.images.import(&path).await.map(|(_, f)| f),
            };
            svc.pulls.done(&name);
            finish(&svc, &name, &attempt, fetched).await;
        }
        .instrument(span),
    );
}

/// From fetched content to a ready (or failed) record.
async fn finish(
    svc: &Services,
    name: &str,
    attempt: &str,
    fetched: std::result::Result<Fetched, OciError>,
) {
    let t = std::time::Instant::now();
    let outcome = match fetched {
        Ok(f) => convert(svc, name, attempt, &f).await,
        Err(e) => Err(e),
    };
    advance(svc, name, attempt, |rec| match &outcome {
        Ok(size) => {
            rec.status = ImageStatus::Ready;
            rec.size_bytes = Some(*size);
            rec.error = None;
            rec.error_code = None;
        }
        Err(e) => {
            warn!(image = %name, code = e.code(), error = %e, "image failed");
            rec.status = ImageStatus::Failed;
            rec.error = Some(e.to_string());
            rec.error_code = Some(e.code().to_string());
        }
    });
    info!(image = %name, ok = outcome.is_ok(),
          took_ms = t.elapsed().as_millis() as u64, "image done");
}

/// Changes the record if this attempt still owns it; false when it does
/// not (or the store failed, which is logged).
fn advance(svc: &Services, name: &str, attempt: &str, f: impl FnOnce(&mut ImageRecord)) -> bool {
    let r = svc.store.find_image(name).and_then(|rec| match rec {
        Some(mut rec) if rec.attempt == attempt => {
            f(&mut rec);
            svc.store.update_image(&rec).map(|()| true)
        }
        _ => Ok(false),
    });
    r.unwrap_or_else(|e| {
        warn!(image = %name, error = %e, "recording an image's progress failed");
        false
    })
}

/// Records what the manifest says and builds the root disk, once per
/// digest (two names of one image share it).
async fn convert(
    svc: &Services,
    name: &str,
    attempt: &str,
    f: &Fetched,
) -> std::result::Result<u64, OciError> {
    let moved = advance(svc, name, attempt, |rec| {
        rec.status = ImageStatus::Converting;
        rec.digest = Some(f.manifest_digest.clone());
        rec.config = run_config(f);
        rec.platform = Some(f.config.platform.clone());
        rec.blobs = super::blobs_of(f);
    });
    if !moved {
        return Err(OciError::InvalidInput(
            "superseded by another attempt".into(),
        ));
    }
    let hex = crate::model::sha256_hex(&f.manifest_digest)
        .ok_or_else(|| OciError::InvalidInput(format!("digest {}", f.manifest_digest)))?
        .to_string();
    let _guard = svc.locks.acquire(&format!("rootfs:{hex}")).await;
    let out = rootfs_path(svc, &hex);
    if let Ok(m) = std::fs::metadata(&out) {
        return Ok(m.len());
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| OciError::Io {
            op: "creating",
            path: dir.to_path_buf(),
            source: e,
        })?;
    }
    svc.images.convert(f, &out).await
}

fn run_config(f: &Fetched) -> ImageRunConfig {
    let c = &f.config;
    ImageRunConfig {
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
        env: c.env.clone(),
        working_dir: c.working_dir.clone(),
        user: c.user.clone(),
    }
}

/// Stores a new pending record, over an old one of the name if `known`.
fn record_pending(svc: &Services, known: bool, rec: ImageRecord) -> Result<ImageRecord> {
    if known {
        svc.store.update_image(&rec)?;
    } else {
        svc.store.insert_image(&rec)?;
    }
    Ok(rec)
}

fn pending(
    svc: &Services,
    name: &str,
    tags: BTreeMap<String, String>,
    source: ImageSource,
) -> ImageRecord {
    ImageRecord {
        name: name.to_string(),
        digest: None,
        status: ImageStatus::Pending,
        error: None,
        error_code: None,
        size_bytes: None,
        config: ImageRunConfig::default(),
        platform: None,
        tags,
        source,
        created_at: svc.now(),
        blobs: Vec::new(),
        queue_position: None,
        progress: None,
        attempt: new_attempt(),
    }
}

fn new_attempt() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn failed(rec: ImageRecord, code: &str, error: &str) -> ImageRecord {
    ImageRecord {
        status: ImageStatus::Failed,
        error: Some(error.to_string()),
        error_code: Some(code.to_string()),
        ..rec
    }
}

/// A reference in normalized form, or a clear 400.
pub(crate) fn parse(name: &str) -> Result<Reference> {
    name.parse::<Reference>()
        .map_err(|e| CoreError::Invalid(e.to_string()))
}

pub(crate) fn lock_key(name: &str) -> String {
    format!("image:{name}")
}

fn import_error(e: OciError) -> CoreError {
    match e.code() {
        "bad_archive"
        | "unsupported_platform"
        | "unsupported_media_type"
        | "too_large"
        | "digest_mismatch"
        | "size_mismatch"
        | "invalid_input" => CoreError::Invalid(format!("{e} ({})", e.code())),
        _ => CoreError::Internal(format!("importing: {e}")),
    }
}

fn check_platform(p: Option<&str>) -> Result<()> {
    match p {
        None | Some(PLATFORM) => Ok(()),
        Some(p) if p.split('/').count() < 2 || p.split('/').any(str::is_empty) => {
            Err(CoreError::Invalid(format!(
                "invalid platform {p:?}: expected os/arch[/variant]"
            )))
        }
        Some(p) => Err(CoreError::Invalid(format!(
            "platform {p} is not supported: guests here run {PLATFORM}"
        ))),
    }
}

fn check_tags(tags: &BTreeMap<String, String>) -> Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(CoreError::Invalid(format!("at most {MAX_TAGS} tags")));
    }
    for (k, v) in tags {
        if k.is_empty() || k.len() > MAX_TAG_KEY || v.len() > MAX_TAG_VALUE {
            return Err(CoreError::Invalid(format!(
                "tag {k:?}: keys are 1..{MAX_TAG_KEY} bytes, values at most {MAX_TAG_VALUE}"
            )));
        }
    }
    Ok(())
}
