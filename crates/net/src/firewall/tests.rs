use super::*;

fn settings() -> FirewallSettings {
    FirewallSettings {
        bridge: "forkvm0".into(),
        subnet: "10.88.0.0/16".parse().unwrap(),
        gateway: Ipv4Addr::new(10, 88, 0, 1),
        egress: true,
    }
}

fn guest(tap: &str, last: u8, mode: GuestMode) -> GuestRules {
    GuestRules {
        tap: tap.into(),
        mac: format!("02:fc:00:00:00:{last:02x}").parse().unwrap(),
        ip: Ipv4Addr::new(10, 88, 0, last),
        mode,
        egress: true,
        ports: vec![],
    }
}

fn tcp(host_port: u16, guest_port: u16) -> PortForward {
    PortForward {
        protocol: Protocol::Tcp,
        host_port,
        guest_port,
    }
}

/// The statements of chain `name` in `script`.
fn chain<'a>(script: &'a str, name: &str) -> Vec<&'a str> {
    let start = format!("\tchain {name} {{");
    let mut lines = script.lines().skip_while(|l| *l != start).skip(1);
    let mut out = vec![];
    for l in lines.by_ref() {
        if l == "\t}" {
            break;
        }
        out.push(l.trim());
    }
    out
}

/// The `ip` table's part of a script.
fn ip_table(script: &str) -> &str {
    let at = script.find("table ip forkvm {").unwrap();
    &script[at..]
}

#[test]
fn empty_plan_still_replaces_both_tables() {
    let s = plan(&settings(), &[]).unwrap().script();
    assert!(s.starts_with(
        "table bridge forkvm\ndelete table bridge forkvm\ntable ip forkvm\ndelete table ip forkvm\n"
    ));
    assert_eq!(
        chain(&s, "prerouting")[0],
        "type filter hook prerouting priority -300; policy accept;"
    );
    assert!(!s.contains("elements"), "empty sets and maps: {s}");
    assert!(chain(&s, "prerouting").contains(&"iifname @guests jump guest"));
    assert!(chain(&s, "forward").contains(&"iifname \"forkvm0\" ip saddr != @egress counter drop"));
}

/// The elements of set or map `name` (its `elements = { … }` line).
fn elements<'a>(script: &'a str, name: &str) -> &'a str {
    let at = script.find(&format!(" {name} {{")).unwrap();
    let rest = &script[at..];
    let body = &rest[..rest.find("\t}").unwrap()];
    body.split("elements = { ")
        .nth(1)
        .map_or("", |e| e.trim_end().trim_end_matches('}').trim())
}

#[test]
fn an_active_guest_may_send_only_from_its_lease() {
    let s = plan(&settings(), &[guest("fvma", 2, GuestMode::Active)])
        .unwrap()
        .script();
    assert_eq!(chain(&s, "prerouting")[1], "iifname @guests jump guest");
    assert_eq!(
        chain(&s, "guest"),
        [
            "iifname . ether saddr != @macs counter drop",
            "iifname . arp saddr ether != @macs counter drop",
            "iifname . arp saddr ip != @addrs counter drop",
            "iifname . ip saddr != @addrs counter drop",
            "ether type arp accept",
            "iifname @active ether type ip accept",
            "ip daddr 10.88.0.1 meta l4proto udp accept",
            "counter drop",
        ]
    );
    assert_eq!(elements(&s, "guests"), "\"fvma\"");
    assert_eq!(elements(&s, "macs"), "\"fvma\" . 02:fc:00:00:00:02");
    assert_eq!(elements(&s, "addrs"), "\"fvma\" . 10.88.0.2");
    assert_eq!(elements(&s, "active"), "\"fvma\"");
    assert_eq!(elements(&s, "egress"), "10.88.0.2");
}

#[test]
fn a_fork_before_its_handoff_sends_only_handoff_traffic() {
    let mut g = guest("fvmb", 3, GuestMode::Handoff);
    g.ports = vec![tcp(8080, 80)];
    let r = plan(&settings(), &[g]).unwrap();
    let s = r.script();
    // Filtered on its lease, but not active: ARP and UDP to the gateway only.
    assert_eq!(elements(&s, "guests"), "\"fvmb\"");
    assert_eq!(elements(&s, "macs"), "\"fvmb\" . 02:fc:00:00:00:03");
    assert_eq!(elements(&s, "active"), "");
    // Neither egress nor its ports until the handoff is done.
    assert!(r.egress_addresses().is_empty());
    assert_eq!(elements(&s, "tcp_ports"), "");
}

#[test]
fn egress_follows_the_guest_and_the_daemon() {
    let mut off = guest("fvmc", 4, GuestMode::Active);
    off.egress = false;
    let on = guest("fvmd", 5, GuestMode::Active);
    let r = plan(&settings(), &[off.clone(), on.clone()]).unwrap();
    assert_eq!(r.egress_addresses(), [Ipv4Addr::new(10, 88, 0, 5)]);
    assert!(
        chain(&r.script(), "postrouting").contains(
            &"ip saddr @egress ip daddr != 10.88.0.0/16 oifname != \"forkvm0\" masquerade"
        )
    );
    let daemon_off = FirewallSettings {
        egress: false,
        ..settings()
    };
    let r = plan(&daemon_off, &[off, on]).unwrap();
    assert!(r.egress_addresses().is_empty());
}

#[test]
fn published_ports_become_dnat_on_local_addresses() {
    let mut g = guest("fvme", 6, GuestMode::Active);
    g.ports = vec![
        PortForward {
            protocol: Protocol::Udp,
            host_port: 5353,
            guest_port: 53,
        },
        tcp(8080, 80),
    ];
    let s = plan(&settings(), &[g]).unwrap().script();
    assert_eq!(
        chain(ip_table(&s), "prerouting")[1..],
        [
            "fib daddr type local dnat ip to tcp dport map @tcp_ports",
            "fib daddr type local dnat ip to udp dport map @udp_ports",
        ]
    );
    assert!(chain(&s, "output").contains(
        &"fib daddr type local ip daddr != 127.0.0.0/8 dnat ip to tcp dport map @tcp_ports"
    ));
    assert!(s.contains("elements = { 8080 : 10.88.0.6 . 80 }"), "{s}");
    assert!(s.contains("elements = { 5353 : 10.88.0.6 . 53 }"), "{s}");
    assert!(chain(&s, "forward").contains(&"oifname \"forkvm0\" ct status dnat accept"));
}

#[test]
fn same_inputs_same_text_whatever_the_order() {
    let a = guest("fvmb", 2, GuestMode::Active);
    let b = guest("fvma", 3, GuestMode::Handoff);
    let one = plan(&settings(), &[a.clone(), b.clone()]).unwrap();
    let two = plan(&settings(), &[b, a]).unwrap();
    assert_eq!(one.script(), two.script());
}

#[test]
fn inconsistent_inputs_are_refused() {
    let s = settings();
    let a = guest("fvma", 2, GuestMode::Active);
    let cases: Vec<(Vec<GuestRules>, FirewallError)> = vec![
        (
            vec![a.clone(), guest("fvma", 3, GuestMode::Active)],
            FirewallError::DuplicateTap("fvma".into()),
        ),
        (
            vec![a.clone(), guest("fvmb", 2, GuestMode::Active)],
            FirewallError::DuplicateIp(a.ip),
        ),
        (
            vec![GuestRules {
                ip: Ipv4Addr::new(192, 168, 1, 2),
                ..a.clone()
            }],
            FirewallError::OutsideSubnet {
                ip: Ipv4Addr::new(192, 168, 1, 2),
                subnet: s.subnet,
            },
        ),
        (
            vec![GuestRules {
                tap: "a b\"; flush ruleset".into(),
                ..a.clone()
            }],
            FirewallError::IfName("a b\"; flush ruleset".into()),
        ),
        (
            vec![
                GuestRules {
                    ports: vec![tcp(80, 80)],
                    ..a.clone()
                },
                GuestRules {
                    ports: vec![tcp(80, 81)],
                    ..guest("fvmb", 3, GuestMode::Active)
                },
            ],
            FirewallError::PortTaken(tcp(80, 81)),
        ),
        (
            vec![GuestRules {
                ports: vec![tcp(0, 80)],
                ..a.clone()
            }],
            FirewallError::ZeroPort,
        ),
    ];
    for (guests, want) in cases {
        assert_eq!(plan(&s, &guests).unwrap_err(), want);
    }
    // The same host port over tcp and udp is two ports.
    let both = GuestRules {
        ports: vec![
            tcp(53, 53),
            PortForward {
                protocol: Protocol::Udp,
                host_port: 53,
                guest_port: 53,
            },
        ],
        ..a
    };
    assert!(plan(&s, &[both]).is_ok());
    assert_eq!("udp".parse::<Protocol>(), Ok(Protocol::Udp));
    assert!("sctp".parse::<Protocol>().is_err());
}

#[test]
fn changes_after_the_first_are_element_only() {
    let other = guest("fvma", 2, GuestMode::Active);
    let mut fork = guest("fvmb", 3, GuestMode::Handoff);
    fork.ports = vec![tcp(8081, 80)];
    let none = plan(&settings(), std::slice::from_ref(&other)).unwrap();
    let pending = plan(&settings(), &[other.clone(), fork.clone()]).unwrap();
    assert_eq!(
        pending.delta_from(&none).unwrap(),
        "add element bridge forkvm guests { \"fvmb\" }\n\
         add element bridge forkvm macs { \"fvmb\" . 02:fc:00:00:00:03 }\n\
         add element bridge forkvm addrs { \"fvmb\" . 10.88.0.3 }\n"
    );
    let done = GuestRules {
        mode: GuestMode::Active,
        ..fork.clone()
    };
    let active = plan(&settings(), &[other.clone(), done.clone()]).unwrap();
    assert_eq!(
        active.delta_from(&pending).unwrap(),
        "add element bridge forkvm active { \"fvmb\" }\n\
         add element ip forkvm egress { 10.88.0.3 }\n\
         add element ip forkvm tcp_ports { 8081 : 10.88.0.3 . 80 }\n"
    );
    assert_eq!(active.delta_from(&active).unwrap(), "", "nothing changed");
    let gone = none.delta_from(&active).unwrap();
    assert!(
        gone.contains("delete element bridge forkvm guests { \"fvmb\" }"),
        "{gone}"
    );
    assert!(
        gone.contains("delete element ip forkvm tcp_ports { 8081 }"),
        "{gone}"
    );
    assert!(!gone.contains("chain") && !gone.contains("table"), "{gone}");
    // Other settings: a full rebuild.
    let other_settings = FirewallSettings {
        egress: false,
        ..settings()
    };
    let off = plan(&other_settings, &[other, done]).unwrap();
    assert!(off.delta_from(&active).is_none());
}
