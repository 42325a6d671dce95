//! Published ports: a host port on the daemon namespace's addresses
//! forwarded to a port of one instance.

use forkvm_net::firewall::{PortForward, Protocol};
use serde::{Deserialize, Serialize};

/// Transport protocol of a published port.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

impl PortProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// `host_port` (on every address of the daemon's namespace) → `guest_port`
/// on the instance's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublishedPort {
    pub host_port: u16,
    pub guest_port: u16,
    #[serde(default)]
    pub protocol: PortProtocol,
}

impl PublishedPort {
    /// The key claimed in the store: one owner per protocol and host port.
    pub fn claim_key(&self) -> String {
        format!("{}/{}", self.protocol.as_str(), self.host_port)
    }

    pub fn forward(&self) -> PortForward {
        PortForward {
            protocol: match self.protocol {
                PortProtocol::Tcp => Protocol::Tcp,
                PortProtocol::Udp => Protocol::Udp,
            },
            host_port: self.host_port,
            guest_port: self.guest_port,
        }
    }
}

impl std::fmt::Display for PublishedPort {
    /// As `ps` shows it and `run -p` takes it: `8080:80/tcp`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port,
            self.guest_port,
            self.protocol.as_str()
        )
    }
}

/// Most ports one instance may publish.
pub const MAX_PUBLISHED_PORTS: usize = 32;

/// A request's list: real ports, each host port once, not too many.
pub fn validate_ports(ports: &[PublishedPort]) -> Result<(), String> {
    if ports.len() > MAX_PUBLISHED_PORTS {
        return Err(format!(
            "at most {MAX_PUBLISHED_PORTS} published ports, got {}",
            ports.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for p in ports {
        if p.host_port == 0 || p.guest_port == 0 {
            return Err(format!("published port {p}: ports must be 1-65535"));
        }
        if !seen.insert(p.claim_key()) {
            return Err(format!("host port {} is published twice", p.claim_key()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(host_port: u16, guest_port: u16, protocol: PortProtocol) -> PublishedPort {
        PublishedPort {
            host_port,
            guest_port,
            protocol,
        }
    }

    #[test]
    fn ports_are_checked() {
        assert!(
            validate_ports(&[
                p(8080, 80, PortProtocol::Tcp),
                p(8080, 80, PortProtocol::Udp)
            ])
            .is_ok()
        );
        assert!(
            validate_ports(&[
                p(8080, 80, PortProtocol::Tcp),
                p(8080, 81, PortProtocol::Tcp)
            ])
            .is_err()
        );
        assert!(validate_ports(&[p(0, 80, PortProtocol::Tcp)]).is_err());
        assert!(validate_ports(&[p(1, 0, PortProtocol::Tcp)]).is_err());
        let many: Vec<_> = (1..=33).map(|i| p(i, 80, PortProtocol::Tcp)).collect();
        assert!(validate_ports(&many).is_err());
    }

    #[test]
    fn shape_and_display() {
        let v: PublishedPort =
            serde_json::from_str(r#"{"host_port":8080,"guest_port":80}"#).unwrap();
        assert_eq!(v, p(8080, 80, PortProtocol::Tcp));
        assert_eq!(v.to_string(), "8080:80/tcp");
        assert_eq!(v.claim_key(), "tcp/8080");
        assert!(
            serde_json::from_str::<PublishedPort>(
                r#"{"host_port":1,"guest_port":1,"protocol":"sctp"}"#
            )
            .is_err()
        );
    }
}
