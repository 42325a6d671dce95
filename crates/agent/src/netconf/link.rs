//! Observe: what the interface looks like now, read over netlink. The
//! planner works against this (or, on the fork hot path, against a
//! [`LinkHint`] kept from an earlier read, skipping three netlink dumps).

use std::net::{IpAddr, Ipv4Addr};

use forkvm_mailbox::MacAddr;
use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::Handle;

use super::apply::{NetApplyError, nl};
use super::plan::{LinkHint, LinkState};

/// Reads the interface's index, MAC, up flag and IPv4 addresses.
pub async fn link_state(handle: &Handle, name: &str) -> Result<LinkState, NetApplyError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    let link = match links.try_next().await {
        Ok(Some(l)) => l,
        Ok(None) => return Err(NetApplyError::NoSuchInterface(name.to_owned())),
        // The kernel answers ENODEV for an unknown name.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            return Err(NetApplyError::NoSuchInterface(name.to_owned()));
        }
        Err(e) => return Err(nl("get link")(e)),
    };
    let mut mac = MacAddr([0; 6]);
    for attr in &link.attributes {
        if let LinkAttribute::Address(a) = attr
            && let Ok(octets) = <[u8; 6]>::try_from(a.as_slice())
        {
            mac = MacAddr(octets);
        }
    }
    let index = link.header.index;
    let up = link.header.flags.contains(LinkFlags::Up);
    let mut ipv4 = Vec::new();
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = addrs.try_next().await.map_err(nl("get addresses"))? {
        if msg.header.family != AddressFamily::Inet {
            continue;
        }
        for attr in &msg.attributes {
            if let AddressAttribute::Local(IpAddr::V4(a)) = attr {
                ipv4.push((*a, msg.header.prefix_len));
            }
        }
    }
    let neighbours = resolved_neighbours(handle, index).await?;
    Ok(LinkState {
        index,
        mac,
        up,
        ipv4,
        neighbours,
    })
}

/// IPv4 neighbours of `index` that hold a link-layer address and are not
/// known to be unreachable.
async fn resolved_neighbours(
    handle: &Handle,
    index: u32,
) -> Result<Vec<(Ipv4Addr, MacAddr)>, NetApplyError> {
    let mut dump = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    let mut out = Vec::new();
    while let Some(msg) = dump.try_next().await.map_err(nl("get neighbours"))? {
        if msg.header.ifindex != index
            || matches!(
                msg.header.state,
                NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
            )
        {
            continue;
        }
        let mut dst = None;
        let mut lladdr = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(*a),
                NeighbourAttribute::LinkLayerAddress(l) => {
                    if let Ok(octets) = <[u8; 6]>::try_from(l.as_slice()) {
                        lladdr = Some(MacAddr(octets));
                    }
                }
                _ => {}
            }
        }
        if let (Some(d), Some(m)) = (dst, lladdr) {
            out.push((d, m));
        }
    }
    Ok(out)
}

/// Reads `interface` into a [`LinkHint`]; `gateway`'s link-layer address is
/// taken from the neighbour table when resolved, else from `previous`.
pub async fn read_hint(
    handle: &Handle,
    interface: &str,
    gateway: Option<Ipv4Addr>,
    previous: Option<&LinkHint>,
) -> Result<LinkHint, NetApplyError> {
    let st = link_state(handle, interface).await?;
    let resolved = gateway.and_then(|gw| st.neighbours.iter().find(|(ip, _)| *ip == gw).copied());
    let kept = previous
        .filter(|p| p.interface == interface && p.index == st.index)
        .and_then(|p| p.gateway)
        .filter(|(ip, _)| Some(*ip) == gateway);
    Ok(LinkHint {
        interface: interface.to_owned(),
        index: st.index,
        gateway: resolved.or(kept),
    })
}
