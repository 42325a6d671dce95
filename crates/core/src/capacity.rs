//! Admission: what a request needs (guest memory, addresses) is checked
//! against what is left before anything is created.

use crate::error::{CoreError, Result};
use crate::services::Services;

/// What a request will hold once it succeeded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Demand {
    /// VMs that will have a VMM (and so guest memory).
    pub vms: u32,
    pub memory_mb: u32,
    /// New IPv4 leases.
    pub addresses: u32,
}

/// Refuse up front what would not fit.
pub(crate) fn check(svc: &Services, d: Demand) -> Result<()> {
    let used: u64 = svc
        .store
        .list_instances()?
        .iter()
        .filter(|i| i.state.has_vmm())
        .map(|i| u64::from(i.memory_mb))
        .sum();
    let want = u64::from(d.vms) * u64::from(d.memory_mb);
    if used + want > svc.memory_budget_mb {
        return Err(CoreError::Exhausted(format!(
            "not enough guest memory: {want} MiB requested, {used} of {} MiB in use \
             (FORKVM_MAX_GUEST_MEMORY_MB)",
            svc.memory_budget_mb
        )));
    }
    if d.addresses > 0 {
        let free = svc.net.free_addresses(&svc.store)?;
        if (d.addresses as usize) > free {
            return Err(CoreError::Exhausted(format!(
                "not enough free IPv4 addresses: {} needed, {free} free in {}",
                d.addresses,
                svc.net.subnet()
            )));
        }
    }
    Ok(())
}

/// 90 % of the host's RAM: guest memory is tmpfs-backed and must fit.
pub(crate) fn default_memory_budget_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024 * 9 / 10)
        .unwrap_or(u64::MAX)
}
