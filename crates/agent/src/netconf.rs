//! Network re-addressing: one validated input type, a pure planner and a
//! netlink executor. Boot configuration, the ReconfigureNetwork RPC and (later)
//! the mailbox handoff all go through [`NetRequest::validate`] → [`plan`] →
//! [`apply`], so there is exactly one code path that touches the interface.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use forkvm_mailbox::MacAddr;
use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{debug, info, warn};

/// Unvalidated network identity, as it arrives from the boot config or an RPC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetRequest {
    pub interface: String,
    /// Empty = keep the device's current MAC.
    pub mac: String,
    pub ipv4: String,
    pub prefix_len: u32,
    /// Empty = no default route.
    pub gateway: String,
    pub dns: Vec<String>,
    /// Empty = keep the hostname.
    pub hostname: String,
}

/// A validated network identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetDesired {
    pub interface: String,
    pub mac: Option<MacAddr>,
    pub ipv4: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<IpAddr>,
    pub hostname: Option<String>,
}

/// Observed state of the target interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub mac: MacAddr,
    pub up: bool,
    pub ipv4: Vec<(Ipv4Addr, u8)>,
    /// Resolved IPv4 neighbours on this interface (address, link-layer address).
    pub neighbours: Vec<(Ipv4Addr, MacAddr)>,
}

/// What the agent last saw of an interface, kept between forks so the
/// mailbox path can plan without reading the link first (three netlink dumps,
/// ~50 ms on a fork's cold TCG vCPU).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkHint {
    pub interface: String,
    pub index: u32,
    /// The gateway and its link-layer address when last resolved.
    pub gateway: Option<(Ipv4Addr, MacAddr)>,
}

impl LinkState {
    /// A state for which [`plan`] includes every step (MAC, address flush,
    /// link up, route, neighbours): unknown MAC, link down, a foreign
    /// address. Each of those steps is harmless when already true.
    pub fn assumed(hint: &LinkHint) -> LinkState {
        LinkState {
            index: hint.index,
            mac: MacAddr([0; 6]),
            up: false,
            ipv4: vec![(Ipv4Addr::UNSPECIFIED, 0)],
            neighbours: hint.gateway.into_iter().collect(),
        }
    }
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

/// One netlink (or file) change. Order in a plan is the order of application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetStep {
    /// Live MAC change on an UP link (virtio-net: `IFF_LIVE_ADDR_CHANGE`);
    /// [`apply`] falls back to down/set/up when the driver answers EBUSY.
    SetMac(MacAddr),
    FlushIpv4,
    AddAddress {
        addr: Ipv4Addr,
        prefix_len: u8,
    },
    LinkUp,
    ReplaceDefaultRoute(Ipv4Addr),
    FlushNeighbours,
    /// Re-installs a known neighbour (the unchanged gateway) as STALE, so the
    /// first packet after re-addressing leaves without an ARP round trip; the
    /// kernel still re-confirms a STALE entry on use.
    RestoreNeighbour {
        ip: Ipv4Addr,
        mac: MacAddr,
    },
    /// Starts ARP for an unresolved gateway now (`NTF_USE`), so the entry is
    /// in place before it is needed — and in every later fork's snapshot.
    ResolveNeighbour(Ipv4Addr),
    GratuitousArp {
        mac: MacAddr,
        ip: Ipv4Addr,
    },
    WriteResolvConf(Vec<IpAddr>),
    SetHostname(String),
}

/// Invalid input; maps to gRPC `InvalidArgument`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("interface name {0:?} is invalid")]
    Interface(String),
    #[error("MAC address {0:?} is invalid (want aa:bb:cc:dd:ee:ff, unicast)")]
    Mac(String),
    #[error("IPv4 address {0:?} is invalid")]
    Ipv4(String),
    #[error("prefix length {0} is out of range 0..=32")]
    PrefixLen(u32),
    #[error("gateway {0:?} is invalid")]
    Gateway(String),
    #[error("DNS server {0:?} is invalid")]
    Dns(String),
    #[error("hostname {0:?} is invalid")]
    Hostname(String),
}

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

impl NetRequest {
    /// Checks and parses every field; nothing is applied.
    pub fn validate(&self) -> Result<NetDesired, NetConfigError> {
        // IFNAMSIZ is 16 including the NUL.
        if self.interface.is_empty()
            || self.interface.len() > 15
            || self.interface.contains(['/', ' ', '\0'])
        {
            return Err(NetConfigError::Interface(self.interface.clone()));
        }
        let mac = if self.mac.is_empty() {
            None
        } else {
            let mac = self
                .mac
                .parse::<MacAddr>()
                .ok()
                .filter(MacAddr::is_usable_interface_address);
            Some(mac.ok_or_else(|| NetConfigError::Mac(self.mac.clone()))?)
        };
        let ipv4: Ipv4Addr = self
            .ipv4
            .parse()
            .map_err(|_| NetConfigError::Ipv4(self.ipv4.clone()))?;
        if ipv4.is_unspecified() || ipv4.is_multicast() || ipv4.is_broadcast() {
            return Err(NetConfigError::Ipv4(self.ipv4.clone()));
        }
        if self.prefix_len > 32 {
            return Err(NetConfigError::PrefixLen(self.prefix_len));
        }
        let gateway = if self.gateway.is_empty() {
            None
        } else {
            Some(
                self.gateway
                    .parse::<Ipv4Addr>()
                    .map_err(|_| NetConfigError::Gateway(self.gateway.clone()))?,
            )
        };
        let dns = self
            .dns
            .iter()
            .map(|d| {
                d.parse::<IpAddr>()
                    .map_err(|_| NetConfigError::Dns(d.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let hostname = if self.hostname.is_empty() {
            None
        } else if valid_hostname(&self.hostname) {
            Some(self.hostname.clone())
        } else {
            return Err(NetConfigError::Hostname(self.hostname.clone()));
        };
        Ok(NetDesired {
            interface: self.interface.clone(),
            mac,
            ipv4,
            prefix_len: self.prefix_len as u8,
            gateway,
            dns,
            hostname,
        })
    }
}

impl From<&forkvm_proto::BootNetwork> for NetRequest {
    fn from(n: &forkvm_proto::BootNetwork) -> Self {
        NetRequest {
            interface: n.interface.clone(),
            mac: n.mac.clone(),
            ipv4: n.ipv4.clone(),
            prefix_len: u32::from(n.prefix_len),
            gateway: n.gateway.clone(),
            dns: n.dns.clone(),
            hostname: String::new(),
        }
    }
}

impl From<forkvm_proto::agent::NetworkConfig> for NetRequest {
    fn from(n: forkvm_proto::agent::NetworkConfig) -> Self {
        NetRequest {
            interface: n.interface,
            mac: n.mac,
            ipv4: n.ipv4,
            prefix_len: n.prefix_len,
            gateway: n.gateway,
            dns: n.dns,
            hostname: n.hostname,
        }
    }
}

/// RFC 1123 hostname, at most 64 bytes (the kernel's limit).
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Computes the steps that take `current` to `desired`. Pure: no I/O.
pub fn plan(desired: &NetDesired, current: &LinkState) -> Vec<NetStep> {
    let mut steps = Vec::new();
    let mac_change = desired.mac.filter(|m| *m != current.mac);
    let final_mac = mac_change.unwrap_or(current.mac);
    let addr_ok = current.ipv4 == [(desired.ipv4, desired.prefix_len)];

    if !addr_ok && !current.ipv4.is_empty() {
        // Before the MAC change: the link stays up, so anything sent in
        // between (an ARP for an inherited connection) would pair the old
        // address with the new MAC and repoint the host's neighbour entry
        // for the source's address to this fork.
        steps.push(NetStep::FlushIpv4);
    }
    if let Some(mac) = mac_change {
        // No link down/up around it: a bounce costs a carrier cycle and the
        // driver's open/close (tens of ms on a cold TCG fork).
        steps.push(NetStep::SetMac(mac));
    }
    if !addr_ok {
        steps.push(NetStep::AddAddress {
            addr: desired.ipv4,
            prefix_len: desired.prefix_len,
        });
    }
    if !current.up {
        steps.push(NetStep::LinkUp);
    }
    let known_gw = desired
        .gateway
        .and_then(|gw| current.neighbours.iter().find(|(ip, _)| *ip == gw));
    if let Some(gw) = desired.gateway {
        // Always (re)installed: link down or an address flush drops it.
        steps.push(NetStep::ReplaceDefaultRoute(gw));
    }
    if mac_change.is_some() || !addr_ok {
        // Peers and our own cache may hold the previous identity.
        steps.push(NetStep::FlushNeighbours);
        // The gateway is the same host before and after (a MAC change or an
        // address flush makes the kernel drop its entry too).
        if let Some((ip, mac)) = known_gw {
            steps.push(NetStep::RestoreNeighbour { ip: *ip, mac: *mac });
        }
    }
    if known_gw.is_none()
        && let Some(gw) = desired.gateway
    {
        steps.push(NetStep::ResolveNeighbour(gw));
    }
    // From here on only deferrable steps: a caller racing to an ack may run
    // them afterwards in plan order.
    if mac_change.is_some() || !addr_ok {
        steps.push(NetStep::GratuitousArp {
            mac: final_mac,
            ip: desired.ipv4,
        });
    }
    if !desired.dns.is_empty() {
        steps.push(NetStep::WriteResolvConf(desired.dns.clone()));
    }
    if let Some(h) = &desired.hostname {
        steps.push(NetStep::SetHostname(h.clone()));
    }
    steps
}

fn nl(step: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetApplyError {
    move |source| NetApplyError::Netlink { step, source }
}

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

impl NetStep {
    /// Steps that don't affect whether the new address works (files, the
    /// hostname, and the gratuitous ARP: the host flushed its entry for the
    /// address when it handed it out, so it resolves the fork afresh); a
    /// caller racing to an ack may run them afterwards.
    pub fn is_deferrable(&self) -> bool {
        matches!(
            self,
            NetStep::WriteResolvConf(_) | NetStep::SetHostname(_) | NetStep::GratuitousArp { .. }
        )
    }
}

/// What [`configure_network_part`] did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// Every planned step, deferred ones included.
    pub steps: Vec<NetStep>,
    /// Time for the network steps (the deferred ones excluded).
    pub elapsed_us: u64,
    /// Steps not yet applied; run them with [`apply_deferred`].
    pub deferred: Vec<NetStep>,
    /// µs for reading the link state (when read), then for each applied
    /// step in order.
    pub step_us: Vec<u64>,
    /// Whether the link was read (false: planned against a [`LinkHint`]).
    pub link_read: bool,
    pub index: u32,
}

/// Reads the current state, plans, and applies everything: the single entry
/// point for boot and ReconfigureNetwork. Logs once done.
pub async fn configure(
    handle: &Handle,
    desired: &NetDesired,
) -> Result<ApplyReport, NetApplyError> {
    let mut report = configure_network_part(handle, desired, None).await?;
    apply_deferred(handle, &mut report).await?;
    log_configured(desired, &report);
    Ok(report)
}

/// The same plan as [`configure`] but applies only the steps the new address
/// needs; the rest stays in `deferred`. Does not log (hot path of a fork).
///
/// With a `hint` for the interface (and a MAC to set) the link is not read
/// first: the plan is made against [`LinkState::assumed`], which includes
/// every step. Should that fail (the hint was stale), the plan is made again
/// from the link as read.
pub async fn configure_network_part(
    handle: &Handle,
    desired: &NetDesired,
    hint: Option<&LinkHint>,
) -> Result<ApplyReport, NetApplyError> {
    if let Some(hint) = hint.filter(|h| h.interface == desired.interface && desired.mac.is_some()) {
        match configure_against(handle, desired, LinkState::assumed(hint)).await {
            Ok(r) => return Ok(r),
            Err(e) => debug!(error = %e, "apply against the link hint failed; reading the link"),
        }
    }
    let start = Instant::now();
    let current = link_state(handle, &desired.interface).await?;
    let mut report = configure_against(handle, desired, current).await?;
    report
        .step_us
        .insert(0, us_since(start) - report.elapsed_us);
    report.elapsed_us = us_since(start);
    report.link_read = true;
    Ok(report)
}

/// Plans against `current` and applies the non-deferrable steps.
async fn configure_against(
    handle: &Handle,
    desired: &NetDesired,
    current: LinkState,
) -> Result<ApplyReport, NetApplyError> {
    let start = Instant::now();
    let steps = plan(desired, &current);
    let (deferred, now): (Vec<NetStep>, Vec<NetStep>) =
        steps.iter().cloned().partition(NetStep::is_deferrable);
    let mut step_us = Vec::new();
    apply_timed(handle, current.index, &now, &mut step_us).await?;
    Ok(ApplyReport {
        steps,
        elapsed_us: us_since(start),
        deferred,
        step_us,
        link_read: false,
        index: current.index,
    })
}

/// Applies the steps [`configure_network_part`] left over.
pub async fn apply_deferred(
    handle: &Handle,
    report: &mut ApplyReport,
) -> Result<(), NetApplyError> {
    let deferred = std::mem::take(&mut report.deferred);
    apply_timed(handle, report.index, &deferred, &mut report.step_us).await
}

fn us_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

pub fn log_configured(desired: &NetDesired, report: &ApplyReport) {
    info!(
        interface = %desired.interface,
        mac = desired.mac.map(tracing::field::display),
        ipv4 = %desired.ipv4,
        prefix_len = desired.prefix_len,
        steps = report.steps.len(),
        elapsed_us = report.elapsed_us,
        "network configured"
    );
}

/// Applies steps in order to interface `index`; stops at the first failure.
pub async fn apply(handle: &Handle, index: u32, steps: &[NetStep]) -> Result<(), NetApplyError> {
    apply_timed(handle, index, steps, &mut Vec::new()).await
}

/// [`apply`], appending each step's duration to `step_us`.
async fn apply_timed(
    handle: &Handle,
    index: u32,
    steps: &[NetStep],
    step_us: &mut Vec<u64>,
) -> Result<(), NetApplyError> {
    for step in steps {
        let t = Instant::now();
        match step {
            NetStep::SetMac(mac) => set_mac(handle, index, *mac).await?,
            NetStep::FlushIpv4 => {
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
            }
            NetStep::AddAddress { addr, prefix_len } => handle
                .address()
                .add(index, IpAddr::V4(*addr), *prefix_len)
                .replace()
                .execute()
                .await
                .map_err(nl("add address"))?,
            NetStep::LinkUp => handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(nl("link up"))?,
            NetStep::ReplaceDefaultRoute(gw) => {
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(*gw)
                    .output_interface(index)
                    .build();
                handle
                    .route()
                    .add(route)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl("default route"))?
            }
            NetStep::FlushNeighbours => flush_neighbours(handle, index).await?,
            NetStep::RestoreNeighbour { ip, mac } => {
                // Best effort: without it the kernel simply ARPs.
                if let Err(e) = handle
                    .neighbours()
                    .add(index, IpAddr::V4(*ip))
                    .link_layer_address(&mac.octets())
                    .state(NeighbourState::Stale)
                    .replace()
                    .execute()
                    .await
                {
                    debug!(error = %e, %ip, "restoring neighbour failed");
                }
            }
            NetStep::ResolveNeighbour(ip) => {
                // Best effort: the first packet to it would ARP anyway.
                if let Err(e) = handle
                    .neighbours()
                    .add(index, IpAddr::V4(*ip))
                    .flags(NeighbourFlags::Use)
                    .state(NeighbourState::None)
                    .replace()
                    .execute()
                    .await
                {
                    debug!(error = %e, %ip, "starting neighbour resolution failed");
                }
            }
            NetStep::GratuitousArp { mac, ip } => {
                // Best effort: a lost announcement only delays peers' caches.
                if let Err(e) = send_gratuitous_arp(index, *mac, *ip) {
                    warn!(error = %e, "gratuitous ARP failed");
                }
            }
            NetStep::WriteResolvConf(dns) => {
                write_resolv_conf(dns).map_err(|source| NetApplyError::Io {
                    step: "write /etc/resolv.conf",
                    source,
                })?
            }
            NetStep::SetHostname(h) => {
                // A fork of a fork often keeps its name: skip the no-op.
                if !nix::unistd::gethostname().is_ok_and(|cur| cur.to_str() == Some(h.as_str())) {
                    nix::unistd::sethostname(h).map_err(|e| NetApplyError::Io {
                        step: "sethostname",
                        source: e.into(),
                    })?
                }
            }
        }
        step_us.push(us_since(t));
    }
    Ok(())
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
    std::fs::rename("/etc/.resolv.conf.forkvm", "/etc/resolv.conf")
}

/// Builds a gratuitous ARP request (sender = target = `ip`) as a 60-byte
/// Ethernet frame (minimum frame size without FCS).
pub fn gratuitous_arp_frame(mac: MacAddr, ip: Ipv4Addr) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]); // broadcast destination
    f[6..12].copy_from_slice(&mac.octets());
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // htype Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // ptype IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac.octets());
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address stays zero
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends one gratuitous ARP on interface `index` through an AF_PACKET socket.
/// Hand-built because no dependency in the tree offers raw ARP.
pub fn send_gratuitous_arp(index: u32, mac: MacAddr, ip: Ipv4Addr) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let frame = gratuitous_arp_frame(mac, ip);
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created, owned descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid start value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = 0x0806u16.to_be();
    addr.sll_ifindex = i32::try_from(index).map_err(std::io::Error::other)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: buffer and address are valid for the given lengths.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> NetRequest {
        NetRequest {
            interface: "eth0".into(),
            mac: "02:fc:00:00:00:02".into(),
            ipv4: "10.0.0.2".into(),
            prefix_len: 24,
            gateway: "10.0.0.1".into(),
            dns: vec!["10.0.0.1".into()],
            hostname: String::new(),
        }
    }

    fn state(mac: MacAddr, up: bool, ipv4: Vec<(Ipv4Addr, u8)>) -> LinkState {
        LinkState {
            index: 2,
            mac,
            up,
            ipv4,
            neighbours: vec![],
        }
    }

    const NEW_MAC: MacAddr = MacAddr([0x02, 0xfc, 0, 0, 0, 2]);
    const OLD_MAC: MacAddr = MacAddr([0x02, 0xfc, 0, 0, 0, 1]);
    const NEW_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn fork_readdress_full_plan_in_order() {
        let d = req().validate().unwrap();
        let steps = plan(
            &d,
            &state(OLD_MAC, true, vec![(Ipv4Addr::new(10, 0, 0, 9), 24)]),
        );
        assert_eq!(
            steps,
            vec![
                NetStep::FlushIpv4,
                NetStep::SetMac(NEW_MAC),
                NetStep::AddAddress {
                    addr: NEW_IP,
                    prefix_len: 24
                },
                NetStep::ReplaceDefaultRoute(Ipv4Addr::new(10, 0, 0, 1)),
                NetStep::FlushNeighbours,
                // No known gateway entry: start resolving it.
                NetStep::ResolveNeighbour(Ipv4Addr::new(10, 0, 0, 1)),
                NetStep::GratuitousArp {
                    mac: NEW_MAC,
                    ip: NEW_IP
                },
                NetStep::WriteResolvConf(vec!["10.0.0.1".parse().unwrap()]),
            ]
        );
    }

    #[test]
    fn gateway_neighbour_is_restored_after_the_flush_others_are_not() {
        let d = req().validate().unwrap();
        let gw_mac = MacAddr([0x02, 0xfd, 10, 0, 0, 1]);
        let mut cur = state(OLD_MAC, true, vec![(Ipv4Addr::new(10, 0, 0, 9), 24)]);
        cur.neighbours = vec![
            (
                Ipv4Addr::new(10, 0, 0, 7),
                MacAddr([0x02, 0xfc, 0, 0, 0, 7]),
            ),
            (Ipv4Addr::new(10, 0, 0, 1), gw_mac),
        ];
        let steps = plan(&d, &cur);
        let flush = steps.iter().position(|s| *s == NetStep::FlushNeighbours);
        let restore = steps.iter().position(|s| {
            *s == NetStep::RestoreNeighbour {
                ip: Ipv4Addr::new(10, 0, 0, 1),
                mac: gw_mac,
            }
        });
        assert!(flush.is_some() && restore.is_some() && flush < restore);
        // Known already: no fresh resolution.
        assert!(
            !steps
                .iter()
                .any(|s| matches!(s, NetStep::ResolveNeighbour(_)))
        );
        let restores = steps
            .iter()
            .filter(|s| matches!(s, NetStep::RestoreNeighbour { .. }))
            .count();
        assert_eq!(restores, 1);
        // A down link still gets brought up; the MAC change alone never bounces it.
        let steps = plan(&d, &state(OLD_MAC, false, vec![]));
        assert!(steps.contains(&NetStep::LinkUp));
        let steps = plan(&d, &state(OLD_MAC, true, vec![]));
        assert!(!steps.contains(&NetStep::LinkUp));
    }

    #[test]
    fn only_arp_files_and_hostname_are_deferrable() {
        let d = NetRequest {
            hostname: "vm-2".into(),
            ..req()
        }
        .validate()
        .unwrap();
        let steps = plan(&d, &state(OLD_MAC, true, vec![]));
        let deferred: Vec<_> = steps.iter().filter(|s| s.is_deferrable()).collect();
        assert_eq!(
            deferred,
            vec![
                &NetStep::GratuitousArp {
                    mac: NEW_MAC,
                    ip: NEW_IP
                },
                &NetStep::WriteResolvConf(vec!["10.0.0.1".parse().unwrap()]),
                &NetStep::SetHostname("vm-2".into()),
            ]
        );
        // Deferrable steps come last in a plan, so deferring keeps the order.
        let first = steps.iter().position(NetStep::is_deferrable).unwrap();
        assert!(steps[first..].iter().all(NetStep::is_deferrable));
    }

    #[test]
    fn old_address_is_gone_before_the_mac_changes() {
        // The link stays up during a live MAC change: the source's address
        // must never be on the interface together with the fork's MAC.
        let d = req().validate().unwrap();
        let steps = plan(
            &d,
            &state(OLD_MAC, true, vec![(Ipv4Addr::new(10, 0, 0, 9), 24)]),
        );
        let pos = |want: &NetStep| steps.iter().position(|s| s == want).unwrap();
        assert!(pos(&NetStep::FlushIpv4) < pos(&NetStep::SetMac(NEW_MAC)));
        assert!(
            !steps.contains(&NetStep::LinkUp),
            "an up link is not bounced"
        );
    }

    #[test]
    fn assumed_state_plans_every_step_and_restores_the_hinted_gateway() {
        let d = req().validate().unwrap();
        let gw_mac = MacAddr([0x02, 0xfd, 10, 0, 0, 1]);
        let hint = LinkHint {
            interface: "eth0".into(),
            index: 2,
            gateway: Some((Ipv4Addr::new(10, 0, 0, 1), gw_mac)),
        };
        let steps = plan(&d, &LinkState::assumed(&hint));
        assert_eq!(
            steps,
            vec![
                NetStep::FlushIpv4,
                NetStep::SetMac(NEW_MAC),
                NetStep::AddAddress {
                    addr: NEW_IP,
                    prefix_len: 24
                },
                NetStep::LinkUp,
                NetStep::ReplaceDefaultRoute(Ipv4Addr::new(10, 0, 0, 1)),
                NetStep::FlushNeighbours,
                NetStep::RestoreNeighbour {
                    ip: Ipv4Addr::new(10, 0, 0, 1),
                    mac: gw_mac
                },
                NetStep::GratuitousArp {
                    mac: NEW_MAC,
                    ip: NEW_IP
                },
                NetStep::WriteResolvConf(vec!["10.0.0.1".parse().unwrap()]),
            ]
        );
        // A hint for another gateway is not used for this one.
        let other = LinkHint {
            gateway: Some((Ipv4Addr::new(10, 0, 0, 254), gw_mac)),
            ..hint
        };
        let steps = plan(&d, &LinkState::assumed(&other));
        assert!(steps.contains(&NetStep::ResolveNeighbour(Ipv4Addr::new(10, 0, 0, 1))));
        assert!(
            !steps
                .iter()
                .any(|s| matches!(s, NetStep::RestoreNeighbour { .. }))
        );
    }

    #[test]
    fn mac_unchanged_means_no_link_down_or_set_mac() {
        let d = req().validate().unwrap();
        let steps = plan(&d, &state(NEW_MAC, true, vec![]));
        assert!(!steps.iter().any(|s| matches!(s, NetStep::SetMac(_))));
        // Nothing to flush, link already up.
        assert!(!steps.contains(&NetStep::FlushIpv4));
        assert!(!steps.contains(&NetStep::LinkUp));
        assert!(steps.contains(&NetStep::GratuitousArp {
            mac: NEW_MAC,
            ip: NEW_IP
        }));
    }

    #[test]
    fn empty_mac_keeps_device_mac() {
        let d = NetRequest {
            mac: String::new(),
            ..req()
        }
        .validate()
        .unwrap();
        let steps = plan(&d, &state(OLD_MAC, false, vec![]));
        assert!(!steps.iter().any(|s| matches!(s, NetStep::SetMac(_))));
        assert!(steps.contains(&NetStep::LinkUp));
        assert!(steps.contains(&NetStep::GratuitousArp {
            mac: OLD_MAC,
            ip: NEW_IP
        }));
    }

    #[test]
    fn no_gateway_means_no_route() {
        let d = NetRequest {
            gateway: String::new(),
            dns: vec![],
            ..req()
        }
        .validate()
        .unwrap();
        let steps = plan(&d, &state(OLD_MAC, true, vec![]));
        assert!(
            !steps
                .iter()
                .any(|s| matches!(s, NetStep::ReplaceDefaultRoute(_)))
        );
        assert!(
            !steps
                .iter()
                .any(|s| matches!(s, NetStep::WriteResolvConf(_)))
        );
    }

    #[test]
    fn already_configured_is_nearly_empty() {
        let d = NetRequest {
            hostname: "vm-2".into(),
            ..req()
        }
        .validate()
        .unwrap();
        let steps = plan(&d, &state(NEW_MAC, true, vec![(NEW_IP, 24)]));
        assert_eq!(
            steps,
            vec![
                NetStep::ReplaceDefaultRoute(Ipv4Addr::new(10, 0, 0, 1)),
                NetStep::ResolveNeighbour(Ipv4Addr::new(10, 0, 0, 1)),
                NetStep::WriteResolvConf(vec!["10.0.0.1".parse().unwrap()]),
                NetStep::SetHostname("vm-2".into()),
            ]
        );
    }

    #[test]
    fn same_ip_other_prefix_is_readdressed() {
        let d = req().validate().unwrap();
        let steps = plan(&d, &state(NEW_MAC, true, vec![(NEW_IP, 16)]));
        assert!(steps.contains(&NetStep::FlushIpv4));
    }

    #[test]
    fn invalid_inputs_are_typed_errors() {
        let cases: Vec<(NetRequest, NetConfigError)> = vec![
            (
                NetRequest {
                    mac: "02:fc:00:00:00".into(),
                    ..req()
                },
                NetConfigError::Mac("02:fc:00:00:00".into()),
            ),
            (
                NetRequest {
                    mac: "zz:fc:00:00:00:01".into(),
                    ..req()
                },
                NetConfigError::Mac("zz:fc:00:00:00:01".into()),
            ),
            (
                NetRequest {
                    mac: "01:00:5e:00:00:01".into(),
                    ..req()
                },
                NetConfigError::Mac("01:00:5e:00:00:01".into()),
            ),
            (
                NetRequest {
                    ipv4: "10.0.0.256".into(),
                    ..req()
                },
                NetConfigError::Ipv4("10.0.0.256".into()),
            ),
            (
                NetRequest {
                    ipv4: "0.0.0.0".into(),
                    ..req()
                },
                NetConfigError::Ipv4("0.0.0.0".into()),
            ),
            (
                NetRequest {
                    prefix_len: 33,
                    ..req()
                },
                NetConfigError::PrefixLen(33),
            ),
            (
                NetRequest {
                    gateway: "gw".into(),
                    ..req()
                },
                NetConfigError::Gateway("gw".into()),
            ),
            (
                NetRequest {
                    dns: vec!["x".into()],
                    ..req()
                },
                NetConfigError::Dns("x".into()),
            ),
            (
                NetRequest {
                    interface: String::new(),
                    ..req()
                },
                NetConfigError::Interface(String::new()),
            ),
            (
                NetRequest {
                    interface: "a-very-long-ifname".into(),
                    ..req()
                },
                NetConfigError::Interface("a-very-long-ifname".into()),
            ),
            (
                NetRequest {
                    hostname: "bad_host".into(),
                    ..req()
                },
                NetConfigError::Hostname("bad_host".into()),
            ),
        ];
        for (r, want) in cases {
            assert_eq!(r.validate(), Err(want));
        }
    }

    #[test]
    fn mac_rules() {
        let d = NetRequest {
            mac: "02:AB:cd:00:10:ff".into(),
            ..req()
        }
        .validate()
        .unwrap();
        assert_eq!(d.mac, Some(MacAddr([0x02, 0xab, 0xcd, 0x00, 0x10, 0xff])));
        assert_eq!(d.mac.unwrap().to_string(), "02:ab:cd:00:10:ff");
        for bad in [
            "00:00:00:00:00:00",
            "02:00:00:00:00:01:02",
            "ff:ff:ff:ff:ff:ff",
            "02-00-00-00-00-01",
        ] {
            let r = NetRequest {
                mac: bad.into(),
                ..req()
            };
            assert_eq!(r.validate(), Err(NetConfigError::Mac(bad.into())));
        }
    }

    #[test]
    fn garp_frame_layout() {
        let f = gratuitous_arp_frame(NEW_MAC, NEW_IP);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &NEW_MAC.octets());
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &NEW_MAC.octets());
        assert_eq!(&f[28..32], &[10, 0, 0, 2]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 0, 0, 2]);
        assert!(f[42..].iter().all(|b| *b == 0));
    }
}
