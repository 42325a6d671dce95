//! Admission: what a request will hold is checked against what is left, and
//! reserved, before anything is created.
//!
//! Two budgets, both in MiB:
//! - **host memory** (`--max-guest-memory-mb`, default 90 % of RAM): VMs
//!   with their own memory file count their full size (the file can grow to
//!   it); copy-on-write VMs count `--cow-reserve-percent` of their size (what
//!   they may write privately; their reads share the base); bases count the
//!   bytes they really occupy.
//! - **the memory directory's filesystem** (`statvfs`, a tmpfs): own memory
//!   files at their full size plus the bases. A guest whose file cannot grow
//!   on a full tmpfs dies of SIGBUS, so this is never overcommitted.
//!
//! Usage is derived from the store and the files each time; requests in
//! flight hold a [`Reservation`] on top, taken under one lock, so concurrent
//! requests that together exceed a budget cannot all pass.

use crate::error::{CoreError, Result};
use crate::model::Memory;
use crate::services::Services;
use std::sync::{Arc, Mutex};

/// What a request will add.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Demand {
    /// VMs with their own memory file, and their size.
    pub own_vms: u32,
    /// Copy-on-write VMs.
    pub cow_vms: u32,
    pub memory_mb: u32,
    /// A new base, MiB (a capture of a running source).
    pub base_mb: u64,
    /// New IPv4 leases.
    pub addresses: u32,
}

/// MiB reserved by requests in flight.
#[derive(Default)]
pub(crate) struct Ledger(Mutex<Held>);

#[derive(Default, Clone, Copy)]
struct Held {
    host_mb: u64,
    tmpfs_mb: u64,
}

/// A request's share of the budgets, held until it finished (its records
/// then account for what it made).
pub(crate) struct Reservation {
    ledger: Arc<Ledger>,
    held: Held,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut l = self.ledger.0.lock().unwrap_or_else(|p| p.into_inner());
        l.host_mb -= self.held.host_mb;
        l.tmpfs_mb -= self.held.tmpfs_mb;
    }
}

/// MiB a copy-on-write VM of `memory_mb` is charged.
pub(crate) fn cow_charge_mb(svc: &Services, memory_mb: u32) -> u64 {
    u64::from(memory_mb) * u64::from(svc.cfg.cow_reserve_percent.min(100)) / 100
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// What is in use now: host MiB, tmpfs MiB.
fn usage(svc: &Services) -> Result<(u64, u64)> {
    let (mut host, mut tmpfs) = (0u64, 0u64);
    for i in svc.store.list_instances()? {
        if !i.state.has_vmm() {
            continue;
        }
        match i.memory {
            Memory::Own => {
                host += u64::from(i.memory_mb);
                tmpfs += u64::from(i.memory_mb);
            }
            Memory::Cow { .. } => host += cow_charge_mb(svc, i.memory_mb),
        }
    }
    for b in svc.store.list_bases()? {
        let used = mib(crate::memory::allocated_bytes(&crate::bases::path(
            svc, &b.id,
        )));
        host += used;
        tmpfs += used;
    }
    Ok((host, tmpfs))
}

/// Size of the memory directory's filesystem in MiB, less 5 % slack.
fn tmpfs_capacity_mb(svc: &Services) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(&svc.cfg.mem_dir).ok()?;
    let bytes = st.blocks() as u64 * st.fragment_size() as u64;
    Some(mib(bytes) * 95 / 100)
}

/// Refuses up front what would not fit, else reserves it.
pub(crate) fn reserve(svc: &Services, d: Demand) -> Result<Reservation> {
    let want_host = u64::from(d.own_vms) * u64::from(d.memory_mb)
        + u64::from(d.cow_vms) * cow_charge_mb(svc, d.memory_mb)
        + d.base_mb;
    let want_tmpfs = u64::from(d.own_vms) * u64::from(d.memory_mb) + d.base_mb;
    let mut held = svc.ledger.0.lock().unwrap_or_else(|p| p.into_inner());
    let (host, tmpfs) = usage(svc)?;
    let (host, tmpfs) = (host + held.host_mb, tmpfs + held.tmpfs_mb);
    if host + want_host > svc.memory_budget_mb {
        return Err(CoreError::Exhausted(format!(
            "not enough guest memory: {want_host} MiB requested, {host} of {} MiB in use \
             (--max-guest-memory-mb / FORKVM_MAX_GUEST_MEMORY_MB)",
            svc.memory_budget_mb
        )));
    }
    if let Some(cap) = tmpfs_capacity_mb(svc)
        && tmpfs + want_tmpfs > cap
    {
        return Err(CoreError::Exhausted(format!(
            "not enough memory-file space: {want_tmpfs} MiB needed on {}, {tmpfs} of {cap} MiB \
             promised to VMs and bases",
            svc.cfg.mem_dir.display()
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
    held.host_mb += want_host;
    held.tmpfs_mb += want_tmpfs;
    Ok(Reservation {
        ledger: svc.ledger.clone(),
        held: Held {
            host_mb: want_host,
            tmpfs_mb: want_tmpfs,
        },
    })
}

/// The figures behind the capacity gauges (`GET /metrics`).
pub(crate) fn figures(svc: &Services) -> Result<crate::observe::metrics::CapacityFigures> {
    let (used, mem_dir_used) = usage(svc)?;
    let held = *svc.ledger.0.lock().unwrap_or_else(|p| p.into_inner());
    Ok(crate::observe::metrics::CapacityFigures {
        budget_mb: svc.memory_budget_mb,
        used_mb: used,
        reserved_mb: held.host_mb,
        mem_dir_capacity_mb: tmpfs_capacity_mb(svc),
        mem_dir_used_mb: mem_dir_used,
    })
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
