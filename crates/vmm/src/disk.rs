//! Disks: the QEMU side of a VM's writable layer (freeze, inspect,
//! flatten over QMP) and making the qcow2 overlays new VMs start on.
//!
//! The writable disk is attached with `-drive if=none,id=`[`DISK_RW_DRIVE`],
//! so its block backend has a fixed name: QMP commands address it by that
//! name whichever file is on top after earlier freezes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::VmmError;
use crate::qmp::QmpClient;

/// The block backend (`-drive id=`) of the writable disk.
pub const DISK_RW_DRIVE: &str = "disk-rw";
/// The block backend of the image disk.
pub(crate) const DISK_IMAGE_DRIVE: &str = "disk-image";
/// Longest a flatten may take (it copies what the layers hold).
const FLATTEN_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest `qemu-img create` may take (it writes a few KiB).
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

fn path_str(p: &Path) -> Result<&str, VmmError> {
    if !p.is_absolute() {
        return Err(VmmError::InvalidSpec(format!(
            "disk path must be absolute: {}",
            p.display()
        )));
    }
    p.to_str()
        .ok_or_else(|| VmmError::InvalidSpec(format!("disk path is not UTF-8: {}", p.display())))
}

/// A new top made for a freeze, over the current one.
pub(crate) struct NewTop {
    path: PathBuf,
    old: PathBuf,
    /// The old top's owner and group: the VM's user, or root.
    owner: (u32, u32),
}

/// Makes `new_top`, an empty qcow2 overlay over the writable disk's
/// current top (by absolute path, its virtual size), owned like it: the
/// daemon makes it, as QEMU may not write the layer directory.
pub(crate) async fn prepare_top(
    qemu_img: &Path,
    q: &mut QmpClient,
    new_top: &Path,
) -> Result<NewTop, VmmError> {
    let old = rw_top(q)
        .await?
        .ok_or_else(|| VmmError::InvalidSpec("the vm has no writable disk".into()))?;
    let size = crate::rlimits::qcow2_virtual_size(&old)?;
    let m = std::fs::metadata(&old).map_err(|e| VmmError::io("stat", &old, e))?;
    create_overlay(qemu_img, new_top, &old, "qcow2", size).await?;
    let owner = (m.uid(), m.gid());
    std::os::unix::fs::chown(new_top, Some(owner.0), Some(owner.1))
        .map_err(|e| VmmError::io("chown", new_top, e))?;
    Ok(NewTop {
        path: new_top.to_path_buf(),
        old,
        owner,
    })
}

/// `blockdev-snapshot-sync` on the writable disk onto the prepared top
/// (`mode: existing`: its header already names the current top); the old
/// top is reopened read-only, and, when a VM user wrote it, becomes root's
/// and readable by the VM group (`crate::user::lock_layer`).
pub(crate) async fn snapshot_rw(q: &mut QmpClient, top: &NewTop) -> Result<(), VmmError> {
    let file = path_str(&top.path)?;
    let t = Instant::now();
    q.execute(
        "blockdev-snapshot-sync",
        Some(json!({
            "device": DISK_RW_DRIVE,
            "snapshot-file": file,
            "format": "qcow2",
            "mode": "existing",
        })),
    )
    .await?;
    if top.owner.0 != 0 {
        crate::user::lock_layer(&top.old, top.owner.1)?;
    }
    tracing::debug!(new_top = %top.path.display(), took_ms = t.elapsed().as_secs_f64() * 1e3,
        "writable disk frozen");
    Ok(())
}

/// The file on top of the writable disk, from `query-block`.
pub(crate) async fn rw_top(q: &mut QmpClient) -> Result<Option<PathBuf>, VmmError> {
    let blocks = q.execute("query-block", None).await?;
    Ok(blocks.as_array().and_then(|bs| {
        bs.iter()
            .find(|b| b.get("device").and_then(Value::as_str) == Some(DISK_RW_DRIVE))
            .and_then(|b| b.pointer("/inserted/file"))
            .and_then(Value::as_str)
            .map(PathBuf::from)
    }))
}

/// `block-stream` of everything above `base` into the writable disk's top,
/// waited for (polling `query-block-jobs`, QEMU 7.2 has no blocking wait).
pub(crate) async fn stream_rw(q: &mut QmpClient, id: &str, base: &Path) -> Result<(), VmmError> {
    let job = format!("flatten-{id}");
    q.execute(
        "block-stream",
        Some(json!({ "job-id": job, "device": DISK_RW_DRIVE, "base": path_str(base)? })),
    )
    .await?;
    let deadline = Instant::now() + FLATTEN_TIMEOUT;
    loop {
        let jobs = q.execute("query-block-jobs", None).await?;
        let mine = jobs.as_array().and_then(|js| {
            js.iter()
                .find(|j| j.get("device").and_then(Value::as_str) == Some(job.as_str()))
        });
        let Some(j) = mine else {
            // Gone from the list: ended. It failed if the top is not on
            // `base` now (a failed stream leaves the chain as it was).
            return check_backing(q, id, base).await;
        };
        if let Some(err) = j.get("error").and_then(Value::as_str) {
            return Err(VmmError::QmpCommand {
                command: "block-stream".into(),
                class: "JobFailed".into(),
                desc: err.to_string(),
            });
        }
        if Instant::now() > deadline {
            let _ = q
                .execute("block-job-cancel", Some(json!({ "device": job })))
                .await;
            return Err(VmmError::Timeout {
                what: format!("flattening the disk of {id}"),
                timeout: FLATTEN_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn check_backing(q: &mut QmpClient, id: &str, base: &Path) -> Result<(), VmmError> {
    let blocks = q.execute("query-block", None).await?;
    let backing = blocks
        .as_array()
        .and_then(|bs| {
            bs.iter()
                .find(|b| b.get("device").and_then(Value::as_str) == Some(DISK_RW_DRIVE))
        })
        .and_then(|b| b.pointer("/inserted/backing_file"))
        .and_then(Value::as_str);
    if backing == base.to_str() {
        return Ok(());
    }
    Err(VmmError::QmpCommand {
        command: "block-stream".into(),
        class: "JobFailed".into(),
        desc: format!(
            "the disk of {id} is on {backing:?} after flattening, not {}",
            base.display()
        ),
    })
}

/// Creates `top`, an empty qcow2 overlay of `size_bytes` over `backing`
/// (`raw` or `qcow2`), with `qemu-img` (QEMU's own tool; the format is
/// QEMU's). The backing file is not opened (`-u`): it may be in use, and
/// its size is given. Fails if `top` exists.
pub(crate) async fn create_overlay(
    qemu_img: &Path,
    top: &Path,
    backing: &Path,
    backing_format: &str,
    size_bytes: u64,
) -> Result<(), VmmError> {
    let (t, b) = (path_str(top)?, path_str(backing)?);
    if top.exists() {
        return Err(VmmError::io(
            "create overlay",
            top,
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    let mut cmd = tokio::process::Command::new(qemu_img);
    cmd.args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        b,
        "-F",
        backing_format,
    ])
    .args(["-o", &format!("size={size_bytes}"), t])
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = match tokio::time::timeout(CREATE_TIMEOUT, cmd.output()).await {
        Ok(r) => r.map_err(|e| VmmError::Spawn {
            bin: qemu_img.to_path_buf(),
            source: e,
        })?,
        Err(_) => {
            return Err(VmmError::Timeout {
                what: format!("qemu-img create {t}"),
                timeout: CREATE_TIMEOUT,
            });
        }
    };
    if !out.status.success() {
        let _ = std::fs::remove_file(top);
        return Err(VmmError::QemuExited {
            status: format!("qemu-img create: {}", out.status),
            stderr_tail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
