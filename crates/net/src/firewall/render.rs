//! The ruleset as `nft -f` text. Every value in it is typed (addresses,
//! MACs, ports) or a checked interface name, so nothing can break out of a
//! statement.
//!
//! The chains are the same for every set of guests: everything per guest
//! (its TAP, MAC, address, whether its handoff is done, egress, ports)
//! lives in set and map *elements*. So every change after the first is an
//! element-only transaction ([`delta`]): no table, chain or hook is
//! touched, which is what makes an nftables commit slow (~15-30 ms here,
//! far more on a loaded host, against ~5 ms for elements).

use super::{FirewallSettings, GuestMode, GuestRules, Protocol, TABLE};
use std::fmt::Write;
use std::net::Ipv4Addr;

/// One set or map of forkvm's tables with its elements as `(key, value)`
/// texts (`value` only for maps).
pub(super) struct Set {
    family: &'static str,
    decl: &'static str,
    name: &'static str,
    ty: &'static str,
    elements: Vec<(String, Option<String>)>,
}

impl Set {
    fn element(&self, (k, v): &(String, Option<String>)) -> String {
        match v {
            Some(v) => format!("{k} : {v}"),
            None => k.clone(),
        }
    }
}

/// Every set and map, in the order the tables declare them.
pub(super) fn sets(s: &FirewallSettings, guests: &[GuestRules]) -> Vec<Set> {
    let q = |t: &str| format!("\"{t}\"");
    let all = |f: &dyn Fn(&GuestRules) -> String| guests.iter().map(|g| (f(g), None)).collect();
    let active = guests
        .iter()
        .filter(|g| g.mode == GuestMode::Active)
        .map(|g| (q(&g.tap), None))
        .collect();
    let egress = egress(s, guests)
        .iter()
        .map(|ip| (ip.to_string(), None))
        .collect();
    let ports = |proto| {
        guests
            .iter()
            .filter(|g| g.mode == GuestMode::Active)
            .flat_map(|g| {
                g.ports
                    .iter()
                    .filter(move |p| p.protocol == proto)
                    .map(move |p| {
                        (
                            p.host_port.to_string(),
                            Some(format!("{} . {}", g.ip, p.guest_port)),
                        )
                    })
            })
            .collect()
    };
    let set = |family, decl, name, ty, elements| Set {
        family,
        decl,
        name,
        ty,
        elements,
    };
    vec![
        set("bridge", "set", "guests", "ifname", all(&|g| q(&g.tap))),
        set(
            "bridge",
            "set",
            "macs",
            "ifname . ether_addr",
            all(&|g| format!("{} . {}", q(&g.tap), g.mac)),
        ),
        set(
            "bridge",
            "set",
            "addrs",
            "ifname . ipv4_addr",
            all(&|g| format!("{} . {}", q(&g.tap), g.ip)),
        ),
        set("bridge", "set", "active", "ifname", active),
        set("ip", "set", "egress", "ipv4_addr", egress),
        set(
            "ip",
            "map",
            "tcp_ports",
            "inet_service : ipv4_addr . inet_service",
            ports(Protocol::Tcp),
        ),
        set(
            "ip",
            "map",
            "udp_ports",
            "inet_service : ipv4_addr . inet_service",
            ports(Protocol::Udp),
        ),
    ]
}

/// Both tables replaced in one transaction: `table X` creates a missing
/// table, so the `delete` never fails, and the kernel applies the whole
/// file or nothing.
pub(super) fn script(s: &FirewallSettings, guests: &[GuestRules]) -> String {
    let mut out = String::new();
    for family in ["bridge", "ip"] {
        let _ = writeln!(out, "table {family} {TABLE}\ndelete table {family} {TABLE}");
    }
    let sets = sets(s, guests);
    bridge_table(&mut out, s, &sets);
    ip_table(&mut out, s, &sets);
    out
}

/// The element changes that turn the tables of `before` into those of
/// `after` (same settings), or `None` when there are none.
pub(super) fn delta(before: &[Set], after: &[Set]) -> Option<String> {
    let mut out = String::new();
    for (b, a) in before.iter().zip(after) {
        let gone: Vec<&str> = b
            .elements
            .iter()
            .filter(|e| !a.elements.contains(e))
            .map(|(k, _)| k.as_str())
            .collect();
        if !gone.is_empty() {
            let _ = writeln!(
                out,
                "delete element {} {TABLE} {} {{ {} }}",
                b.family,
                b.name,
                gone.join(", ")
            );
        }
        let new: Vec<String> = a
            .elements
            .iter()
            .filter(|e| !b.elements.contains(e))
            .map(|e| a.element(e))
            .collect();
        if !new.is_empty() {
            let _ = writeln!(
                out,
                "add element {} {TABLE} {} {{ {} }}",
                a.family,
                a.name,
                new.join(", ")
            );
        }
    }
    (!out.is_empty()).then_some(out)
}

fn declare(out: &mut String, sets: &[Set], family: &str) {
    for set in sets.iter().filter(|s| s.family == family) {
        let _ = writeln!(out, "\t{} {} {{\n\t\ttype {}", set.decl, set.name, set.ty);
        if !set.elements.is_empty() {
            let list: Vec<String> = set.elements.iter().map(|e| set.element(e)).collect();
            let _ = writeln!(out, "\t\telements = {{ {} }}", list.join(", "));
        }
        let _ = writeln!(out, "\t}}");
    }
}

/// Layer 2: every frame a guest sends, before the bridge delivers it to
/// the host or forwards it, checked against its lease (its TAP's entry in
/// `macs` and `addrs`). Each refusal has its own counter.
fn bridge_table(out: &mut String, s: &FirewallSettings, sets: &[Set]) {
    let _ = writeln!(out, "table bridge {TABLE} {{");
    declare(out, sets, "bridge");
    let _ = writeln!(out, "\tchain prerouting {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook prerouting priority -300; policy accept;"
    );
    let _ = writeln!(out, "\t\tiifname @guests jump guest");
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "\tchain guest {{");
    let _ = writeln!(out, "\t\tiifname . ether saddr != @macs counter drop");
    let _ = writeln!(out, "\t\tiifname . arp saddr ether != @macs counter drop");
    let _ = writeln!(out, "\t\tiifname . arp saddr ip != @addrs counter drop");
    let _ = writeln!(out, "\t\tiifname . ip saddr != @addrs counter drop");
    let _ = writeln!(out, "\t\tether type arp accept");
    // Handoff done: any IPv4 from its lease. Before: only the handoff's
    // UDP to the gateway (the mailbox ack).
    let _ = writeln!(out, "\t\tiifname @active ether type ip accept");
    let _ = writeln!(out, "\t\tip daddr {} meta l4proto udp accept", s.gateway);
    let _ = writeln!(out, "\t\tcounter drop");
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
}

/// Guests whose traffic is NATed out.
pub(super) fn egress(s: &FirewallSettings, guests: &[GuestRules]) -> Vec<Ipv4Addr> {
    guests
        .iter()
        .filter(|g| s.egress && g.egress && g.mode == GuestMode::Active)
        .map(|g| g.ip)
        .collect()
}

/// Layer 3: source NAT for egress, published ports (DNAT through the port
/// maps), and what may be forwarded between the guests' bridge and the
/// namespace's other links.
fn ip_table(out: &mut String, s: &FirewallSettings, sets: &[Set]) {
    let br = &s.bridge;
    let _ = writeln!(out, "table ip {TABLE} {{");
    declare(out, sets, "ip");
    let maps = [("tcp", "tcp_ports"), ("udp", "udp_ports")];
    nat_chain(out, "prerouting", "prerouting", "dstnat", |out| {
        for (p, map) in maps {
            let _ = writeln!(
                out,
                "\t\tfib daddr type local dnat ip to {p} dport map @{map}"
            );
        }
    });
    // Connections the namespace itself opens to its own addresses
    // (loopback excluded: the kernel won't route 127/8 to a guest).
    nat_chain(out, "output", "output", "-100", |out| {
        for (p, map) in maps {
            let _ = writeln!(
                out,
                "\t\tfib daddr type local ip daddr != 127.0.0.0/8 dnat ip to {p} dport map @{map}"
            );
        }
    });
    nat_chain(out, "postrouting", "postrouting", "srcnat", |out| {
        let _ = writeln!(
            out,
            "\t\tip saddr @egress ip daddr != {} oifname != \"{br}\" masquerade",
            s.subnet
        );
    });
    let _ = writeln!(out, "\tchain forward {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook forward priority filter; policy accept;"
    );
    // Replies and published ports pass; otherwise a guest's traffic leaves
    // only with egress, and nothing unsolicited enters the bridge.
    let _ = writeln!(out, "\t\tct state established,related accept");
    let _ = writeln!(out, "\t\toifname \"{br}\" ct status dnat accept");
    let _ = writeln!(out, "\t\toifname \"{br}\" counter drop");
    let _ = writeln!(out, "\t\tiifname \"{br}\" ip saddr != @egress counter drop");
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
}

fn nat_chain(
    out: &mut String,
    name: &str,
    hook: &str,
    priority: &str,
    body: impl FnOnce(&mut String),
) {
    let _ = writeln!(out, "\tchain {name} {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook {hook} priority {priority}; policy accept;"
    );
    body(out);
    let _ = writeln!(out, "\t}}");
}
