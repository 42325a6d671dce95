//! The crate's error type.

use std::io;

/// Everything that can go wrong in host networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening the rtnetlink socket failed.
    #[error("opening rtnetlink connection: {0}")]
    Connect(#[source] io::Error),

    /// A netlink request was rejected or failed.
    #[error("netlink {op} on {target}: {source}")]
    Netlink {
        op: &'static str,
        target: String,
        #[source]
        source: rtnetlink::Error,
    },

    /// A TAP ioctl or `/dev/net/tun` operation failed.
    #[error("tun/tap {op} on {name}: {source}")]
    Tun {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },

    /// An interface name is empty, too long or contains forbidden characters.
    #[error("invalid interface name {0:?}: must be 1..=15 bytes without '/', ':' or whitespace")]
    InvalidIfName(String),

    /// A link that must exist does not.
    #[error("link {0} not found")]
    LinkNotFound(String),

    /// The name is taken by a link that is not a bridge.
    #[error("link {0} exists but is not a bridge")]
    NotABridge(String),

    /// The name is taken by a link that is not a TAP device.
    #[error("link {0} exists but is not a TAP device")]
    NotATap(String),

    /// The TAP already belongs to another bridge (or another master device).
    #[error("TAP {tap} is attached to ifindex {actual_master}, not to bridge {bridge}")]
    TapOnOtherMaster {
        tap: String,
        bridge: String,
        actual_master: u32,
    },

    /// The link is not a bridge port.
    #[error("link {0} is not a bridge port")]
    NotABridgePort(String),

    /// The bridge already carries the gateway address with another prefix.
    #[error("bridge {bridge} already has {addr}/{existing_prefix}, wanted /{wanted_prefix}")]
    AddressConflict {
        bridge: String,
        addr: std::net::Ipv4Addr,
        existing_prefix: u8,
        wanted_prefix: u8,
    },

    /// `HostNet` was used from a thread in another network namespace than
    /// the one it was opened in: its TAPs would land in the wrong namespace.
    #[error("network namespace of the calling thread differs from the one HostNet was opened in")]
    NamespaceMismatch,

    /// A CIDR string did not parse.
    #[error("invalid IPv4 CIDR {0:?}")]
    InvalidCidr(String),

    /// A MAC address string did not parse (the rules are
    /// [`forkvm_mailbox::MacAddr`]'s; this wraps its parse error for callers
    /// that report net errors).
    #[error("invalid MAC address {text:?}")]
    InvalidMac {
        text: String,
        #[source]
        source: forkvm_mailbox::MacParseError,
    },

    /// A bridge or pool configuration is inconsistent.
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),

    /// A sysctl of the namespace could not be read or written.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },

    /// The `nft` tool could not be run (is Debian's `nftables` installed?).
    #[error("running nft: {source}")]
    NftSpawn {
        #[source]
        source: io::Error,
    },

    /// `nft` refused the ruleset; nothing of it was applied.
    #[error("nft failed ({status}): {stderr}")]
    Nft { status: String, stderr: String },

    /// The firewall plan is inconsistent.
    #[error("firewall plan: {0}")]
    Firewall(#[from] crate::firewall::FirewallError),
}
