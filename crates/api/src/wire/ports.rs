//! Published ports (a forkvm addition: hypeman has no such field) and the
//! `network.egress` setting of a create request.

use forkvm_core as core;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Transport protocol of a published port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

/// forkvm: a host port (on every address of the daemon's network
/// namespace) forwarded to a port of the instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PublishedPort {
    #[schema(minimum = 1, maximum = 65535, example = 8080)]
    pub host_port: u16,
    #[schema(minimum = 1, maximum = 65535, example = 80)]
    pub guest_port: u16,
    /// Default `tcp`.
    #[serde(default)]
    pub protocol: PortProtocol,
}

impl From<PublishedPort> for core::PublishedPort {
    fn from(p: PublishedPort) -> Self {
        Self {
            host_port: p.host_port,
            guest_port: p.guest_port,
            protocol: match p.protocol {
                PortProtocol::Tcp => core::PortProtocol::Tcp,
                PortProtocol::Udp => core::PortProtocol::Udp,
            },
        }
    }
}

impl From<&core::PublishedPort> for PublishedPort {
    fn from(p: &core::PublishedPort) -> Self {
        Self {
            host_port: p.host_port,
            guest_port: p.guest_port,
            protocol: match p.protocol {
                core::PortProtocol::Tcp => PortProtocol::Tcp,
                core::PortProtocol::Udp => PortProtocol::Udp,
            },
        }
    }
}

impl std::fmt::Display for PublishedPort {
    /// `8080:80/tcp`, as `ps` shows and `run -p` takes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        core::PublishedPort::from(*self).fmt(f)
    }
}

/// `network.egress` of a create request: forkvm's `true`/`false` (traffic
/// may leave the daemon's namespace through source NAT, default true), or
/// hypeman's object for *mediated* egress, which forkvm does not offer: it
/// is accepted and leaves direct egress on, as hypeman's own default does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EgressParam {
    Direct(bool),
    Mediated(serde_json::Map<String, serde_json::Value>),
}

impl EgressParam {
    /// Whether the instance's traffic is NATed out.
    pub fn direct(&self) -> bool {
        match self {
            Self::Direct(on) => *on,
            Self::Mediated(_) => true,
        }
    }
}
