//! Leftovers that belong to no instance (a crash between creating something
//! and recording it): TAPs on our bridge, snapshot files, instance
//! directories and their QEMU.

use crate::services::Services;
use std::collections::HashSet;
use std::time::Duration;
use tracing::warn;

pub(crate) async fn remove_orphans(svc: &Services) {
    let Ok(instances) = svc.store.list_instances() else {
        return;
    };
    let known: HashSet<String> = instances.iter().map(|i| i.id.clone()).collect();
    let owned_taps: HashSet<String> = instances
        .into_iter()
        .filter_map(|i| i.network.tap)
        .collect();
    match svc.net.bridge_ports().await {
        Ok(ports) => {
            for p in ports {
                if p.starts_with(forkvm_net::TAP_PREFIX) && !owned_taps.contains(&p) {
                    warn!(tap = %p, "removing orphan TAP");
                    let _ = svc.net.delete_tap(&p).await;
                }
            }
        }
        Err(e) => warn!(error = %e, "listing bridge ports failed"),
    }
    // Snapshot files without a record: a capture or fork interrupted by a
    // crash (transient fork snapshots are never recorded); and the helper
    // VM of an interrupted copy-on-write capture.
    for sid in dir_names(&svc.cfg.data_dir.join("snapshots")) {
        kill_capture_helper(&svc.snapshot_paths(&sid).dir.join("helper")).await;
        if matches!(svc.store.find_snapshot(&sid), Ok(None)) {
            warn!(snapshot = %sid, "removing orphan snapshot files");
            svc.snapshot_paths(&sid).remove();
        }
    }
    for id in dir_names(&svc.cfg.data_dir.join("instances")) {
        if known.contains(&id) {
            continue;
        }
        let paths = svc.paths_of_id(&id);
        // Stopped whether it lives or not: a gone one's cgroup goes too.
        if let Some(pid) = paths.read_pid() {
            if svc.hv.is_alive(&id, pid) {
                warn!(instance = %id, pid, "killing orphan QEMU");
            }
            let _ = svc
                .hv
                .stop(&paths.handle(&id, pid), Duration::from_secs(2))
                .await;
        }
        warn!(instance = %id, "removing orphan instance directory");
        paths.remove_all();
    }
}

/// A capture helper's QEMU still running from before a crash: killed (it
/// only ever waited or held a copy), its cgroup and directory removed.
async fn kill_capture_helper(dir: &std::path::Path) {
    if !dir.exists() {
        return;
    }
    let pid = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    if let Some(pid) = pid {
        // Only a QEMU started for this very directory (pid reuse guard):
        // it holds its console there.
        if holds_file_under(pid, dir) {
            warn!(pid, dir = %dir.display(), "killing a capture helper left by a crash");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    // Waits (bounded) for the killed QEMU to leave its cgroup.
    if let Err(e) = forkvm_vmm::release_cgroup(&dir.join("qemu.pid")).await {
        warn!(dir = %dir.display(), error = %e, "removing a capture helper's cgroup failed");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether process `pid` is a QEMU holding a file under `dir` open.
fn holds_file_under(pid: i32, dir: &std::path::Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("qemu") {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .any(|l| l.starts_with(dir))
        })
        .unwrap_or(false)
}

fn dir_names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
