//! MAC addresses for guests and the bridge.
//!
//! The address type itself is [`forkvm_mailbox::MacAddr`], shared with the
//! guest agent so host and guest parse MACs by the same rules; this module
//! only knows which MACs forkvm hands out.

use rand::RngCore;

pub use forkvm_mailbox::MacAddr;

/// Prefix of every guest MAC forkvm generates: `02:fc`.
///
/// `0x02` sets the locally-administered bit and clears the multicast bit, so
/// the addresses never collide with vendor (OUI) addresses; `0xfc` marks them
/// as forkvm's so they are easy to spot in `bridge fdb` output.
pub const GUEST_MAC_PREFIX: [u8; 2] = [0x02, 0xfc];

/// Prefix of the bridge's own MAC: `02:fd`, followed by the gateway IPv4
/// address. Distinct from [`GUEST_MAC_PREFIX`] so a guest can never draw it.
pub const BRIDGE_MAC_PREFIX: [u8; 2] = [0x02, 0xfd];

/// A random guest MAC: `02:fc:xx:xx:xx:xx` with 32 random bits.
///
/// Uniqueness across live instances is enforced by the state store, not here:
/// with 2^32 values a collision is unlikely but possible.
pub fn random_mac() -> MacAddr {
    let mut tail = [0u8; 4];
    rand::rng().fill_bytes(&mut tail);
    MacAddr([
        GUEST_MAC_PREFIX[0],
        GUEST_MAC_PREFIX[1],
        tail[0],
        tail[1],
        tail[2],
        tail[3],
    ])
}

/// The bridge's fixed MAC for a gateway address: `02:fd:` + the four octets.
///
/// A bridge without an explicitly set MAC takes the lowest MAC of its ports,
/// so it would change whenever a TAP comes or goes and every guest's ARP entry
/// for the gateway (also those frozen in snapshots) would go stale.
pub fn bridge_mac_for(gateway: std::net::Ipv4Addr) -> MacAddr {
    let o = gateway.octets();
    MacAddr([
        BRIDGE_MAC_PREFIX[0],
        BRIDGE_MAC_PREFIX[1],
        o[0],
        o[1],
        o[2],
        o[3],
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_mac_is_local_unicast_with_prefix() {
        for _ in 0..1000 {
            let m = random_mac();
            assert!(m.is_locally_administered(), "{m}");
            assert!(m.is_unicast(), "{m}");
            assert_eq!(&m.0[..2], &GUEST_MAC_PREFIX);
        }
    }

    #[test]
    fn random_macs_differ() {
        let a: std::collections::HashSet<MacAddr> = (0..256).map(|_| random_mac()).collect();
        // 256 draws from 2^32: a repeat would mean the tail isn't random.
        assert_eq!(a.len(), 256);
    }

    #[test]
    fn parse_format_round_trip() {
        let m = MacAddr([0x02, 0xfc, 0x00, 0x0a, 0xbc, 0xff]);
        assert_eq!(m.to_string(), "02:fc:00:0a:bc:ff");
        assert_eq!("02:fc:00:0a:bc:ff".parse::<MacAddr>().unwrap(), m);
        assert_eq!("02:FC:00:0A:BC:FF".parse::<MacAddr>().unwrap(), m);
        // One rule set with the guest: `-` is not a separator.
        assert!("02-FC-00-0A-BC-FF".parse::<MacAddr>().is_err());
        for _ in 0..100 {
            let r = random_mac();
            assert_eq!(r.to_string().parse::<MacAddr>().unwrap(), r);
        }
    }

    #[test]
    fn parse_rejects_garbage() {
        for s in [
            "",
            "02:fc:00:0a:bc",
            "02:fc:00:0a:bc:ff:00",
            "02:fc:00:0a:bc:f",
            "02:fc:00:0a:bc:fff",
            "02:fc:00:0a:bc:zz",
            "02fc000abcff",
            "+2:fc:00:0a:bc:ff",
        ] {
            assert!(s.parse::<MacAddr>().is_err(), "{s:?} parsed");
        }
    }

    #[test]
    fn serde_as_string() {
        let m = MacAddr([0x02, 0xfc, 1, 2, 3, 4]);
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"02:fc:01:02:03:04\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), m);
        assert!(serde_json::from_str::<MacAddr>("\"nope\"").is_err());
    }

    #[test]
    fn bridge_mac_is_stable_and_outside_guest_range() {
        let g = std::net::Ipv4Addr::new(10, 88, 0, 1);
        let m = bridge_mac_for(g);
        assert_eq!(m.to_string(), "02:fd:0a:58:00:01");
        assert!(m.is_locally_administered() && m.is_unicast());
        assert_ne!(&m.0[..2], &GUEST_MAC_PREFIX);
    }
}
