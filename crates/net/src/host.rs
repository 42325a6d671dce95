//! The host side: bridge, TAPs and bridge-port settings over rtnetlink.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    BridgePortState, InfoBridgePort, InfoKind, InfoPortData, LinkAttribute, LinkFlags, LinkInfo,
    LinkLayerType, LinkMessage,
};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::NetError;
use crate::ipam::{IpPool, Ipv4Cidr};
use crate::mac::{MacAddr, bridge_mac_for};
use crate::names::validate_ifname;
use crate::tap::{create_persistent_tap, current_netns_id};

/// The bridge every guest TAP is attached to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BridgeConfig {
    /// Interface name, default `forkvm0`.
    pub name: String,
    /// Guest network, default `10.88.0.0/16`.
    pub subnet: Ipv4Cidr,
    /// Address of the bridge and default route of the guests, default the
    /// first host address of `subnet` (`10.88.0.1`).
    pub gateway: Ipv4Addr,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        let subnet = Ipv4Cidr::default();
        Self {
            name: "forkvm0".to_string(),
            gateway: Ipv4Addr::from(u32::from(subnet.network()) + 1),
            subnet,
        }
    }
}

impl BridgeConfig {
    /// A config with the gateway at the first host address of `subnet`.
    pub fn new(name: impl Into<String>, subnet: Ipv4Cidr) -> Self {
        Self {
            name: name.into(),
            gateway: Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1)),
            subnet,
        }
    }

    /// Validates the config and returns its guest address pool.
    pub fn pool(&self) -> Result<IpPool, NetError> {
        validate_ifname(&self.name)?;
        IpPool::new(self.subnet, self.gateway)
    }
}

/// A bridge port as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgePortInfo {
    pub name: String,
    pub index: u32,
    /// Interface index of the bridge.
    pub master_index: u32,
    pub isolated: bool,
    pub learning: Option<bool>,
    /// STP port state; `Forwarding` once the port passes traffic.
    pub state: Option<BridgePortState>,
}

/// Host networking through one rtnetlink socket, bound to the network
/// namespace of the thread that called [`HostNet::new`].
///
/// TAPs are created through `/dev/net/tun` in the *calling* thread's namespace,
/// so every call must come from a thread in that same namespace (always true
/// for a daemon that never switches namespaces); a mismatch is detected and
/// refused with [`NetError::NamespaceMismatch`].
pub struct HostNet {
    handle: Handle,
    connection: JoinHandle<()>,
    netns: (u64, u64),
}

impl Drop for HostNet {
    fn drop(&mut self) {
        // The connection task would otherwise outlive us on the runtime.
        self.connection.abort();
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl(op: &'static str, target: &str) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let target = target.to_string();
    move |source| NetError::Netlink { op, target, source }
}

fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_master(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) if *i != 0 => Some(*i),
        _ => None,
    })
}

fn link_infos(msg: &LinkMessage) -> &[LinkInfo] {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(v) => Some(v.as_slice()),
            _ => None,
        })
        .unwrap_or(&[])
}

fn link_kind(msg: &LinkMessage) -> Option<&InfoKind> {
    link_infos(msg).iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    })
}

fn is_bridge(msg: &LinkMessage) -> bool {
    link_kind(msg) == Some(&InfoKind::Bridge)
}

/// A tun-driver link with an Ethernet link layer is a TAP (a TUN has none).
fn is_tap(msg: &LinkMessage) -> bool {
    link_kind(msg) == Some(&InfoKind::Tun) && msg.header.link_layer_type == LinkLayerType::Ether
}

fn bridge_port_data(msg: &LinkMessage) -> Option<&[InfoBridgePort]> {
    link_infos(msg).iter().find_map(|i| match i {
        LinkInfo::PortData(InfoPortData::BridgePort(v)) => Some(v.as_slice()),
        _ => None,
    })
}

impl HostNet {
    /// Opens an rtnetlink connection in the current thread's network
    /// namespace. Must be called inside a tokio runtime.
    pub async fn new() -> Result<Self, NetError> {
        let netns = current_netns_id()?;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Connect)?;
        let connection = tokio::spawn(conn);
        Ok(Self {
            handle,
            connection,
            netns,
        })
    }

    /// The underlying rtnetlink handle, for operations this crate lacks.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    fn check_netns(&self) -> Result<(), NetError> {
        if current_netns_id()? == self.netns {
            Ok(())
        } else {
            Err(NetError::NamespaceMismatch)
        }
    }

    /// The link called `name`, or `None`.
    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        validate_ifname(name)?;
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl("get link", name)(e)),
        }
    }

    async fn bridge_index(&self, bridge: &str) -> Result<u32, NetError> {
        let link = self
            .link_by_name(bridge)
            .await?
            .ok_or_else(|| NetError::LinkNotFound(bridge.to_string()))?;
        if !is_bridge(&link) {
            return Err(NetError::NotABridge(bridge.to_string()));
        }
        Ok(link.header.index)
    }

    async fn set_up(&self, index: u32, name: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl("set link up", name))
    }

    /// Makes sure the bridge exists, carries `gateway/prefix` and is up.
    /// Idempotent; leaves unrelated addresses and settings alone.
    ///
    /// A new bridge gets a fixed MAC (see [`bridge_mac_for`]) so the gateway's
    /// MAC never changes as ports come and go.
    pub async fn ensure_bridge(&self, cfg: &BridgeConfig) -> Result<(), NetError> {
        cfg.pool()?;
        let name = cfg.name.as_str();
        let link = match self.link_by_name(name).await? {
            Some(l) => l,
            None => {
                let mac = bridge_mac_for(cfg.gateway);
                let msg = LinkBridge::new(name).address(mac.octets().to_vec()).build();
                match self.handle.link().add(msg).execute().await {
                    Ok(()) => info!(bridge = name, %mac, "created bridge"),
                    // Someone else created it between our get and add: fine.
                    Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(nl("create bridge", name)(e)),
                }
                self.link_by_name(name)
                    .await?
                    .ok_or_else(|| NetError::LinkNotFound(name.to_string()))?
            }
        };
        if !is_bridge(&link) {
            return Err(NetError::NotABridge(name.to_string()));
        }
        let index = link.header.index;

        let addrs = self.ipv4_addrs_by_index(index, name).await?;
        match addrs.iter().find(|c| c.addr == cfg.gateway) {
            Some(c) if c.prefix == cfg.subnet.prefix => {
                debug!(bridge = name, addr = %c, "gateway address present")
            }
            Some(c) => {
                return Err(NetError::AddressConflict {
                    bridge: name.to_string(),
                    addr: cfg.gateway,
                    existing_prefix: c.prefix,
                    wanted_prefix: cfg.subnet.prefix,
                });
            }
            None => {
                match self
                    .handle
                    .address()
                    .add(index, IpAddr::V4(cfg.gateway), cfg.subnet.prefix)
                    .execute()
                    .await
                {
                    Ok(()) => {
                        info!(bridge = name, gateway = %cfg.gateway, prefix = cfg.subnet.prefix, "added gateway address")
                    }
                    Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(nl("add address", name)(e)),
                }
            }
        }

        if !link.header.flags.contains(LinkFlags::Up) {
            self.set_up(index, name).await?;
        }
        Ok(())
    }

    async fn ipv4_addrs_by_index(&self, index: u32, name: &str) -> Result<Vec<Ipv4Cidr>, NetError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("get addresses", name))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == index)
            .filter_map(|m| {
                // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the
                // peer on point-to-point links, so prefer LOCAL.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(v)) => Some(*v),
                    _ => None,
                });
                let addr = local.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(IpAddr::V4(v)) => Some(*v),
                        _ => None,
                    })
                })?;
                Some(Ipv4Cidr {
                    addr,
                    prefix: m.header.prefix_len,
                })
            })
            .collect())
    }

    /// IPv4 addresses on a link, e.g. to check the gateway address.
    pub async fn ipv4_addrs(&self, name: &str) -> Result<Vec<Ipv4Cidr>, NetError> {
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| NetError::LinkNotFound(name.to_string()))?;
        self.ipv4_addrs_by_index(link.header.index, name).await
    }

    /// The MAC address of a link, if it has one.
    pub async fn link_mac(&self, name: &str) -> Result<Option<MacAddr>, NetError> {
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| NetError::LinkNotFound(name.to_string()))?;
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok().map(MacAddr),
            _ => None,
        }))
    }

    /// Creates a persistent TAP `name` on `bridge`: isolated bridge port
    /// (isolated ports reach only non-isolated ones, i.e. the host, never each
    /// other), MAC learning off, link up. QEMU then opens it by name.
    ///
    /// Learning is off because a fork resumes with its source's MAC (it is
    /// migrated device state) and QEMU announces it after loading: a
    /// learning bridge would then send the source's traffic to the fork.
    /// Each port instead gets its owner's MAC pinned with [`HostNet::pin_mac`].
    ///
    /// Idempotent: an existing TAP is (re)attached and (re)configured, so a
    /// retry after a partial failure repairs it. Refuses a name taken by a
    /// non-TAP link or a TAP that belongs to another master.
    pub async fn create_tap(&self, name: &str, bridge: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        self.check_netns()?;
        let br_index = self.bridge_index(bridge).await?;

        let (link, created) = match self.link_by_name(name).await? {
            Some(l) => (l, false),
            None => {
                create_persistent_tap(name)?;
                let l = self
                    .link_by_name(name)
                    .await?
                    .ok_or_else(|| NetError::LinkNotFound(name.to_string()))?;
                (l, true)
            }
        };
        if !is_tap(&link) {
            return Err(NetError::NotATap(name.to_string()));
        }
        if let Some(m) = link_master(&link)
            && m != br_index
        {
            return Err(NetError::TapOnOtherMaster {
                tap: name.to_string(),
                bridge: bridge.to_string(),
                actual_master: m,
            });
        }

        let result = self.configure_port(&link, name, br_index).await;
        match &result {
            Ok(()) => info!(tap = name, bridge, created, "TAP ready"),
            Err(e) if created => {
                // Don't leave a half-configured TAP we made ourselves.
                warn!(tap = name, error = %e, "configuring new TAP failed; removing it");
                if let Err(e2) = self.handle.link().del(link.header.index).execute().await {
                    warn!(tap = name, error = %e2, "removing half-configured TAP failed");
                }
            }
            Err(_) => {}
        }
        result
    }

    async fn configure_port(
        &self,
        link: &LinkMessage,
        name: &str,
        br_index: u32,
    ) -> Result<(), NetError> {
        let index = link.header.index;
        if link_master(link) != Some(br_index) {
            self.handle
                .link()
                .change(
                    LinkUnspec::new_with_index(index)
                        .controller(br_index)
                        .build(),
                )
                .execute()
                .await
                .map_err(nl("set master", name))?;
        }
        // Port options can only be set once the link is a port of the bridge.
        self.handle
            .link()
            .set_port(
                LinkBridgePort::new(index)
                    .isolated(true)
                    .learning(false)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("set bridge port options", name))?;
        if !link.header.flags.contains(LinkFlags::Up) {
            self.set_up(index, name).await?;
        }
        Ok(())
    }

    /// Pin `mac` to the bridge port `tap` (a static FDB entry, as
    /// `bridge fdb replace MAC dev TAP master static`): frames for the
    /// instance's MAC go to its port whatever other ports send.
    pub async fn pin_mac(&self, tap: &str, mac: MacAddr) -> Result<(), NetError> {
        let link = self
            .link_by_name(tap)
            .await?
            .ok_or_else(|| NetError::LinkNotFound(tap.to_string()))?;
        self.handle
            .neighbours()
            .add_bridge(link.header.index, &mac.octets())
            .state(netlink_packet_route::neighbour::NeighbourState::Noarp)
            .flags(netlink_packet_route::neighbour::NeighbourFlags::Controller)
            .replace()
            .execute()
            .await
            .map_err(nl("pin MAC on bridge port", tap))
    }

    /// Forget the bridge's neighbour (ARP) entry for `ip`, so an address
    /// handed to a new instance is resolved afresh. Ok if there is none.
    pub async fn forget_neighbour(
        &self,
        bridge: &str,
        ip: std::net::Ipv4Addr,
    ) -> Result<(), NetError> {
        use futures::TryStreamExt;
        use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
        let Some(br) = self.link_by_name(bridge).await? else {
            return Ok(());
        };
        let mut entries = self
            .handle
            .neighbours()
            .get()
            .set_address_family(netlink_packet_route::AddressFamily::Inet)
            .execute();
        while let Some(msg) = entries
            .try_next()
            .await
            .map_err(nl("list neighbours", bridge))?
        {
            let same_ip = msg.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) if *v == ip)
            });
            if msg.header.ifindex == br.header.index && same_ip {
                self.handle
                    .neighbours()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(nl("delete neighbour", bridge))?;
            }
        }
        Ok(())
    }

    /// The host's neighbour entry for `ip` on the bridge: permanent and
    /// pinned to `mac`, so no ARP a guest sends can redirect the host's
    /// traffic for a leased address (replaces whatever was there).
    pub async fn pin_neighbour(
        &self,
        bridge: &str,
        ip: std::net::Ipv4Addr,
        mac: MacAddr,
    ) -> Result<(), NetError> {
        let index = self.bridge_index(bridge).await?;
        self.handle
            .neighbours()
            .add(index, std::net::IpAddr::V4(ip))
            .link_layer_address(&mac.octets())
            .state(netlink_packet_route::neighbour::NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl("pin neighbour", bridge))
    }

    /// The bridge's permanent IPv4 neighbour entries become exactly
    /// `pinned`: missing or changed ones are (re)pinned, others removed
    /// (instances that are gone). Dynamic entries are left to the kernel.
    /// Nothing to do when the bridge does not exist.
    pub async fn sync_neighbours(
        &self,
        bridge: &str,
        pinned: &[(std::net::Ipv4Addr, MacAddr)],
    ) -> Result<(), NetError> {
        use futures::TryStreamExt;
        use netlink_packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourState,
        };
        let Some(br) = self.link_by_name(bridge).await? else {
            return Ok(());
        };
        let mut have = std::collections::HashMap::new();
        let mut stale = vec![];
        let mut entries = self
            .handle
            .neighbours()
            .get()
            .set_address_family(netlink_packet_route::AddressFamily::Inet)
            .execute();
        while let Some(msg) = entries
            .try_next()
            .await
            .map_err(nl("list neighbours", bridge))?
        {
            if msg.header.ifindex != br.header.index
                || msg.header.state != NeighbourState::Permanent
            {
                continue;
            }
            let ip = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => Some(*v),
                _ => None,
            });
            let lla = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
                _ => None,
            });
            match ip {
                Some(ip) if pinned.iter().any(|(p, _)| *p == ip) => {
                    have.insert(ip, lla);
                }
                _ => stale.push(msg),
            }
        }
        for msg in stale {
            self.handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(nl("delete neighbour", bridge))?;
        }
        for (ip, mac) in pinned {
            if have.get(ip) != Some(&Some(mac.octets())) {
                self.pin_neighbour(bridge, *ip, *mac).await?;
            }
        }
        Ok(())
    }

    /// Deletes the TAP `name`; Ok if it does not exist. Refuses to delete a
    /// link that is not a TAP.
    pub async fn delete_tap(&self, name: &str) -> Result<(), NetError> {
        let Some(link) = self.link_by_name(name).await? else {
            debug!(tap = name, "TAP already gone");
            return Ok(());
        };
        if !is_tap(&link) {
            return Err(NetError::NotATap(name.to_string()));
        }
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => {
                info!(tap = name, "deleted TAP");
                Ok(())
            }
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(nl("delete link", name)(e)),
        }
    }

    /// Deletes the bridge `name` (its ports are detached, not deleted); Ok if
    /// it does not exist. Refuses to delete a link that is not a bridge.
    pub async fn delete_bridge(&self, name: &str) -> Result<(), NetError> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(());
        };
        if !is_bridge(&link) {
            return Err(NetError::NotABridge(name.to_string()));
        }
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => {
                info!(bridge = name, "deleted bridge");
                Ok(())
            }
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(nl("delete link", name)(e)),
        }
    }

    /// Whether a TAP called `name` exists (a non-TAP link of that name counts
    /// as no).
    pub async fn tap_exists(&self, name: &str) -> Result<bool, NetError> {
        Ok(self.link_by_name(name).await?.is_some_and(|l| is_tap(&l)))
    }

    /// Names of all ports of `bridge`, sorted.
    pub async fn list_bridge_ports(&self, bridge: &str) -> Result<Vec<String>, NetError> {
        let br_index = self.bridge_index(bridge).await?;
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump links", bridge))?;
        let mut ports: Vec<String> = links
            .iter()
            .filter(|l| link_master(l) == Some(br_index))
            .filter_map(|l| link_name(l).map(str::to_string))
            .collect();
        ports.sort();
        Ok(ports)
    }

    /// Bridge-port settings of `name`; `None` if it is not a bridge port.
    pub async fn bridge_port_info(&self, name: &str) -> Result<Option<BridgePortInfo>, NetError> {
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| NetError::LinkNotFound(name.to_string()))?;
        let (Some(master_index), Some(data)) = (link_master(&link), bridge_port_data(&link)) else {
            return Ok(None);
        };
        let mut info = BridgePortInfo {
            name: name.to_string(),
            index: link.header.index,
            master_index,
            isolated: false,
            learning: None,
            state: None,
        };
        for d in data {
            match d {
                InfoBridgePort::Isolated(v) => info.isolated = *v,
                InfoBridgePort::Learning(v) => info.learning = Some(*v),
                InfoBridgePort::State(s) => info.state = Some(*s),
                _ => {}
            }
        }
        Ok(Some(info))
    }

    /// Whether the bridge port `name` is isolated (read over netlink, so it is
    /// correct in any namespace, unlike sysfs).
    pub async fn port_isolated(&self, name: &str) -> Result<bool, NetError> {
        self.bridge_port_info(name)
            .await?
            .map(|i| i.isolated)
            .ok_or_else(|| NetError::NotABridgePort(name.to_string()))
    }
}
