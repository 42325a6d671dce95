//! Validate: the agent's rules for a network identity, with two entries.
//!
//! * [`NetRequest::validate`] for text input (boot config, the
//!   ReconfigureNetwork RPC): parses each field, then checks it.
//! * [`NetDesired::from_payload`] for the mailbox payload, which the mailbox
//!   decoder already parsed and validated: no text round trip on the fork's
//!   hot path, but the same per-field rules, so nothing the agent refuses
//!   elsewhere gets through because the mailbox's own rules drift.
//!
//! Both produce a [`NetDesired`], the only input the planner takes.

use std::net::{IpAddr, Ipv4Addr};

use forkvm_mailbox::{MacAddr, Payload};

/// Unvalidated network identity, as it arrives from the boot config or an RPC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetRequest {
    pub interface: String,
    /// Empty = keep the device's current MAC.
    pub mac: String,
    pub ipv4: String,
    pub prefix_len: u32,
    /// Empty = no default route.
    pub gateway: String,
    pub dns: Vec<String>,
    /// Empty = keep the hostname.
    pub hostname: String,
}

/// A validated network identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetDesired {
    pub interface: String,
    pub mac: Option<MacAddr>,
    pub ipv4: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<IpAddr>,
    pub hostname: Option<String>,
}

/// Invalid input; maps to gRPC `InvalidArgument`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("interface name {0:?} is invalid")]
    Interface(String),
    #[error("MAC address {0:?} is invalid (want aa:bb:cc:dd:ee:ff, unicast)")]
    Mac(String),
    #[error("IPv4 address {0:?} is invalid")]
    Ipv4(String),
    #[error("prefix length {0} is out of range 0..=32")]
    PrefixLen(u32),
    #[error("gateway {0:?} is invalid")]
    Gateway(String),
    #[error("DNS server {0:?} is invalid")]
    Dns(String),
    #[error("hostname {0:?} is invalid")]
    Hostname(String),
}

// The per-field rules. Both entries call them in the same order (interface,
// MAC, IPv4, prefix, gateway, DNS, hostname), so a request with several bad
// fields reports the same first error whichever way it came in.

/// IFNAMSIZ is 16 including the NUL.
fn valid_interface(name: &str) -> bool {
    !name.is_empty() && name.len() <= 15 && !name.contains(['/', ' ', '\0'])
}

fn usable_ipv4(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast())
}

const MAX_PREFIX_LEN: u32 = 32;

/// Empty = keep the hostname (`None`).
fn checked_hostname(h: &str) -> Result<Option<String>, NetConfigError> {
    if h.is_empty() {
        Ok(None)
    } else if valid_hostname(h) {
        Ok(Some(h.to_owned()))
    } else {
        Err(NetConfigError::Hostname(h.to_owned()))
    }
}

/// RFC 1123 hostname, at most 64 bytes (the kernel's limit).
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl NetRequest {
    /// Checks and parses every field; nothing is applied.
    pub fn validate(&self) -> Result<NetDesired, NetConfigError> {
        if !valid_interface(&self.interface) {
            return Err(NetConfigError::Interface(self.interface.clone()));
        }
        let mac = if self.mac.is_empty() {
            None
        } else {
            let mac = self
                .mac
                .parse::<MacAddr>()
                .ok()
                .filter(MacAddr::is_usable_interface_address);
            Some(mac.ok_or_else(|| NetConfigError::Mac(self.mac.clone()))?)
        };
        let ipv4 = self
            .ipv4
            .parse::<Ipv4Addr>()
            .ok()
            .filter(|ip| usable_ipv4(*ip))
            .ok_or_else(|| NetConfigError::Ipv4(self.ipv4.clone()))?;
        let prefix_len = u8::try_from(self.prefix_len)
            .ok()
            .filter(|p| u32::from(*p) <= MAX_PREFIX_LEN)
            .ok_or(NetConfigError::PrefixLen(self.prefix_len))?;
        let gateway = if self.gateway.is_empty() {
            None
        } else {
            Some(
                self.gateway
                    .parse::<Ipv4Addr>()
                    .map_err(|_| NetConfigError::Gateway(self.gateway.clone()))?,
            )
        };
        let dns = self
            .dns
            .iter()
            .map(|d| {
                d.parse::<IpAddr>()
                    .map_err(|_| NetConfigError::Dns(d.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NetDesired {
            interface: self.interface.clone(),
            mac,
            ipv4,
            prefix_len,
            gateway,
            dns,
            hostname: checked_hostname(&self.hostname)?,
        })
    }
}

impl NetDesired {
    /// The typed entry: a mailbox payload (already decoded and validated by
    /// the mailbox contract) as a [`NetDesired`], checked against the same
    /// agent rules as [`NetRequest::validate`]. The mailbox's rules are
    /// stricter on every field today; checking again costs a few compares and
    /// keeps the agent's guarantees from resting on another crate's.
    pub fn from_payload(p: &Payload) -> Result<NetDesired, NetConfigError> {
        if !valid_interface(&p.interface) {
            return Err(NetConfigError::Interface(p.interface.clone()));
        }
        if !p.mac.is_usable_interface_address() {
            return Err(NetConfigError::Mac(p.mac.to_string()));
        }
        if !usable_ipv4(p.ipv4) {
            return Err(NetConfigError::Ipv4(p.ipv4.to_string()));
        }
        if u32::from(p.prefix_len) > MAX_PREFIX_LEN {
            return Err(NetConfigError::PrefixLen(u32::from(p.prefix_len)));
        }
        Ok(NetDesired {
            interface: p.interface.clone(),
            mac: Some(p.mac),
            ipv4: p.ipv4,
            prefix_len: p.prefix_len,
            gateway: Some(p.gateway),
            dns: p.dns.iter().copied().map(IpAddr::V4).collect(),
            hostname: checked_hostname(&p.hostname)?,
        })
    }
}

impl From<&forkvm_proto::BootNetwork> for NetRequest {
    fn from(n: &forkvm_proto::BootNetwork) -> Self {
        NetRequest {
            interface: n.interface.clone(),
            mac: n.mac.clone(),
            ipv4: n.ipv4.clone(),
            prefix_len: u32::from(n.prefix_len),
            gateway: n.gateway.clone(),
            dns: n.dns.clone(),
            hostname: String::new(),
        }
    }
}

impl From<forkvm_proto::agent::NetworkConfig> for NetRequest {
    fn from(n: forkvm_proto::agent::NetworkConfig) -> Self {
        NetRequest {
            interface: n.interface,
            mac: n.mac,
            ipv4: n.ipv4,
            prefix_len: n.prefix_len,
            gateway: n.gateway,
            dns: n.dns,
            hostname: n.hostname,
        }
    }
}

#[cfg(test)]
mod tests {
    use forkvm_mailbox::{AckKey, AckTarget, Seed};

    use super::*;

    fn req() -> NetRequest {
        NetRequest {
            interface: "eth0".into(),
            mac: "02:fc:00:00:00:02".into(),
            ipv4: "10.0.0.2".into(),
            prefix_len: 24,
            gateway: "10.0.0.1".into(),
            dns: vec!["10.0.0.1".into()],
            hostname: String::new(),
        }
    }

    /// The mailbox payload carrying the same identity as [`req`] (plus the
    /// hostname the mailbox requires).
    fn payload() -> Payload {
        Payload {
            interface: "eth0".into(),
            mac: MacAddr([0x02, 0xfc, 0, 0, 0, 2]),
            ipv4: Ipv4Addr::new(10, 0, 0, 2),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            dns: vec![Ipv4Addr::new(10, 0, 0, 1)],
            hostname: "vm-2".into(),
            host_time_unix_ns: 1_700_000_000_000_000_000,
            clock_behind_ns: None,
            rng_seed: Seed([7; 32]),
            ack: AckTarget {
                ip: Ipv4Addr::new(10, 0, 0, 1),
                port: 7777,
                key: AckKey([9; 32]),
            },
        }
    }

    #[test]
    fn valid_request_becomes_typed_identity() {
        assert_eq!(
            req().validate(),
            Ok(NetDesired {
                interface: "eth0".into(),
                mac: Some(MacAddr([0x02, 0xfc, 0, 0, 0, 2])),
                ipv4: Ipv4Addr::new(10, 0, 0, 2),
                prefix_len: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
                dns: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))],
                hostname: None,
            })
        );
        // Empty optional fields mean "leave as is".
        let d = NetRequest {
            mac: String::new(),
            gateway: String::new(),
            dns: vec![],
            ..req()
        }
        .validate()
        .unwrap();
        assert_eq!(
            (d.mac, d.gateway, d.dns, d.hostname),
            (None, None, vec![], None)
        );
    }

    #[test]
    fn invalid_inputs_are_typed_errors() {
        let cases: Vec<(NetRequest, NetConfigError)> = vec![
            (
                NetRequest {
                    mac: "02:fc:00:00:00".into(),
                    ..req()
                },
                NetConfigError::Mac("02:fc:00:00:00".into()),
            ),
            (
                NetRequest {
                    mac: "zz:fc:00:00:00:01".into(),
                    ..req()
                },
                NetConfigError::Mac("zz:fc:00:00:00:01".into()),
            ),
            (
                NetRequest {
                    mac: "01:00:5e:00:00:01".into(),
                    ..req()
                },
                NetConfigError::Mac("01:00:5e:00:00:01".into()),
            ),
            (
                NetRequest {
                    ipv4: "10.0.0.256".into(),
                    ..req()
                },
                NetConfigError::Ipv4("10.0.0.256".into()),
            ),
            (
                NetRequest {
                    ipv4: "0.0.0.0".into(),
                    ..req()
                },
                NetConfigError::Ipv4("0.0.0.0".into()),
            ),
            (
                NetRequest {
                    prefix_len: 33,
                    ..req()
                },
                NetConfigError::PrefixLen(33),
            ),
            (
                NetRequest {
                    gateway: "gw".into(),
                    ..req()
                },
                NetConfigError::Gateway("gw".into()),
            ),
            (
                NetRequest {
                    dns: vec!["x".into()],
                    ..req()
                },
                NetConfigError::Dns("x".into()),
            ),
            (
                NetRequest {
                    interface: String::new(),
                    ..req()
                },
                NetConfigError::Interface(String::new()),
            ),
            (
                NetRequest {
                    interface: "a-very-long-ifname".into(),
                    ..req()
                },
                NetConfigError::Interface("a-very-long-ifname".into()),
            ),
            (
                NetRequest {
                    hostname: "bad_host".into(),
                    ..req()
                },
                NetConfigError::Hostname("bad_host".into()),
            ),
        ];
        for (r, want) in cases {
            assert_eq!(r.validate(), Err(want));
        }
    }

    #[test]
    fn prefix_len_beyond_u8_is_refused_not_truncated() {
        let r = NetRequest {
            prefix_len: 256 + 24,
            ..req()
        };
        assert_eq!(r.validate(), Err(NetConfigError::PrefixLen(280)));
    }

    #[test]
    fn mac_rules() {
        let d = NetRequest {
            mac: "02:AB:cd:00:10:ff".into(),
            ..req()
        }
        .validate()
        .unwrap();
        assert_eq!(d.mac, Some(MacAddr([0x02, 0xab, 0xcd, 0x00, 0x10, 0xff])));
        assert_eq!(d.mac.unwrap().to_string(), "02:ab:cd:00:10:ff");
        for bad in [
            "00:00:00:00:00:00",
            "02:00:00:00:00:01:02",
            "ff:ff:ff:ff:ff:ff",
            "02-00-00-00-00-01",
        ] {
            let r = NetRequest {
                mac: bad.into(),
                ..req()
            };
            assert_eq!(r.validate(), Err(NetConfigError::Mac(bad.into())));
        }
    }

    #[test]
    fn payload_entry_matches_the_text_entry() {
        let p = payload();
        assert_eq!(p.validate(), Ok(()), "baseline payload must be valid");
        let text = NetRequest {
            hostname: "vm-2".into(),
            ..req()
        };
        assert_eq!(NetDesired::from_payload(&p), text.validate());
    }

    #[test]
    fn payload_entry_applies_the_agent_rules() {
        // Payloads built by hand, past the mailbox's own validation: the
        // agent's rules must hold on their own.
        let with = |f: fn(&mut Payload)| {
            let mut p = payload();
            f(&mut p);
            NetDesired::from_payload(&p)
        };
        assert_eq!(
            with(|p| p.interface = "a/b".into()),
            Err(NetConfigError::Interface("a/b".into()))
        );
        assert_eq!(
            with(|p| p.mac = MacAddr([0; 6])),
            Err(NetConfigError::Mac("00:00:00:00:00:00".into()))
        );
        assert_eq!(
            with(|p| p.mac = MacAddr([0x01, 0, 0x5e, 0, 0, 1])),
            Err(NetConfigError::Mac("01:00:5e:00:00:01".into()))
        );
        assert_eq!(
            with(|p| p.ipv4 = Ipv4Addr::BROADCAST),
            Err(NetConfigError::Ipv4("255.255.255.255".into()))
        );
        assert_eq!(
            with(|p| p.prefix_len = 33),
            Err(NetConfigError::PrefixLen(33))
        );
        assert_eq!(
            with(|p| p.hostname = "bad_host".into()),
            Err(NetConfigError::Hostname("bad_host".into()))
        );
        // Several bad fields: the first in rule order is reported, as for text.
        assert_eq!(
            with(|p| {
                p.mac = MacAddr([0; 6]);
                p.hostname = "bad_host".into();
            }),
            Err(NetConfigError::Mac("00:00:00:00:00:00".into()))
        );
    }
}
