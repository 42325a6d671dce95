//! Plan: the pure half of re-addressing. [`plan`] turns a validated
//! [`NetDesired`] and the interface's observed [`LinkState`] into the ordered
//! [`NetStep`]s that take one to the other. No I/O, so every ordering rule
//! the fork handoff relies on is a unit test here.

use std::net::{IpAddr, Ipv4Addr};

use forkvm_mailbox::MacAddr;

use super::NetDesired;

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

/// One netlink (or file) change. Order in a plan is the order of application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetStep {
    /// Live MAC change on an UP link (virtio-net: `IFF_LIVE_ADDR_CHANGE`);
    /// [`apply`](super::apply()) falls back to down/set/up when the driver answers EBUSY.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What the request `eth0 02:fc:00:00:00:02 10.0.0.2/24 via 10.0.0.1,
    /// DNS 10.0.0.1` validates to (see the request tests).
    fn desired() -> NetDesired {
        NetDesired {
            interface: "eth0".into(),
            mac: Some(NEW_MAC),
            ipv4: NEW_IP,
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dns: vec!["10.0.0.1".parse().unwrap()],
            hostname: None,
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
        let d = desired();
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
        let d = desired();
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
        let d = NetDesired {
            hostname: Some("vm-2".into()),
            ..desired()
        };
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
        let d = desired();
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
        let d = desired();
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
        let d = desired();
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
        let d = NetDesired {
            mac: None,
            ..desired()
        };
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
        let d = NetDesired {
            gateway: None,
            dns: vec![],
            ..desired()
        };
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
        let d = NetDesired {
            hostname: Some("vm-2".into()),
            ..desired()
        };
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
        let d = desired();
        let steps = plan(&d, &state(NEW_MAC, true, vec![(NEW_IP, 16)]));
        assert!(steps.contains(&NetStep::FlushIpv4));
    }
}
