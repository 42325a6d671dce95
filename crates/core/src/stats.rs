//! Resource use of a VM as the host sees it (hypeman's `instances.stats`):
//! its QEMU process's CPU time and memory from `/proc/<pid>/stat` and
//! `statm`, and its TAP's counters from `/sys/class/net/<tap>/statistics`
//! (the daemon's network namespace). Read off the async threads.

use crate::error::{CoreError, Result};
use crate::model::Instance;
use crate::services::Services;
use std::path::Path;

/// What a VM uses now.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct InstanceStats {
    pub instance_id: String,
    pub instance_name: String,
    pub allocated_vcpus: u32,
    pub allocated_memory_bytes: u64,
    /// User + system CPU time of the VMM process.
    pub cpu_seconds: f64,
    pub memory_rss_bytes: u64,
    pub memory_vms_bytes: u64,
    /// Guest-bound traffic (the TAP's transmit side) and guest-sent traffic.
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub network_rx_packets: u64,
    pub network_tx_packets: u64,
    /// The guest's own view (`/proc/meminfo` through the agent); `None`
    /// when the agent did not answer within a second or two.
    pub guest_memory_total_bytes: Option<u64>,
    pub guest_memory_available_bytes: Option<u64>,
}

/// (MemTotal, MemAvailable) bytes from a `/proc/meminfo` text.
pub(crate) fn meminfo(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// The guest's `/proc/meminfo`, read through the agent (bounded: 64 KiB,
/// 2 s; the guest controls it, and it is only a figure).
async fn guest_meminfo(svc: &Services, inst: &Instance) -> (Option<u64>, Option<u64>) {
    use forkvm_proto::agent as pb;
    use futures::StreamExt;
    if inst.state != crate::model::InstanceState::Running {
        return (None, None);
    }
    let read = async {
        let req = pb::CopyOutRequest {
            path: "/proc/meminfo".into(),
            follow_links: true,
            image_root: inst.workload.is_some(),
        };
        let socket = svc.paths(inst).agent_socket;
        let mut s = svc
            .agent
            .copy_out(&inst.id, &socket, req, std::time::Duration::from_secs(1))
            .await
            .ok()?;
        let mut text = Vec::new();
        while let Some(Ok(m)) = s.next().await {
            if let Some(pb::copy_out_message::Kind::Data(d)) = m.kind {
                text.extend_from_slice(&d[..d.len().min((64 << 10) - text.len().min(64 << 10))]);
            }
        }
        Some(String::from_utf8_lossy(&text).into_owned())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), read).await {
        Ok(Some(t)) => meminfo(&t),
        _ => (None, None),
    }
}

/// CPU seconds from `/proc/<pid>/stat` (utime + stime, fields 14 and 15).
pub(crate) fn cpu_seconds(stat: &str, ticks_per_s: f64) -> Option<f64> {
    // The command name may hold spaces and parentheses: fields count from
    // after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_s)
}

/// (vms, rss) bytes from `/proc/<pid>/statm`.
pub(crate) fn memory(statm: &str, page: u64) -> Option<(u64, u64)> {
    let mut it = statm.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((it.next()?? * page, it.next()?? * page))
}

fn counter(tap: &str, name: &str) -> u64 {
    std::fs::read_to_string(
        Path::new("/sys/class/net")
            .join(tap)
            .join("statistics")
            .join(name),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

fn read(inst: &Instance, pid: u32) -> Result<InstanceStats> {
    let proc = Path::new("/proc").join(pid.to_string());
    let gone = |_| CoreError::Conflict(format!("instance {}'s VMM is gone", inst.name));
    let stat = std::fs::read_to_string(proc.join("stat")).map_err(gone)?;
    let statm = std::fs::read_to_string(proc.join("statm")).map_err(gone)?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let (vms, rss) = memory(&statm, page).unwrap_or_default();
    let tap = inst.network.tap.as_deref().unwrap_or_default();
    let net = |n| if tap.is_empty() { 0 } else { counter(tap, n) };
    Ok(InstanceStats {
        instance_id: inst.id.clone(),
        instance_name: inst.name.clone(),
        allocated_vcpus: inst.vcpus,
        allocated_memory_bytes: u64::from(inst.memory_mb) << 20,
        cpu_seconds: cpu_seconds(&stat, ticks).unwrap_or_default(),
        memory_rss_bytes: rss,
        memory_vms_bytes: vms,
        // The TAP transmits what goes to the guest.
        network_rx_bytes: net("tx_bytes"),
        network_tx_bytes: net("rx_bytes"),
        network_rx_packets: net("tx_packets"),
        network_tx_packets: net("rx_packets"),
        guest_memory_total_bytes: None,
        guest_memory_available_bytes: None,
    })
}

pub(crate) async fn stats(svc: &Services, id_or_name: &str) -> Result<InstanceStats> {
    let inst = svc.find(id_or_name)?;
    let Some(pid) = inst.pid.filter(|_| inst.state.has_vmm()) else {
        return Err(CoreError::Conflict(format!(
            "instance {} is {}: it has no VM to measure",
            inst.name,
            inst.state.as_str()
        )));
    };
    let (total, available) = guest_meminfo(svc, &inst).await;
    let mut s = tokio::task::spawn_blocking(move || read(&inst, pid))
        .await
        .map_err(|e| CoreError::Internal(format!("stats task: {e}")))??;
    s.guest_memory_total_bytes = total;
    s.guest_memory_available_bytes = available;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_bytes() {
        let t = "MemTotal:         245676 kB\nMemFree: 1 kB\nMemAvailable:     200000 kB\n";
        assert_eq!(meminfo(t), (Some(245676 * 1024), Some(200000 * 1024)));
        assert_eq!(meminfo("garbage"), (None, None));
    }

    #[test]
    fn proc_fields_are_read_after_the_command_name() {
        let stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 3 0";
        assert_eq!(cpu_seconds(stat, 100.0), Some(4.0));
        assert_eq!(
            memory("1000 250 10 1 0 300 0", 4096),
            Some((4_096_000, 1_024_000))
        );
        assert_eq!(memory("", 4096), None);
        assert_eq!(cpu_seconds("garbage", 100.0), None);
        // This process's own figures parse.
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(cpu_seconds(&me, 100.0).is_some());
    }
}
