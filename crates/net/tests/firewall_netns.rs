//! The firewall on a real bridge in a private namespace: applying the
//! planned ruleset is idempotent, and frames a guest forges (another
//! MAC, another address, ARP for another instance) are dropped before
//! the host sees them, with the drop counted and the host's pinned
//! neighbour entries unchanged.

mod common;

use common::*;
use forkvm_net::firewall::{self, FirewallSettings, GuestMode, GuestRules};
use forkvm_net::{BridgeConfig, HostNet, MacAddr, open_tap};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packets counted by the rule of `chain` whose text starts with `rule`.
fn dropped(chain: &str, rule: &str) -> u64 {
    let listing = run(&["nft", "list", "chain", "bridge", "forkvm", chain]);
    let line = listing
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(rule))
        .unwrap_or_else(|| panic!("no rule {rule:?} in {listing}"));
    let n = line.split("counter packets ").nth(1).unwrap();
    n.split(' ').next().unwrap().parse().unwrap()
}

fn guest(tap: &str, mac: MacAddr, ip: Ipv4Addr, mode: GuestMode) -> GuestRules {
    GuestRules {
        tap: tap.into(),
        mac,
        ip,
        mode,
        egress: true,
        ports: vec![],
    }
}

fn is_arp_reply_to(f: &[u8], mac: MacAddr) -> bool {
    f.len() >= 42 && f[0..6] == mac.0 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
}

#[test]
fn forged_frames_are_dropped_and_rules_apply_idempotently() {
    in_new_netns(|| async {
        let net = HostNet::new().await.unwrap();
        let cfg = BridgeConfig::default();
        net.ensure_bridge(&cfg).await.unwrap();
        let (mac_a, ip_a): (MacAddr, _) = (
            "02:fc:00:00:00:02".parse().unwrap(),
            Ipv4Addr::new(10, 88, 0, 2),
        );
        let (mac_b, ip_b): (MacAddr, _) = (
            "02:fc:00:00:00:03".parse().unwrap(),
            Ipv4Addr::new(10, 88, 0, 3),
        );
        for t in ["fvma", "fvmb"] {
            net.create_tap(t, "forkvm0").await.unwrap();
        }
        let settings = FirewallSettings {
            bridge: "forkvm0".into(),
            subnet: cfg.subnet,
            gateway: cfg.gateway,
            egress: true,
        };
        let guests = [
            guest("fvma", mac_a, ip_a, GuestMode::Active),
            guest("fvmb", mac_b, ip_b, GuestMode::Active),
        ];
        let rules = firewall::plan(&settings, &guests).unwrap();
        for _ in 0..2 {
            firewall::apply(&rules).await.unwrap();
        }
        let tables = run(&["nft", "list", "tables"]);
        assert_eq!(
            tables, "table bridge forkvm\ntable ip forkvm\n",
            "applied twice: {tables}"
        );
        net.sync_neighbours("forkvm0", &[(ip_a, mac_a), (ip_b, mac_b)])
            .await
            .unwrap();
        let neigh_before = run(&["ip", "neigh", "show", "dev", "forkvm0"]);
        assert!(
            neigh_before.contains(&format!("{ip_b} lladdr {mac_b} PERMANENT")),
            "{neigh_before}"
        );

        let mut a = open_tap("fvma", false).unwrap();
        set_nonblocking(&a);
        wait_forwarding(&net, "forkvm0", &["fvma"]).await;
        let gw = cfg.gateway;
        let dl = || Instant::now() + Duration::from_secs(3);
        // What must not come: the drop counters are the proof, this only
        // shows nothing answered meanwhile.
        let short = || Instant::now() + Duration::from_millis(500);

        // Its own identity: the gateway answers.
        a.write_all(&arp_request(mac_a, ip_a, gw)).unwrap();
        assert!(
            wait_frame(&mut a, dl(), |f| is_arp_reply_to(f, mac_a)).is_some(),
            "own ARP unanswered"
        );

        // ARP claiming b's address from a's MAC: dropped, counted, and the
        // host's entry for b is still b's.
        let bmac = forkvm_net::bridge_mac_for(gw);
        a.write_all(&arp_reply(mac_a, ip_b, bmac, gw)).unwrap();
        a.write_all(&arp_request(mac_a, ip_b, gw)).unwrap();
        assert!(
            wait_frame(&mut a, dl(), |f| is_arp_reply_to(f, mac_a)).is_none(),
            "forged ARP answered"
        );
        assert_eq!(dropped("guest", "iifname . arp saddr ip != @addrs"), 2);
        // A forged MAC (b's): dropped before anything else.
        let forged_mac: MacAddr = "02:fc:00:00:00:99".parse().unwrap();
        a.write_all(&arp_request(forged_mac, ip_a, gw)).unwrap();
        a.write_all(&arp_request(mac_b, ip_b, gw)).unwrap();
        assert!(
            wait_frame(&mut a, short(), |f| f[0..6] == forged_mac.0
                || f[0..6] == mac_b.0)
            .is_none()
        );
        assert_eq!(dropped("guest", "iifname . ether saddr != @macs"), 2);
        assert_eq!(
            run(&["ip", "neigh", "show", "dev", "forkvm0"]),
            neigh_before,
            "neighbours changed"
        );

        // Before its handoff a guest may ARP for itself but send no IP
        // but UDP to the gateway.
        let pending = [
            guest("fvma", mac_a, ip_a, GuestMode::Handoff),
            guests[1].clone(),
        ];
        let pending = firewall::plan(&settings, &pending).unwrap();
        firewall::apply(&pending).await.unwrap();
        a.write_all(&arp_request(mac_a, ip_a, gw)).unwrap();
        assert!(
            wait_frame(&mut a, dl(), |f| is_arp_reply_to(f, mac_a)).is_some(),
            "handoff ARP unanswered"
        );
        a.write_all(&icmp_echo(mac_a, bmac, ip_a, gw)).unwrap();
        assert!(
            wait_frame(&mut a, short(), |f| f.len() > 34 && f[23] == 1).is_none(),
            "ping answered before handoff"
        );
        assert_eq!(dropped("guest", "counter packets"), 1);
        // The handoff completes: an element-only change back to `rules`.
        let delta = rules.delta_from(&pending).unwrap();
        firewall::apply_script(&delta).await.unwrap();
        let active = run(&["nft", "list", "set", "bridge", "forkvm", "active"]);
        assert!(active.contains("\"fvma\""), "{active}");
        let egress = run(&["nft", "list", "set", "ip", "forkvm", "egress"]);
        assert!(
            egress.contains("10.88.0.2") && egress.contains("10.88.0.3"),
            "{egress}"
        );

        // Stale entries go with the next sync.
        net.sync_neighbours("forkvm0", &[(ip_a, mac_a)])
            .await
            .unwrap();
        let neigh = run(&["ip", "neigh", "show", "dev", "forkvm0"]);
        assert!(!neigh.contains(&ip_b.to_string()), "{neigh}");
        firewall::remove_tables().await.unwrap();
        firewall::remove_tables().await.unwrap();
        assert_eq!(run(&["nft", "list", "tables"]), "");
    });
}

/// An ICMP echo request (checksums left zero: the bridge filter looks at
/// headers only, and nothing may answer it).
fn icmp_echo(src: MacAddr, dst: MacAddr, sip: Ipv4Addr, dip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 1, 0, 0]);
    f.extend_from_slice(&sip.octets());
    f.extend_from_slice(&dip.octets());
    f.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    f.resize(60, 0);
    f
}
