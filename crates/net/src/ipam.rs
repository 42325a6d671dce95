//! IPv4 CIDR type and address-pool arithmetic.
//!
//! Only arithmetic lives here; which addresses are taken is the state store's
//! business (it enforces uniqueness with UNIQUE constraints).

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::NetError;

/// An IPv4 address with a prefix length, e.g. `10.88.0.1/16`.
///
/// The address is kept as given (it may be a host address, as on an
/// interface); [`Ipv4Cidr::network`] gives the masked network address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// Builds a CIDR; `prefix` must be at most 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetError> {
        if prefix > 32 {
            return Err(NetError::InvalidCidr(format!("{addr}/{prefix}")));
        }
        Ok(Self { addr, prefix })
    }

    /// The netmask as a u32 (`/16` → `0xffff0000`).
    pub fn mask(&self) -> u32 {
        // Shifting a u32 by 32 overflows, hence the checked form.
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The netmask as an address.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The broadcast address (host bits set).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// Whether `ip` lies inside this network (network and broadcast included).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// Number of addresses in the block, `2^(32-prefix)`.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }
}

impl Default for Ipv4Cidr {
    /// `10.88.0.0/16`.
    fn default() -> Self {
        Self {
            addr: Ipv4Addr::new(10, 88, 0, 0),
            prefix: 16,
        }
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NetError;

    /// Parses `a.b.c.d/p`; the prefix is mandatory.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::InvalidCidr(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Self::new(addr, prefix).map_err(|_| bad())
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The guest address range of one bridge: every host address of `cidr`
/// except the gateway.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IpPool {
    cidr: Ipv4Cidr,
    gateway: Ipv4Addr,
}

impl IpPool {
    /// A pool over `cidr` (normalised to its network address) with `gateway`
    /// reserved. Needs at least one guest address, so the prefix must be ≤ 30,
    /// and the gateway must be a host address inside the network.
    pub fn new(cidr: Ipv4Cidr, gateway: Ipv4Addr) -> Result<Self, NetError> {
        if cidr.prefix > 30 {
            return Err(NetError::InvalidConfig(format!(
                "subnet {cidr} is too small: need a prefix of /30 or shorter"
            )));
        }
        let cidr = Ipv4Cidr {
            addr: cidr.network(),
            prefix: cidr.prefix,
        };
        if !cidr.contains(gateway) || gateway == cidr.network() || gateway == cidr.broadcast() {
            return Err(NetError::InvalidConfig(format!(
                "gateway {gateway} is not a host address of {cidr}"
            )));
        }
        Ok(Self { cidr, gateway })
    }

    /// The network (address normalised to the network address).
    pub fn cidr(&self) -> Ipv4Cidr {
        self.cidr
    }

    /// The reserved gateway address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Whether `ip` may be given to a guest: inside the network and not the
    /// network, broadcast or gateway address.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.cidr.contains(ip)
            && ip != self.cidr.network()
            && ip != self.cidr.broadcast()
            && ip != self.gateway
    }

    /// Number of assignable guest addresses.
    pub fn capacity(&self) -> usize {
        // size - network - broadcast - gateway; size ≥ 4 is guaranteed by new().
        usize::try_from(self.cidr.size() - 3).unwrap_or(usize::MAX)
    }

    /// All assignable addresses in ascending order.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let first = u32::from(self.cidr.network()) + 1;
        let last = u32::from(self.cidr.broadcast()) - 1;
        (first..=last)
            .map(Ipv4Addr::from)
            .filter(move |ip| *ip != self.gateway)
    }

    /// The lowest free address, or `preferred` if it is assignable and free.
    /// `None` when the pool is exhausted.
    pub fn first_free(
        &self,
        used: &HashSet<Ipv4Addr>,
        preferred: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        self.first_free_by(|ip| used.contains(&ip), preferred)
    }

    /// Like [`IpPool::first_free`] with a predicate, for callers that keep
    /// used addresses somewhere other than a `HashSet`.
    pub fn first_free_by(
        &self,
        is_used: impl Fn(Ipv4Addr) -> bool,
        preferred: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        if let Some(p) = preferred
            && self.contains(p)
            && !is_used(p)
        {
            return Some(p);
        }
        self.hosts().find(|ip| !is_used(*ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn pool(c: &str, g: &str) -> IpPool {
        IpPool::new(c.parse().unwrap(), ip(g)).unwrap()
    }

    #[test]
    fn cidr_parse_display_round_trip() {
        for s in [
            "10.88.0.0/16",
            "10.88.0.1/16",
            "0.0.0.0/0",
            "192.168.1.4/30",
            "1.2.3.4/32",
        ] {
            let c: Ipv4Cidr = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
        }
        assert_eq!(Ipv4Cidr::default().to_string(), "10.88.0.0/16");
    }

    #[test]
    fn cidr_rejects_garbage() {
        for s in [
            "",
            "10.88.0.0",
            "10.88.0.0/",
            "10.88.0.0/33",
            "10.88.0/16",
            "10.88.0.0/+1",
            "10.88.0.0/016",
            "x/8",
        ] {
            assert!(s.parse::<Ipv4Cidr>().is_err(), "{s:?} parsed");
        }
    }

    #[test]
    fn cidr_arithmetic() {
        let c: Ipv4Cidr = "10.88.7.9/16".parse().unwrap();
        assert_eq!(c.network(), ip("10.88.0.0"));
        assert_eq!(c.broadcast(), ip("10.88.255.255"));
        assert_eq!(c.netmask(), ip("255.255.0.0"));
        assert!(c.contains(ip("10.88.200.1")));
        assert!(!c.contains(ip("10.89.0.1")));
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert_eq!(all.mask(), 0);
        assert!(all.contains(ip("255.1.2.3")));
        assert_eq!(all.size(), 1 << 32);
    }

    #[test]
    fn cidr_serde_as_string() {
        let c: Ipv4Cidr = "10.88.0.0/16".parse().unwrap();
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, "\"10.88.0.0/16\"");
        assert_eq!(serde_json::from_str::<Ipv4Cidr>(&j).unwrap(), c);
    }

    #[test]
    fn capacity() {
        assert_eq!(pool("10.88.0.0/16", "10.88.0.1").capacity(), 65533);
        assert_eq!(pool("10.0.0.0/24", "10.0.0.1").capacity(), 253);
        assert_eq!(pool("10.0.0.0/30", "10.0.0.1").capacity(), 1);
        assert_eq!(pool("10.0.0.0/24", "10.0.0.1").hosts().count(), 253);
    }

    #[test]
    fn rejects_bad_pools() {
        let c = |s: &str| s.parse::<Ipv4Cidr>().unwrap();
        assert!(IpPool::new(c("10.0.0.0/31"), ip("10.0.0.1")).is_err());
        assert!(IpPool::new(c("10.0.0.0/32"), ip("10.0.0.0")).is_err());
        assert!(
            IpPool::new(c("10.0.0.0/24"), ip("10.0.0.0")).is_err(),
            "network as gateway"
        );
        assert!(
            IpPool::new(c("10.0.0.0/24"), ip("10.0.0.255")).is_err(),
            "broadcast as gateway"
        );
        assert!(
            IpPool::new(c("10.0.0.0/24"), ip("10.0.1.1")).is_err(),
            "gateway outside"
        );
    }

    #[test]
    fn skips_network_gateway_broadcast() {
        let p = pool("10.0.0.0/24", "10.0.0.1");
        assert!(!p.contains(ip("10.0.0.0")));
        assert!(!p.contains(ip("10.0.0.1")));
        assert!(!p.contains(ip("10.0.0.255")));
        assert!(p.contains(ip("10.0.0.2")));
        assert!(p.contains(ip("10.0.0.254")));
        assert_eq!(p.first_free(&HashSet::new(), None), Some(ip("10.0.0.2")));
        // Gateway in the middle of the range is skipped too.
        let mid = pool("10.0.0.0/24", "10.0.0.100");
        let used: HashSet<_> = (2..100)
            .map(|i| Ipv4Addr::new(10, 0, 0, i))
            .chain([ip("10.0.0.1")])
            .collect();
        assert_eq!(mid.first_free(&used, None), Some(ip("10.0.0.101")));
    }

    #[test]
    fn slash30_edge() {
        let p = pool("10.0.0.0/30", "10.0.0.1");
        assert_eq!(p.first_free(&HashSet::new(), None), Some(ip("10.0.0.2")));
        let used: HashSet<_> = [ip("10.0.0.2")].into();
        assert_eq!(p.first_free(&used, None), None);
        // Network, gateway and broadcast are never handed out, even if preferred.
        for pref in ["10.0.0.0", "10.0.0.1", "10.0.0.3"] {
            assert_eq!(p.first_free(&used, Some(ip(pref))), None, "{pref}");
        }
        // Gateway at .2 leaves .1 as the only guest address.
        let q = pool("10.0.0.0/30", "10.0.0.2");
        assert_eq!(q.first_free(&HashSet::new(), None), Some(ip("10.0.0.1")));
    }

    #[test]
    fn slash24_exhaustion() {
        let p = pool("192.168.7.0/24", "192.168.7.1");
        let mut used = HashSet::new();
        for _ in 0..p.capacity() {
            let next = p.first_free(&used, None).expect("pool not yet full");
            assert!(p.contains(next));
            assert!(used.insert(next), "{next} handed out twice");
        }
        assert_eq!(used.len(), 253);
        assert_eq!(p.first_free(&used, None), None);
        assert_eq!(p.first_free(&used, Some(ip("192.168.7.9"))), None);
        used.remove(&ip("192.168.7.77"));
        assert_eq!(p.first_free(&used, None), Some(ip("192.168.7.77")));
    }

    #[test]
    fn preferred_honoured_only_when_free_and_valid() {
        let p = pool("10.88.0.0/16", "10.88.0.1");
        let used: HashSet<_> = [ip("10.88.3.3")].into();
        assert_eq!(
            p.first_free(&used, Some(ip("10.88.9.9"))),
            Some(ip("10.88.9.9"))
        );
        assert_eq!(
            p.first_free(&used, Some(ip("10.88.3.3"))),
            Some(ip("10.88.0.2")),
            "taken"
        );
        assert_eq!(
            p.first_free(&used, Some(ip("10.99.0.5"))),
            Some(ip("10.88.0.2")),
            "outside"
        );
        assert_eq!(
            p.first_free(&used, Some(ip("10.88.0.1"))),
            Some(ip("10.88.0.2")),
            "gateway"
        );
        assert_eq!(
            p.first_free_by(|a| a.octets()[3] % 2 == 0, None),
            Some(ip("10.88.0.3")),
            "predicate form"
        );
    }

    #[test]
    fn pool_normalises_cidr() {
        let p = pool("10.88.5.5/16", "10.88.0.1");
        assert_eq!(p.cidr().to_string(), "10.88.0.0/16");
    }
}
