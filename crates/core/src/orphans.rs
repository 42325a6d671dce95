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
    // crash (transient fork snapshots are never recorded).
    for sid in dir_names(&svc.cfg.data_dir.join("snapshots")) {
        if matches!(svc.store.find_snapshot(&sid), Ok(None)) {
            warn!(snapshot = %sid, "removing orphan snapshot files");
            svc.snapshot_paths(&sid).remove();
        }
    }
    for id in dir_names(&svc.cfg.data_dir.join("instances")) {
        if known.contains(&id) {
            continue;
        }
        let paths = svc.paths(&id);
        if let Some(pid) = paths.read_pid()
            && svc.hv.is_alive(&id, pid)
        {
            warn!(instance = %id, pid, "killing orphan QEMU");
            let _ = svc
                .hv
                .stop(&svc.handle(&id, pid), Duration::from_secs(2))
                .await;
        }
        warn!(instance = %id, "removing orphan instance directory");
        paths.remove_all();
    }
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
