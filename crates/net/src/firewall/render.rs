//! The ruleset as `nft -f` text. Every value in it is typed (addresses,
//! MACs, ports) or a checked interface name, so nothing can break out of a
//! statement.
//!
//! Per-guest data that changes when a fork's handoff completes (which chain
//! its TAP jumps to, the egress set, the published-port maps) lives in set
//! and map *elements*, so that change is an element-only transaction
//! ([`activation`]): no table, chain or hook is touched, which is what
//! makes an nftables commit slow (~15 ms here, far more on a loaded host).

use super::{FirewallSettings, GuestMode, GuestRules, Protocol, TABLE};
use std::fmt::Write;
use std::net::Ipv4Addr;

/// Both tables replaced in one transaction: `table X` creates a missing
/// table, so the `delete` never fails, and the kernel applies the whole
/// file or nothing.
pub(super) fn script(s: &FirewallSettings, guests: &[GuestRules]) -> String {
    let mut out = String::new();
    for family in ["bridge", "ip"] {
        let _ = writeln!(out, "table {family} {TABLE}\ndelete table {family} {TABLE}");
    }
    bridge_table(&mut out, s, guests);
    ip_table(&mut out, s, guests);
    out
}

/// The chain a guest's frames go through.
pub(super) fn chain_of(tap: &str, mode: GuestMode) -> String {
    match mode {
        GuestMode::Active => format!("guest_{tap}"),
        GuestMode::Handoff => format!("handoff_{tap}"),
    }
}

/// Layer 2: every frame a guest sends, before the bridge delivers it to
/// the host or forwards it, checked against its lease. A guest still in
/// its handoff has both chains, so completing it only swaps the dispatch
/// element.
fn bridge_table(out: &mut String, s: &FirewallSettings, guests: &[GuestRules]) {
    let _ = writeln!(out, "table bridge {TABLE} {{");
    let dispatch: Vec<String> = guests
        .iter()
        .map(|g| format!("\"{}\" : jump {}", g.tap, chain_of(&g.tap, g.mode)))
        .collect();
    set(out, "map dispatch", "ifname : verdict", &dispatch);
    let _ = writeln!(out, "\tchain prerouting {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook prerouting priority -300; policy accept;"
    );
    let _ = writeln!(out, "\t\tiifname vmap @dispatch");
    let _ = writeln!(out, "\t}}");
    for g in guests {
        guest_chain(out, s, g, GuestMode::Active);
        if g.mode == GuestMode::Handoff {
            guest_chain(out, s, g, GuestMode::Handoff);
        }
    }
    let _ = writeln!(out, "}}");
}

fn guest_chain(out: &mut String, s: &FirewallSettings, g: &GuestRules, mode: GuestMode) {
    let _ = writeln!(out, "\tchain {} {{", chain_of(&g.tap, mode));
    let (mac, ip) = (g.mac, g.ip);
    // Each refusal has its own counter: tests and operators see which kind
    // of forgery was dropped, per TAP.
    let _ = writeln!(out, "\t\tether saddr != {mac} counter drop");
    let _ = writeln!(out, "\t\tarp saddr ether != {mac} counter drop");
    let _ = writeln!(out, "\t\tarp saddr ip != {ip} counter drop");
    let _ = writeln!(out, "\t\tip saddr != {ip} counter drop");
    let _ = writeln!(out, "\t\tether type arp accept");
    match mode {
        GuestMode::Active => {
            let _ = writeln!(out, "\t\tether type ip accept");
        }
        GuestMode::Handoff => {
            let _ = writeln!(out, "\t\tip daddr {} meta l4proto udp accept", s.gateway);
        }
    }
    let _ = writeln!(out, "\t\tcounter drop");
    let _ = writeln!(out, "\t}}");
}

/// A set or map declaration with its elements (none: an empty one).
fn set(out: &mut String, decl: &str, ty: &str, elements: &[String]) {
    let _ = writeln!(out, "\t{decl} {{\n\t\ttype {ty}");
    if !elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(out, "\t}}");
}

/// Whether a guest's traffic is NATed out.
fn has_egress(s: &FirewallSettings, g: &GuestRules) -> bool {
    s.egress && g.egress && g.mode == GuestMode::Active
}

/// Guests whose traffic is NATed out.
pub(super) fn egress(s: &FirewallSettings, guests: &[GuestRules]) -> Vec<Ipv4Addr> {
    guests
        .iter()
        .filter(|g| has_egress(s, g))
        .map(|g| g.ip)
        .collect()
}

/// `host_port : ip . guest_port` of the active guests' ports of `proto`.
fn port_elements(guests: &[GuestRules], proto: Protocol) -> Vec<String> {
    guests
        .iter()
        .filter(|g| g.mode == GuestMode::Active)
        .flat_map(|g| port_elements_of(g, proto))
        .collect()
}

fn port_elements_of(g: &GuestRules, proto: Protocol) -> Vec<String> {
    g.ports
        .iter()
        .filter(|p| p.protocol == proto)
        .map(|p| format!("{} : {} . {}", p.host_port, g.ip, p.guest_port))
        .collect()
}

const PORT_MAPS: [(Protocol, &str); 2] =
    [(Protocol::Tcp, "tcp_ports"), (Protocol::Udp, "udp_ports")];

/// Layer 3: source NAT for egress, published ports (DNAT through the port
/// maps), and what may be forwarded between the guests' bridge and the
/// namespace's other links.
fn ip_table(out: &mut String, s: &FirewallSettings, guests: &[GuestRules]) {
    let br = &s.bridge;
    let _ = writeln!(out, "table ip {TABLE} {{");
    let egress: Vec<String> = egress(s, guests).iter().map(Ipv4Addr::to_string).collect();
    set(out, "set egress", "ipv4_addr", &egress);
    for (proto, name) in PORT_MAPS {
        let elements = port_elements(guests, proto);
        set(
            out,
            &format!("map {name}"),
            "inet_service : ipv4_addr . inet_service",
            &elements,
        );
    }
    nat_chain(out, "prerouting", "prerouting", "dstnat", |out| {
        for (proto, name) in PORT_MAPS {
            let p = proto.as_str();
            let _ = writeln!(
                out,
                "\t\tfib daddr type local dnat ip to {p} dport map @{name}"
            );
        }
    });
    // Connections the namespace itself opens to its own addresses
    // (loopback excluded: the kernel won't route 127/8 to a guest).
    nat_chain(out, "output", "output", "-100", |out| {
        for (proto, name) in PORT_MAPS {
            let p = proto.as_str();
            let _ = writeln!(
                out,
                "\t\tfib daddr type local ip daddr != 127.0.0.0/8 dnat ip to {p} dport map @{name}"
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

/// The element-only transaction that takes guest `g` (now Active) from
/// the state [`script`] rendered for it in Handoff mode to the state it
/// renders now, leaving its (then unused) handoff chain in place until the
/// next full rebuild.
pub(super) fn activation(s: &FirewallSettings, g: &GuestRules) -> String {
    let mut out = String::new();
    let tap = &g.tap;
    let _ = writeln!(
        out,
        "delete element bridge {TABLE} dispatch {{ \"{tap}\" }}"
    );
    let _ = writeln!(
        out,
        "add element bridge {TABLE} dispatch {{ \"{tap}\" : jump {} }}",
        chain_of(tap, GuestMode::Active)
    );
    if has_egress(s, g) {
        let _ = writeln!(out, "add element ip {TABLE} egress {{ {} }}", g.ip);
    }
    for (proto, name) in PORT_MAPS {
        let elements = port_elements_of(g, proto);
        if !elements.is_empty() {
            let _ = writeln!(
                out,
                "add element ip {TABLE} {name} {{ {} }}",
                elements.join(", ")
            );
        }
    }
    out
}
