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
    tokio::task::spawn_blocking(move || read(&inst, pid))
        .await
        .map_err(|e| CoreError::Internal(format!("stats task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

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
