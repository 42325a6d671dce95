//! The fork identity carried in the mailbox: JSON encoding and validation.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::FieldError;
use crate::mac::{MacAddr, hex_val};

/// Longest Linux interface name (IFNAMSIZ − 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// Most name servers glibc/musl resolvers use (MAXNS).
pub const MAX_DNS_SERVERS: usize = 3;
/// Longest hostname the kernel accepts (HOST_NAME_MAX).
pub const MAX_HOSTNAME_LEN: usize = 64;

// Hand-rolled 32-byte hex codec: two tiny functions instead of another
// dependency (the crate's allowed dependency list is fixed).
fn hex32_encode(bytes: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn hex32_decode(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (hex_val(b[2 * i])? << 4) | hex_val(b[2 * i + 1])?;
    }
    Some(out)
}

macro_rules! secret32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// JSON form: 64 hex digits. `Debug` does not print the bytes.
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            pub fn is_zero(&self) -> bool {
                self.0 == [0; 32]
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Secrets must not leak through logs.
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&hex32_encode(&self.0))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <&str>::deserialize(d)?;
                hex32_decode(s)
                    .map($name)
                    .ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
            }
        }
    };
}

secret32!(
    /// 32 bytes of host-generated randomness the guest mixes into its kernel
    /// RNG (RNDADDENTROPY) so a fork never shares RNG state with its siblings.
    Seed
);
secret32!(
    /// Per-fork HMAC-SHA256 key used to authenticate the ack datagram.
    AckKey
);

/// Where and how the guest acknowledges the new identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckTarget {
    /// Host address to send the ack to (normally the gateway); must be on-link.
    pub ip: Ipv4Addr,
    /// Host UDP port listening for acks; non-zero.
    pub port: u16,
    /// HMAC key for the ack; non-zero.
    pub key: AckKey,
}

/// The new identity of a fork, written by the host, applied by the guest.
///
/// Encoded as a JSON object with exactly these fields (unknown or duplicate
/// fields are rejected); see `docs/mailbox.md` for an example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Guest interface to re-address, e.g. `eth0`.
    pub interface: String,
    pub mac: MacAddr,
    pub ipv4: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// At most [`MAX_DNS_SERVERS`], no duplicates; may be empty.
    pub dns: Vec<Ipv4Addr>,
    pub hostname: String,
    /// Host wall-clock time (unix epoch, ns) when the payload was built.
    /// Without [`Payload::clock_behind_ns`] the guest steps its clock to it.
    pub host_time_unix_ns: u64,
    /// How far the guest's clock is behind `host_time_unix_ns`: the host
    /// time that passed since the guest's clock stopped (its snapshot was
    /// captured). The guest steps its clock forward by this much, keeping
    /// the time it has run since resume, so the step is as exact as the
    /// source's clock was. At most `host_time_unix_ns`. Absent (older
    /// hosts): the guest sets `host_time_unix_ns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_behind_ns: Option<u64>,
    pub rng_seed: Seed,
    pub ack: AckTarget,
}

fn prefix_mask(prefix_len: u8) -> u32 {
    // prefix_len is validated to 1..=32 before this is called.
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

/// Rejects addresses no host interface may use, whatever the prefix.
fn check_host_addr(field: &'static str, addr: Ipv4Addr) -> Result<(), FieldError> {
    if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || addr.is_broadcast() {
        return Err(FieldError::AddressUnusable { field, addr });
    }
    Ok(())
}

/// Rejects the network and broadcast addresses of the interface's subnet
/// (/31 and /32 have neither, RFC 3021).
fn check_in_subnet_host(
    field: &'static str,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), FieldError> {
    if prefix_len <= 30 {
        let mask = prefix_mask(prefix_len);
        let a = u32::from(addr);
        if a & !mask == 0 {
            return Err(FieldError::AddressIsNetwork { field, addr });
        }
        if a & !mask == !mask {
            return Err(FieldError::AddressIsBroadcast { field, addr });
        }
    }
    Ok(())
}

fn check_interface(name: &str) -> Result<(), FieldError> {
    if name.is_empty() {
        return Err(FieldError::InterfaceEmpty);
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(FieldError::InterfaceTooLong { len: name.len() });
    }
    // Stricter than the kernel's dev_valid_name: printable ASCII only.
    let bad_char = name
        .bytes()
        .any(|c| !c.is_ascii_graphic() || c == b'/' || c == b':');
    if bad_char || name == "." || name == ".." {
        return Err(FieldError::InterfaceInvalid);
    }
    Ok(())
}

fn check_hostname(name: &str) -> Result<(), FieldError> {
    if name.is_empty() {
        return Err(FieldError::HostnameInvalid("empty"));
    }
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(FieldError::HostnameInvalid("longer than 64 bytes"));
    }
    // RFC 1123 labels: letters, digits, '-', not at either end, 1..=63 bytes.
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(FieldError::HostnameInvalid("label empty or longer than 63"));
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
        {
            return Err(FieldError::HostnameInvalid(
                "character outside [A-Za-z0-9-.]",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(FieldError::HostnameInvalid("label starts or ends with '-'"));
        }
    }
    Ok(())
}

impl Payload {
    /// Checks every field; the guest must not apply a payload that fails.
    /// The host runs the same check before patching.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_interface(&self.interface)?;

        if self.mac.is_zero() {
            return Err(FieldError::MacZero);
        }
        if !self.mac.is_unicast() {
            return Err(FieldError::MacNotUnicast);
        }

        if self.prefix_len == 0 || self.prefix_len > 32 {
            return Err(FieldError::PrefixOutOfRange(self.prefix_len));
        }
        let mask = prefix_mask(self.prefix_len);
        let net = u32::from(self.ipv4) & mask;
        let in_prefix = |a: Ipv4Addr| u32::from(a) & mask == net;

        check_host_addr("ipv4", self.ipv4)?;
        check_in_subnet_host("ipv4", self.ipv4, self.prefix_len)?;

        check_host_addr("gateway", self.gateway)?;
        if self.gateway == self.ipv4 {
            return Err(FieldError::SameAsSelf { field: "gateway" });
        }
        if !in_prefix(self.gateway) {
            return Err(FieldError::NotInPrefix {
                field: "gateway",
                addr: self.gateway,
            });
        }
        check_in_subnet_host("gateway", self.gateway, self.prefix_len)?;

        if self.dns.len() > MAX_DNS_SERVERS {
            return Err(FieldError::TooManyDns {
                count: self.dns.len(),
                max: MAX_DNS_SERVERS,
            });
        }
        for (i, d) in self.dns.iter().enumerate() {
            check_host_addr("dns", *d)?;
            if self.dns[..i].contains(d) {
                return Err(FieldError::DuplicateDns(*d));
            }
        }

        check_hostname(&self.hostname)?;

        if self.host_time_unix_ns == 0 {
            return Err(FieldError::HostTimeZero);
        }
        if self
            .clock_behind_ns
            .is_some_and(|b| b > self.host_time_unix_ns)
        {
            return Err(FieldError::ClockBehindBeforeEpoch);
        }
        if self.rng_seed.is_zero() {
            return Err(FieldError::SeedZero);
        }

        // The ack must be deliverable on-link over the new address, without
        // depending on routes beyond the one the guest just installed.
        check_host_addr("ack.ip", self.ack.ip)?;
        if self.ack.ip == self.ipv4 {
            return Err(FieldError::SameAsSelf { field: "ack.ip" });
        }
        if !in_prefix(self.ack.ip) {
            return Err(FieldError::NotInPrefix {
                field: "ack.ip",
                addr: self.ack.ip,
            });
        }
        check_in_subnet_host("ack.ip", self.ack.ip, self.prefix_len)?;
        if self.ack.port == 0 {
            return Err(FieldError::AckPortZero);
        }
        if self.ack.key.is_zero() {
            return Err(FieldError::AckKeyZero);
        }
        Ok(())
    }

    /// Canonical JSON bytes as written into the page.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Strict JSON parse (no validation; see [`Payload::validate`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Payload {
        Payload {
            interface: "eth0".into(),
            mac: MacAddr([0x02, 0, 0, 0, 0, 1]),
            ipv4: Ipv4Addr::new(10, 0, 0, 2),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            dns: vec![Ipv4Addr::new(10, 0, 0, 1)],
            hostname: "fork-1".into(),
            host_time_unix_ns: 1_700_000_000_000_000_000,
            clock_behind_ns: Some(250_000_000),
            rng_seed: Seed([7; 32]),
            ack: AckTarget {
                ip: Ipv4Addr::new(10, 0, 0, 1),
                port: 7777,
                key: AckKey([9; 32]),
            },
        }
    }

    fn err(f: impl FnOnce(&mut Payload)) -> FieldError {
        let mut p = ok();
        f(&mut p);
        match p.validate() {
            Err(e) => e,
            Ok(()) => panic!("payload unexpectedly valid: {p:?}"),
        }
    }

    #[test]
    fn baseline_is_valid() {
        assert_eq!(ok().validate(), Ok(()));
    }

    #[test]
    fn interface_errors() {
        assert_eq!(err(|p| p.interface.clear()), FieldError::InterfaceEmpty);
        assert_eq!(
            err(|p| p.interface = "a".repeat(16)),
            FieldError::InterfaceTooLong { len: 16 }
        );
        assert_eq!(
            err(|p| p.interface = "eth 0".into()),
            FieldError::InterfaceInvalid
        );
        assert_eq!(
            err(|p| p.interface = "a/b".into()),
            FieldError::InterfaceInvalid
        );
        assert_eq!(
            err(|p| p.interface = "..".into()),
            FieldError::InterfaceInvalid
        );
        let mut p = ok();
        p.interface = "a".repeat(15);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn mac_errors() {
        assert_eq!(err(|p| p.mac = MacAddr([0; 6])), FieldError::MacZero);
        assert_eq!(
            err(|p| p.mac = MacAddr([0xff; 6])),
            FieldError::MacNotUnicast
        );
        assert_eq!(
            err(|p| p.mac = MacAddr([0x01, 0, 0x5e, 0, 0, 1])),
            FieldError::MacNotUnicast
        );
    }

    #[test]
    fn prefix_and_address_errors() {
        assert_eq!(err(|p| p.prefix_len = 33), FieldError::PrefixOutOfRange(33));
        assert_eq!(err(|p| p.prefix_len = 0), FieldError::PrefixOutOfRange(0));
        assert!(matches!(
            err(|p| p.ipv4 = Ipv4Addr::new(10, 0, 0, 0)),
            FieldError::AddressIsNetwork { field: "ipv4", .. }
        ));
        assert!(matches!(
            err(|p| p.ipv4 = Ipv4Addr::new(10, 0, 0, 255)),
            FieldError::AddressIsBroadcast { field: "ipv4", .. }
        ));
        assert!(matches!(
            err(|p| p.ipv4 = Ipv4Addr::new(224, 0, 0, 5)),
            FieldError::AddressUnusable { field: "ipv4", .. }
        ));
        assert!(matches!(
            err(|p| p.gateway = Ipv4Addr::new(10, 0, 1, 1)),
            FieldError::NotInPrefix {
                field: "gateway",
                ..
            }
        ));
        assert_eq!(
            err(|p| p.gateway = p.ipv4),
            FieldError::SameAsSelf { field: "gateway" }
        );
        // /32 leaves no room for an on-link gateway.
        assert!(matches!(
            err(|p| p.prefix_len = 32),
            FieldError::NotInPrefix {
                field: "gateway",
                ..
            }
        ));
        // /31 (RFC 3021): both addresses are hosts.
        let mut p = ok();
        p.prefix_len = 31;
        p.ipv4 = Ipv4Addr::new(10, 0, 0, 0);
        p.gateway = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn dns_errors() {
        assert_eq!(
            err(|p| p.dns = vec![Ipv4Addr::new(1, 1, 1, 1); 4]),
            FieldError::TooManyDns { count: 4, max: 3 }
        );
        assert_eq!(
            err(|p| p.dns = vec![Ipv4Addr::new(1, 1, 1, 1); 2]),
            FieldError::DuplicateDns(Ipv4Addr::new(1, 1, 1, 1))
        );
        assert!(matches!(
            err(|p| p.dns = vec![Ipv4Addr::BROADCAST]),
            FieldError::AddressUnusable { field: "dns", .. }
        ));
    }

    #[test]
    fn hostname_errors() {
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "ä",
            &"a".repeat(65),
            &"b".repeat(64),
        ] {
            let bad = bad.to_string();
            assert!(
                matches!(
                    err(|p| p.hostname = bad.clone()),
                    FieldError::HostnameInvalid(_)
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn misc_errors() {
        assert_eq!(err(|p| p.host_time_unix_ns = 0), FieldError::HostTimeZero);
        assert_eq!(
            err(|p| p.clock_behind_ns = Some(p.host_time_unix_ns + 1)),
            FieldError::ClockBehindBeforeEpoch
        );
        assert_eq!(err(|p| p.rng_seed = Seed([0; 32])), FieldError::SeedZero);
        assert_eq!(err(|p| p.ack.port = 0), FieldError::AckPortZero);
        assert_eq!(err(|p| p.ack.key = AckKey([0; 32])), FieldError::AckKeyZero);
        assert!(matches!(
            err(|p| p.ack.ip = Ipv4Addr::new(192, 168, 1, 1)),
            FieldError::NotInPrefix {
                field: "ack.ip",
                ..
            }
        ));
    }

    #[test]
    fn json_is_strict() {
        let j = String::from_utf8(ok().to_json().unwrap()).unwrap();
        assert!(j.contains("\"mac\":\"02:00:00:00:00:01\""), "{j}");
        assert_eq!(Payload::from_json(j.as_bytes()).unwrap(), ok());
        // unknown field
        let extra = j.replacen('{', "{\"x\":1,", 1);
        assert!(Payload::from_json(extra.as_bytes()).is_err());
        // duplicate field
        let dup = j.replacen('{', "{\"hostname\":\"a\",", 1);
        assert!(Payload::from_json(dup.as_bytes()).is_err());
        // malformed MAC / seed
        let bad_mac = j.replace("02:00:00:00:00:01", "02-00-00-00-00-01");
        assert!(Payload::from_json(bad_mac.as_bytes()).is_err());
        let bad_seed = j.replace(&"07".repeat(32), &"07".repeat(31));
        assert!(Payload::from_json(bad_seed.as_bytes()).is_err());
    }

    #[test]
    fn secrets_not_in_debug() {
        let s = format!("{:?}", ok());
        assert!(!s.contains("0707") && !s.contains("[7, 7"), "{s}");
        assert!(s.contains("AckKey(<redacted>)"));
    }
}
