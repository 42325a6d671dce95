//! Choosing KVM or TCG.
//!
//! `/dev/kvm` existing proves little: on a paravirtual KVM it opens, yet
//! `-cpu host` aborts and other models hang the guest kernel. So KVM is chosen
//! only after a bounded probe boot of the real kernel reaches userspace. The
//! answer is cached because the failing probe costs its full timeout.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::Accel;

/// Environment variable forcing the accelerator: `tcg` or `kvm`.
pub const ACCEL_ENV: &str = "FORKVM_ACCEL";
/// Bound on one probe boot.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Console text the kernel prints when it hands over to userspace
/// (`Run /init as init process`).
pub const PROBE_MARKER: &str = "as init process";

/// Picks the accelerator for `qemu` + `kernel`: `FORKVM_ACCEL` if set, else
/// TCG unless `/dev/kvm` opens and a KVM probe boot of `kernel` + `initrd`
/// reaches userspace within [`PROBE_TIMEOUT`]. With `cache_file`, a probe
/// result is stored there and reused while qemu and kernel are unchanged.
///
/// Blocking (up to the probe timeout): call it from `spawn_blocking`.
pub fn detect_accel(qemu: &Path, kernel: &Path, initrd: &Path, cache_file: Option<&Path>) -> Accel {
    let forced = std::env::var(ACCEL_ENV).ok();
    detect_accel_with(
        forced.as_deref(),
        Path::new("/dev/kvm"),
        qemu,
        kernel,
        initrd,
        cache_file,
        PROBE_TIMEOUT,
    )
}

/// [`detect_accel`] with every input explicit (for tests and odd hosts).
pub fn detect_accel_with(
    forced: Option<&str>,
    kvm_dev: &Path,
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    cache_file: Option<&Path>,
    probe_timeout: Duration,
) -> Accel {
    match forced.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("tcg") => return Accel::Tcg,
        Some("kvm") => return Accel::Kvm,
        Some("") | None => {}
        Some(other) => tracing::warn!(
            value = other,
            env = ACCEL_ENV,
            "ignoring unknown accel override"
        ),
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_dev)
    {
        tracing::info!(dev = %kvm_dev.display(), error = %e, "kvm unavailable; using tcg");
        return Accel::Tcg;
    }
    let key = CacheKey::new(qemu, kernel);
    if let Some(c) = cache_file
        && let Some(a) = read_cache(c, &key)
    {
        tracing::debug!(cache = %c.display(), accel = ?a, "accel from cache");
        return a;
    }
    let t0 = Instant::now();
    let ok = probe_boot(qemu, kernel, initrd, Accel::Kvm, probe_timeout);
    let accel = if ok { Accel::Kvm } else { Accel::Tcg };
    tracing::info!(accel = ?accel, probe_ms = t0.elapsed().as_millis() as u64, "accel probe done");
    if let Some(c) = cache_file {
        write_cache(c, &key, accel);
    }
    accel
}

/// Boots `kernel` + `initrd` under `accel` with the console on a pipe and
/// reports whether [`PROBE_MARKER`] appeared before `timeout`. The QEMU
/// process is always killed and reaped before returning.
pub fn probe_boot(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    accel: Accel,
    timeout: Duration,
) -> bool {
    let accel_args: &[&str] = match accel {
        Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
        Accel::Tcg => &["-accel", "tcg,thread=multi", "-cpu", "max"],
    };
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", "q35"])
        .args(accel_args)
        .args([
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 loglevel=7 panic=-1",
            "-serial",
            "stdio",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(qemu = %qemu.display(), error = %e, "accel probe: spawn failed");
            return false;
        }
    };
    let (tx, rx) = mpsc::channel::<()>();
    if let Some(out) = child.stdout.take() {
        // A thread, not async: this function is synchronous and the read ends
        // by itself at EOF once QEMU is killed.
        std::thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n') {
                let Ok(line) = line else { break };
                if String::from_utf8_lossy(&line).contains(PROBE_MARKER) {
                    let _ = tx.send(());
                    break;
                }
            }
        });
    }
    let stderr_reader = child.stderr.take().map(|err| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut s);
            s
        })
    });
    // The reader drops `tx` at EOF (QEMU exited): recv then errors out early
    // instead of waiting for the whole timeout.
    let ok = rx.recv_timeout(timeout).is_ok();
    let _ = child.kill();
    let status = child.wait();
    let stderr = stderr_reader
        .and_then(|t| t.join().ok())
        .unwrap_or_default();
    tracing::info!(accel = ?accel, ok, status = ?status.ok(), stderr = %stderr.trim(), "probe boot finished");
    ok
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheKey {
    qemu: PathBuf,
    qemu_stamp: Option<(u64, u128)>,
    kernel: PathBuf,
    kernel_stamp: Option<(u64, u128)>,
}

impl CacheKey {
    fn new(qemu: &Path, kernel: &Path) -> Self {
        CacheKey {
            qemu: qemu.to_path_buf(),
            qemu_stamp: stamp(qemu),
            kernel: kernel.to_path_buf(),
            kernel_stamp: stamp(kernel),
        }
    }
}

/// (size, mtime ns) so an upgraded qemu or kernel at the same path re-probes.
fn stamp(p: &Path) -> Option<(u64, u128)> {
    // `qemu` may be a bare name resolved through PATH; then there's no stamp.
    let m = std::fs::metadata(p).ok()?;
    let mtime = m
        .modified()
        .ok()?
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?;
    Some((m.len(), mtime.as_nanos()))
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: CacheKey,
    accel: Accel,
}

fn read_cache(path: &Path, key: &CacheKey) -> Option<Accel> {
    let data = std::fs::read(path).ok()?;
    let e: CacheEntry = serde_json::from_slice(&data).ok()?;
    (e.key == *key).then_some(e.accel)
}

fn write_cache(path: &Path, key: &CacheKey, accel: Accel) {
    let entry = CacheEntry {
        key: key.clone(),
        accel,
    };
    let Ok(data) = serde_json::to_vec_pretty(&entry) else {
        return;
    };
    // Write-then-rename so a concurrent reader never sees half a file.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let r = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(cache = %path.display(), error = %e, "could not write accel cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_wins_without_probing() {
        let nope = Path::new("/nonexistent/qemu");
        for (v, want) in [
            ("tcg", Accel::Tcg),
            ("KVM", Accel::Kvm),
            (" kvm ", Accel::Kvm),
        ] {
            assert_eq!(
                detect_accel_with(
                    Some(v),
                    Path::new("/nonexistent/kvm"),
                    nope,
                    nope,
                    nope,
                    None,
                    PROBE_TIMEOUT
                ),
                want
            );
        }
    }

    #[test]
    fn no_kvm_device_means_tcg() {
        let t0 = Instant::now();
        let nope = Path::new("/nonexistent/qemu");
        let a = detect_accel_with(
            Some("bogus"),
            Path::new("/nonexistent/kvm"),
            nope,
            nope,
            nope,
            None,
            PROBE_TIMEOUT,
        );
        assert_eq!(a, Accel::Tcg);
        assert!(t0.elapsed() < Duration::from_secs(1), "must not probe");
    }

    #[test]
    fn cache_roundtrip_and_invalidation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"v1").expect("write");
        let cache = dir.path().join("accel.json");
        let key = CacheKey::new(Path::new("/usr/bin/qemu-system-x86_64"), &kernel);
        assert_eq!(read_cache(&cache, &key), None);
        write_cache(&cache, &key, Accel::Kvm);
        assert_eq!(read_cache(&cache, &key), Some(Accel::Kvm));
        std::fs::write(&kernel, b"version 2").expect("write");
        let key2 = CacheKey::new(Path::new("/usr/bin/qemu-system-x86_64"), &kernel);
        assert_eq!(
            read_cache(&cache, &key2),
            None,
            "changed kernel must re-probe"
        );
    }

    #[test]
    fn probe_of_missing_binary_fails_fast() {
        let t0 = Instant::now();
        assert!(!probe_boot(
            Path::new("/nonexistent/qemu"),
            Path::new("/k"),
            Path::new("/i"),
            Accel::Tcg,
            PROBE_TIMEOUT
        ));
        assert!(t0.elapsed() < Duration::from_secs(1));
    }
}
