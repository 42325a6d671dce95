//! Host networking for forkvm: the guest bridge, per-instance TAP devices,
//! MAC addresses and IPv4 pool arithmetic.
//!
//! Everything acts on the network namespace of the calling thread through one
//! rtnetlink socket ([`HostNet`]) plus `/dev/net/tun` for TAP creation, which
//! the kernel does not offer over netlink. Guests sit on one bridge
//! (`forkvm0`, `10.88.0.1/16` by default) behind *isolated* bridge ports, so
//! forks that briefly share their source's MAC and IP can reach the host but
//! never each other. Address bookkeeping (which IP/MAC is taken) belongs to the
//! state store; [`IpPool`] only does the arithmetic. See `docs/networking.md`.

mod error;
pub mod firewall;
mod host;
mod ipam;
mod mac;
mod names;
mod tap;

pub use error::NetError;
pub use host::{BridgeConfig, BridgePortInfo, HostNet};
pub use ipam::{IpPool, Ipv4Cidr};
pub use mac::{BRIDGE_MAC_PREFIX, GUEST_MAC_PREFIX, MacAddr, bridge_mac_for, random_mac};
pub use names::{IFNAME_MAX, TAP_PREFIX, tap_name_for, validate_ifname};
pub use netlink_packet_route::link::BridgePortState;
pub use tap::open_tap;
