//! The daemon's packet filter and NAT, planned as data and applied as one
//! nftables transaction (validate → plan → apply, as the guest's netconf).
//!
//! [`plan`] is a pure function from the daemon's settings and every guest's
//! lease, mode and published ports to a [`Ruleset`]; [`Ruleset::script`] is
//! the `nft -f` text that replaces forkvm's two tables (`bridge forkvm`,
//! `ip forkvm`) in one atomic transaction; [`apply`] runs it. Re-applying
//! the same plan is a no-op in effect, so the daemon simply re-plans from
//! its store after every change and after a restart: nothing is ever added
//! twice, and rules of instances that are gone disappear with the rebuild.
//! The chains never depend on the guests (everything per guest is a set or
//! map element), so once a plan is applied the next one can be applied as
//! the element diff [`Ruleset::delta_from`]: cheaper by far on the fork's
//! path, since the kernel commits element changes without waiting for
//! hooks and chains to be re-registered.
//!
//! Why the `nft` tool rather than a crate: it is the kernel's maintained
//! front end, its text scripts are atomic transactions and read exactly like
//! the `nft list table` output the docs and tests show (the `nftables` crate
//! only wraps the same binary in JSON).

mod apply;
mod render;

pub use apply::{NFT_BIN, apply, apply_script, enable_forwarding, remove_tables};

use crate::{Ipv4Cidr, MacAddr, validate_ifname};
use std::collections::HashSet;
use std::net::Ipv4Addr;

/// Name of forkvm's tables in both families.
pub const TABLE: &str = "forkvm";

/// Transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = FirewallError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            other => Err(FirewallError::Protocol(other.to_string())),
        }
    }
}

/// One published port: `host_port` on the daemon namespace's addresses
/// forwarded to `guest_port` on the guest's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortForward {
    pub protocol: Protocol,
    pub host_port: u16,
    pub guest_port: u16,
}

/// What a guest's TAP may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMode {
    /// A fork whose handoff has not completed: it still runs with its
    /// source's identity, so only its handoff traffic leaves, and only from
    /// its own lease (ARP for its own address, UDP to the gateway where the
    /// mailbox ack listener is). Its source's MAC and IP are never usable.
    Handoff,
    /// Frames from the leased MAC with the leased IPv4 (and ARP for it).
    Active,
}

/// One guest as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestRules {
    pub tap: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub mode: GuestMode,
    /// Source NAT out of the namespace (also needs the daemon's setting).
    pub egress: bool,
    pub ports: Vec<PortForward>,
}

/// The daemon-wide inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallSettings {
    pub bridge: String,
    pub subnet: Ipv4Cidr,
    pub gateway: Ipv4Addr,
    /// Egress for every guest; `false` turns it off whatever instances ask.
    pub egress: bool,
}

/// A plan that can't be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FirewallError {
    #[error("invalid interface name {0:?}")]
    IfName(String),
    #[error("TAP {0} appears twice")]
    DuplicateTap(String),
    #[error("address {0} is leased twice")]
    DuplicateIp(Ipv4Addr),
    #[error("{ip} is outside the instance subnet {subnet}")]
    OutsideSubnet { ip: Ipv4Addr, subnet: Ipv4Cidr },
    #[error("host port {}/{} is published twice", .0.host_port, .0.protocol.as_str())]
    PortTaken(PortForward),
    #[error("port 0 can't be published")]
    ZeroPort,
    #[error("unknown protocol {0:?} (tcp or udp)")]
    Protocol(String),
}

/// The planned rules, ready to render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    settings: FirewallSettings,
    /// Sorted by TAP name: the same inputs give the same text.
    guests: Vec<GuestRules>,
}

impl Ruleset {
    /// The `nft -f` script: both tables replaced in one transaction.
    pub fn script(&self) -> String {
        render::script(&self.settings, &self.guests)
    }

    /// Addresses NATed out of the namespace.
    pub fn egress_addresses(&self) -> Vec<Ipv4Addr> {
        render::egress(&self.settings, &self.guests)
    }

    /// The element-only transaction that turns the tables `previous` was
    /// applied as into this plan's (the chains never differ): `Some("")`
    /// when nothing changed, `None` when the settings did (apply
    /// [`Ruleset::script`]).
    pub fn delta_from(&self, previous: &Ruleset) -> Option<String> {
        if self.settings != previous.settings {
            return None;
        }
        let before = render::sets(&previous.settings, &previous.guests);
        let after = render::sets(&self.settings, &self.guests);
        Some(render::delta(&before, &after).unwrap_or_default())
    }
}

/// Checks the inputs and orders them.
pub fn plan(settings: &FirewallSettings, guests: &[GuestRules]) -> Result<Ruleset, FirewallError> {
    validate_ifname(&settings.bridge)
        .map_err(|_| FirewallError::IfName(settings.bridge.clone()))?;
    let (mut taps, mut ips, mut ports) = (HashSet::new(), HashSet::new(), HashSet::new());
    for g in guests {
        validate_ifname(&g.tap).map_err(|_| FirewallError::IfName(g.tap.clone()))?;
        if !taps.insert(g.tap.as_str()) {
            return Err(FirewallError::DuplicateTap(g.tap.clone()));
        }
        if !ips.insert(g.ip) {
            return Err(FirewallError::DuplicateIp(g.ip));
        }
        if !settings.subnet.contains(g.ip) {
            return Err(FirewallError::OutsideSubnet {
                ip: g.ip,
                subnet: settings.subnet,
            });
        }
        for p in &g.ports {
            check_port(p)?;
            if !ports.insert((p.protocol, p.host_port)) {
                return Err(FirewallError::PortTaken(*p));
            }
        }
    }
    let mut guests = guests.to_vec();
    guests.sort_by(|a, b| a.tap.cmp(&b.tap));
    for g in &mut guests {
        g.ports.sort();
    }
    Ok(Ruleset {
        settings: settings.clone(),
        guests,
    })
}

/// A published port names real ports on both sides.
pub fn check_port(p: &PortForward) -> Result<(), FirewallError> {
    if p.host_port == 0 || p.guest_port == 0 {
        return Err(FirewallError::ZeroPort);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
