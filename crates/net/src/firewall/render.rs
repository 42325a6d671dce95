//! The ruleset as `nft -f` text. Every value in it is typed (addresses,
//! MACs, ports) or a checked interface name, so nothing can break out of a
//! statement.

use super::{FirewallSettings, GuestMode, GuestRules, TABLE};
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
pub(super) fn chain_of(g: &GuestRules) -> String {
    match g.mode {
        GuestMode::Active => format!("guest_{}", g.tap),
        GuestMode::Handoff => format!("handoff_{}", g.tap),
    }
}

/// Layer 2: every frame a guest sends, before the bridge delivers it to
/// the host or forwards it, checked against its lease.
fn bridge_table(out: &mut String, s: &FirewallSettings, guests: &[GuestRules]) {
    let _ = writeln!(out, "table bridge {TABLE} {{");
    let _ = writeln!(out, "\tchain prerouting {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook prerouting priority -300; policy accept;"
    );
    for g in guests {
        let _ = writeln!(out, "\t\tiifname \"{}\" jump {}", g.tap, chain_of(g));
    }
    let _ = writeln!(out, "\t}}");
    for g in guests {
        let _ = writeln!(out, "\tchain {} {{", chain_of(g));
        let (mac, ip) = (g.mac, g.ip);
        // Each refusal has its own counter: tests and operators see which
        // kind of forgery was dropped.
        let _ = writeln!(out, "\t\tether saddr != {mac} counter drop");
        let _ = writeln!(out, "\t\tarp saddr ether != {mac} counter drop");
        let _ = writeln!(out, "\t\tarp saddr ip != {ip} counter drop");
        let _ = writeln!(out, "\t\tip saddr != {ip} counter drop");
        let _ = writeln!(out, "\t\tether type arp accept");
        match g.mode {
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

/// Layer 3: source NAT for egress, published ports (DNAT), and what may be
/// forwarded between the guests' bridge and the namespace's other links.
fn ip_table(out: &mut String, s: &FirewallSettings, guests: &[GuestRules]) {
    let br = &s.bridge;
    let _ = writeln!(out, "table ip {TABLE} {{");
    let _ = writeln!(out, "\tset egress {{\n\t\ttype ipv4_addr");
    let egress = egress(s, guests);
    if !egress.is_empty() {
        let list: Vec<String> = egress.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(out, "\t\telements = {{ {} }}", list.join(", "));
    }
    let _ = writeln!(out, "\t}}");
    let dnat: Vec<String> = guests
        .iter()
        .filter(|g| g.mode == GuestMode::Active)
        .flat_map(|g| {
            g.ports.iter().map(move |p| {
                let proto = p.protocol.as_str();
                format!(
                    "{proto} dport {} dnat to {}:{}",
                    p.host_port, g.ip, p.guest_port
                )
            })
        })
        .collect();
    nat_chain(out, "prerouting", "prerouting", "dstnat", |out| {
        for d in &dnat {
            let _ = writeln!(out, "\t\tfib daddr type local {d}");
        }
    });
    // Connections the namespace itself opens to its own addresses
    // (loopback excluded: the kernel won't route 127/8 to a guest).
    nat_chain(out, "output", "output", "-100", |out| {
        for d in &dnat {
            let _ = writeln!(out, "\t\tfib daddr type local ip daddr != 127.0.0.0/8 {d}");
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
