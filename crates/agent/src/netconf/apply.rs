//! Apply: the executor that carries out a plan's [`NetStep`]s, in order, on
//! one interface: netlink for the link, addresses, route and neighbours;
//! files for resolv.conf; a syscall for the hostname; a raw frame for the
//! gratuitous ARP. The only code that changes the guest's network.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use forkvm_mailbox::MacAddr;
use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourState};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{debug, warn};

use super::arp::send_gratuitous_arp;
use super::plan::NetStep;
use super::us_since;

/// Failure while applying a plan.
#[derive(Debug, thiserror::Error)]
pub enum NetApplyError {
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    #[error("netlink {step}: {source}")]
    Netlink {
        step: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Maps a netlink error to [`NetApplyError::Netlink`] for `step`.
pub(super) fn nl(step: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetApplyError {
    move |source| NetApplyError::Netlink { step, source }
}

/// Applies steps in order to interface `index`; stops at the first failure.
pub async fn apply(handle: &Handle, index: u32, steps: &[NetStep]) -> Result<(), NetApplyError> {
    apply_timed(handle, index, steps, &mut Vec::new()).await
}

/// [`apply`], appending each step's duration to `step_us`.
pub(super) async fn apply_timed(
    handle: &Handle,
    index: u32,
    steps: &[NetStep],
    step_us: &mut Vec<u64>,
) -> Result<(), NetApplyError> {
    for step in steps {
        let t = Instant::now();
        apply_step(handle, index, step).await?;
        step_us.push(us_since(t));
    }
    Ok(())
}

/// One step. The neighbour and ARP steps are best effort (logged, never an
/// error): each only saves a round trip the kernel would make anyway.
async fn apply_step(handle: &Handle, index: u32, step: &NetStep) -> Result<(), NetApplyError> {
    match step {
        NetStep::SetMac(mac) => set_mac(handle, index, *mac).await,
        NetStep::FlushIpv4 => flush_ipv4(handle, index).await,
        NetStep::AddAddress { addr, prefix_len } => handle
            .address()
            .add(index, IpAddr::V4(*addr), *prefix_len)
            .replace()
            .execute()
            .await
            .map_err(nl("add address")),
        NetStep::LinkUp => handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl("link up")),
        NetStep::ReplaceDefaultRoute(gw) => replace_default_route(handle, index, *gw).await,
        NetStep::FlushNeighbours => flush_neighbours(handle, index).await,
        NetStep::RestoreNeighbour { ip, mac } => {
            restore_neighbour(handle, index, *ip, *mac).await;
            Ok(())
        }
        NetStep::ResolveNeighbour(ip) => {
            resolve_neighbour(handle, index, *ip).await;
            Ok(())
        }
        NetStep::GratuitousArp { mac, ip } => {
            // Best effort: a lost announcement only delays peers' caches.
            if let Err(e) = send_gratuitous_arp(index, *mac, *ip) {
                warn!(error = %e, "gratuitous ARP failed");
            }
            Ok(())
        }
        NetStep::WriteResolvConf(dns) => {
            write_resolv_conf(dns).map_err(|source| NetApplyError::Io {
                step: "write /etc/resolv.conf",
                source,
            })
        }
        NetStep::SetHostname(h) => set_hostname(h),
    }
}

/// Live MAC change; if the driver refuses it on a running link (EBUSY: no
/// `IFF_LIVE_ADDR_CHANGE`), bounces the link around the change.
async fn set_mac(handle: &Handle, index: u32, mac: MacAddr) -> Result<(), NetApplyError> {
    let set = || {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(mac.octets().to_vec())
                    .build(),
            )
            .execute()
    };
    match set().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EBUSY => {
            debug!(index, "live MAC change refused; bouncing the link");
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).down().build())
                .execute()
                .await
                .map_err(nl("link down"))?;
            set().await.map_err(nl("set mac"))?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(nl("link up"))
        }
        Err(e) => Err(nl("set mac")(e)),
    }
}

/// Deletes every IPv4 address of `index` (dumped first: deleting while
/// dumping would disturb the dump).
async fn flush_ipv4(handle: &Handle, index: u32) -> Result<(), NetApplyError> {
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut v4 = Vec::new();
    while let Some(msg) = addrs.try_next().await.map_err(nl("get addresses"))? {
        if msg.header.family == AddressFamily::Inet {
            v4.push(msg);
        }
    }
    for msg in v4 {
        handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(nl("delete address"))?;
    }
    Ok(())
}

async fn replace_default_route(
    handle: &Handle,
    index: u32,
    gw: Ipv4Addr,
) -> Result<(), NetApplyError> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gw)
        .output_interface(index)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl("default route"))
}

async fn flush_neighbours(handle: &Handle, index: u32) -> Result<(), NetApplyError> {
    let mut neigh = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    let mut victims = Vec::new();
    while let Some(msg) = neigh.try_next().await.map_err(nl("get neighbours"))? {
        let permanent = msg.header.state == NeighbourState::Permanent;
        let has_dst = msg
            .attributes
            .iter()
            .any(|a| matches!(a, NeighbourAttribute::Destination(_)));
        if msg.header.ifindex == index && !permanent && has_dst {
            victims.push(msg);
        }
    }
    for msg in victims {
        // An entry may vanish between dump and delete; that is the goal anyway.
        if let Err(e) = handle.neighbours().del(msg).execute().await {
            debug!(error = %e, "neighbour delete failed");
        }
    }
    Ok(())
}

/// Best effort: without it the kernel simply ARPs.
async fn restore_neighbour(handle: &Handle, index: u32, ip: Ipv4Addr, mac: MacAddr) {
    if let Err(e) = handle
        .neighbours()
        .add(index, IpAddr::V4(ip))
        .link_layer_address(&mac.octets())
        .state(NeighbourState::Stale)
        .replace()
        .execute()
        .await
    {
        debug!(error = %e, %ip, "restoring neighbour failed");
    }
}

/// Best effort: the first packet to it would ARP anyway.
async fn resolve_neighbour(handle: &Handle, index: u32, ip: Ipv4Addr) {
    if let Err(e) = handle
        .neighbours()
        .add(index, IpAddr::V4(ip))
        .flags(NeighbourFlags::Use)
        .state(NeighbourState::None)
        .replace()
        .execute()
        .await
    {
        debug!(error = %e, %ip, "starting neighbour resolution failed");
    }
}

fn write_resolv_conf(dns: &[IpAddr]) -> std::io::Result<()> {
    let mut text = String::from("# written by forkvm-agent\n");
    for d in dns {
        text.push_str(&format!("nameserver {d}\n"));
    }
    // A fork usually keeps its source's DNS: skip the write then.
    if std::fs::read("/etc/resolv.conf").is_ok_and(|cur| cur == text.as_bytes()) {
        return Ok(());
    }
    std::fs::create_dir_all("/etc")?;
    // Write-then-rename so readers never see a half-written file.
    std::fs::write("/etc/.resolv.conf.forkvm", text)?;
    std::fs::rename("/etc/.resolv.conf.forkvm", "/etc/resolv.conf")?;
    // A workload's image root (if mounted) follows the guest's.
    crate::workload::resolv::sync_if_mounted();
    Ok(())
}

fn set_hostname(h: &str) -> Result<(), NetApplyError> {
    // A fork of a fork often keeps its name: skip the no-op.
    if nix::unistd::gethostname().is_ok_and(|cur| cur.to_str() == Some(h)) {
        return Ok(());
    }
    nix::unistd::sethostname(h).map_err(|e| NetApplyError::Io {
        step: "sethostname",
        source: e.into(),
    })
}
