//! The Ethernet MAC address type of the whole workspace.
//!
//! It lives in the contract crate because both sides need it with the same
//! rules: the host allocates and pins guest MACs and writes them into the
//! mailbox; the guest agent parses, checks and applies them. One parser means
//! a MAC the host accepts is a MAC the guest accepts.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet MAC address.
///
/// Text form: exactly six colon-separated hex pairs, `02:fc:00:0a:bc:ff`;
/// either case is accepted on input, output is always lowercase. Other
/// separators (`-`, `.`) and other lengths are refused. Serialises as that
/// string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// True when the group bit (bit 0 of the first octet) is clear, so the
    /// address is neither multicast nor broadcast.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0
    }

    /// All six octets zero (what a link without an address reports).
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// The locally-administered bit (bit 1 of the first octet) is set, so the
    /// address cannot collide with a vendor (OUI) address.
    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// Usable as a guest interface's own address: unicast and not all zero.
    /// A multicast source address is invalid on Ethernet, and the kernel
    /// refuses an all-zero one.
    pub fn is_usable_interface_address(&self) -> bool {
        self.is_unicast() && !self.is_zero()
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> Self {
        MacAddr(octets)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

/// Error parsing a [`MacAddr`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MAC address must be six colon-separated hex pairs")]
pub struct MacParseError;

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // "aa:bb:cc:dd:ee:ff" is exactly 17 bytes; checking the length first
        // makes every index below in bounds.
        let b = s.as_bytes();
        if b.len() != 17 {
            return Err(MacParseError);
        }
        let mut out = [0u8; 6];
        for (i, byte) in out.iter_mut().enumerate() {
            let at = i * 3;
            if i > 0 && b[at - 1] != b':' {
                return Err(MacParseError);
            }
            let hi = hex_val(b[at]).ok_or(MacParseError)?;
            let lo = hex_val(b[at + 1]).ok_or(MacParseError)?;
            *byte = (hi << 4) | lo;
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor rather than `<&str>::deserialize`: it takes borrowed and
        // owned strings alike (a reader or a `serde_json::Value` only has
        // owned ones) without allocating for the borrowed case.
        struct MacVisitor;
        impl Visitor<'_> for MacVisitor {
            type Value = MacAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a MAC address like \"02:00:00:00:00:01\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MacAddr, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(MacVisitor)
    }
}

/// One hex digit's value, either case.
pub(crate) fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_case_in_lowercase_out() {
        let m = MacAddr([0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0x0f]);
        assert_eq!("AA:bb:0c:dd:ee:0f".parse::<MacAddr>(), Ok(m));
        assert_eq!("AA:BB:0C:DD:EE:0F".parse::<MacAddr>(), Ok(m));
        assert_eq!(m.to_string(), "aa:bb:0c:dd:ee:0f");
        assert_eq!(format!("{m:?}"), "MacAddr(aa:bb:0c:dd:ee:0f)");
        assert_eq!(m.to_string().parse::<MacAddr>(), Ok(m));
    }

    #[test]
    fn other_separators_are_refused() {
        for bad in [
            "aa-bb-cc-dd-ee-ff",
            "aa:bb:cc:dd:ee-ff",
            "aa.bb.cc.dd.ee.ff",
            "aabb.ccdd.eeff",
            "aa bb cc dd ee ff",
            "aabbccddeeff",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(MacParseError), "{bad}");
        }
    }

    #[test]
    fn wrong_lengths_and_digits_are_refused() {
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:",
            "aa:bb:cc:dd:ee:ff:",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:f",
            "aa:bb:cc:dd:ee:fff",
            "a:bb:cc:dd:ee:fff",
            "aa:bb:cc:dd:ee:fg",
            // `u8::from_str_radix` would take a sign; the parser must not.
            "+a:bb:cc:dd:ee:ff",
            " aa:bb:cc:dd:ee:f",
            "ää:bb:cc:dd:ee",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(MacParseError), "{bad:?}");
        }
    }

    #[test]
    fn predicates() {
        let guest = MacAddr([0x02, 0xfc, 0, 0, 0, 1]);
        assert!(guest.is_unicast() && !guest.is_zero() && guest.is_locally_administered());
        assert!(guest.is_usable_interface_address());

        let vendor = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert!(!MacAddr([0x00, 0x16, 0x3e, 0, 0, 1]).is_locally_administered());
        assert!(vendor.is_usable_interface_address());

        let zero = MacAddr([0; 6]);
        assert!(zero.is_zero() && zero.is_unicast());
        assert!(!zero.is_usable_interface_address());

        for multicast in [
            MacAddr([0x01, 0x00, 0x5e, 0, 0, 1]),
            MacAddr([0x33, 0x33, 0, 0, 0, 1]),
            MacAddr([0x03, 0, 0, 0, 0, 1]),
            MacAddr([0xff; 6]),
        ] {
            assert!(!multicast.is_unicast(), "{multicast}");
            assert!(!multicast.is_usable_interface_address(), "{multicast}");
        }
    }

    #[test]
    fn octets_and_ordering() {
        let a = MacAddr::from([0x02, 0, 0, 0, 0, 1]);
        let b = MacAddr([0x02, 0, 0, 0, 1, 0]);
        assert_eq!(a.octets(), [0x02, 0, 0, 0, 0, 1]);
        assert!(a < b);
        let set: std::collections::BTreeSet<MacAddr> = [b, a, b].into_iter().collect();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![a, b]);
    }

    #[test]
    fn serde_is_the_text_form() {
        let m = MacAddr([0x02, 0xfc, 1, 2, 3, 0xab]);
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"02:fc:01:02:03:ab\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), m);
        assert_eq!(
            serde_json::from_str::<MacAddr>("\"02:FC:01:02:03:AB\"").unwrap(),
            m
        );
        // Owned strings too (readers and `Value`s never lend their text).
        assert_eq!(
            serde_json::from_reader::<_, MacAddr>(j.as_bytes()).unwrap(),
            m
        );
        let v = serde_json::Value::String(j.trim_matches('"').to_owned());
        assert_eq!(serde_json::from_value::<MacAddr>(v).unwrap(), m);
        for bad in ["\"nope\"", "\"02-fc-01-02-03-ab\"", "7", "null"] {
            assert!(serde_json::from_str::<MacAddr>(bad).is_err(), "{bad}");
        }
    }
}
