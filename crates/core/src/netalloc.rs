//! Network identity allocation: IPv4 and MAC from the pool, claimed in the
//! state store (whose keys make duplicates impossible), and the host side
//! (bridge, TAP) through forkvm-net.

use crate::error::{CoreError, Result};
use crate::model::NetworkInfo;
use crate::store::{AllocKind, Store};
use forkvm_net::{BridgeConfig, HostNet, IpPool, Ipv4Cidr, MacAddr};
use std::collections::HashSet;
use std::net::Ipv4Addr;

/// An instance's claimed identity.
#[derive(Clone, Debug)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: String,
    pub tap: String,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
}

impl Lease {
    pub fn info(&self, bridge: &str) -> NetworkInfo {
        NetworkInfo {
            enabled: true,
            ip: Some(self.ip.to_string()),
            mac: Some(self.mac.clone()),
            tap: Some(self.tap.clone()),
            gateway: Some(self.gateway.to_string()),
            prefix_len: Some(self.prefix_len),
            bridge: Some(bridge.to_string()),
        }
    }
}

pub struct NetAllocator {
    host: HostNet,
    bridge_cfg: BridgeConfig,
    /// The bridge is created on first use, so opening a manager (e.g. in API
    /// tests) never touches the host's network.
    bridge_ready: tokio::sync::OnceCell<()>,
    pool: IpPool,
    cidr: Ipv4Cidr,
    gateway: Ipv4Addr,
    bridge: String,
}

/// Bound on claim retries when another allocation wins the race.
const CLAIM_ATTEMPTS: usize = 64;

impl NetAllocator {
    pub async fn new(bridge: &str, subnet: &str) -> Result<Self> {
        let cidr: Ipv4Cidr = subnet
            .parse()
            .map_err(|e| CoreError::Invalid(format!("subnet {subnet:?}: {e}")))?;
        let cfg = BridgeConfig::new(bridge, cidr);
        let gateway = cfg.gateway;
        let pool = cfg
            .pool()
            .map_err(|e| CoreError::Invalid(format!("bridge configuration: {e}")))?;
        let host = HostNet::new()
            .await
            .map_err(|e| CoreError::internal("netlink", e))?;
        Ok(Self {
            host,
            bridge_cfg: cfg,
            bridge_ready: tokio::sync::OnceCell::new(),
            pool,
            cidr,
            gateway,
            bridge: bridge.to_string(),
        })
    }

    /// The instance's existing claims, or new ones (preferring the previous
    /// identity when it is still free).
    pub async fn ensure_lease(
        &self,
        store: &Store,
        id: &str,
        previous: Option<&NetworkInfo>,
    ) -> Result<Lease> {
        let held = store.allocations_of(id)?;
        let get = |k: &str| {
            held.iter()
                .find(|(kind, _)| kind == k)
                .map(|(_, v)| v.clone())
        };
        let ip = match get("ip").and_then(|v| v.parse().ok()) {
            Some(ip) => ip,
            None => {
                let pref = previous
                    .and_then(|p| p.ip.as_deref())
                    .and_then(|s| s.parse().ok());
                self.claim_ip(store, id, pref)?
            }
        };
        let mac = match get("mac") {
            Some(m) => m,
            None => {
                let pref = previous.and_then(|p| p.mac.clone());
                match self.claim_mac(store, id, pref) {
                    Ok(m) => m,
                    Err(e) => {
                        store.release(AllocKind::Ip, id)?;
                        return Err(e);
                    }
                }
            }
        };
        let tap = match get("tap") {
            Some(t) => t,
            None => {
                let t = forkvm_net::tap_name_for(id);
                if !store.try_allocate(AllocKind::Tap, &t, id)? {
                    store.release(AllocKind::Ip, id)?;
                    store.release(AllocKind::Mac, id)?;
                    return Err(CoreError::Conflict(format!("TAP name {t} is taken")));
                }
                t
            }
        };
        Ok(Lease {
            ip,
            mac,
            tap,
            gateway: self.gateway,
            prefix_len: self.cidr.prefix,
        })
    }

    fn claim_ip(&self, store: &Store, id: &str, preferred: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
        let mut preferred = preferred.filter(|p| self.pool.contains(*p));
        for _ in 0..CLAIM_ATTEMPTS {
            let used: HashSet<Ipv4Addr> = store
                .allocated(AllocKind::Ip)?
                .into_iter()
                .filter_map(|(v, _)| v.parse().ok())
                .collect();
            let Some(ip) = self.pool.first_free(&used, preferred.take()) else {
                return Err(CoreError::Exhausted(format!(
                    "no free IPv4 address left in {} ({} in use)",
                    self.cidr,
                    used.len()
                )));
            };
            if store.try_allocate(AllocKind::Ip, &ip.to_string(), id)? {
                return Ok(ip);
            }
        }
        Err(CoreError::Exhausted(
            "could not claim an IPv4 address".into(),
        ))
    }

    fn claim_mac(&self, store: &Store, id: &str, preferred: Option<String>) -> Result<String> {
        let mut candidate = preferred.filter(|m| m.parse::<MacAddr>().is_ok());
        for _ in 0..CLAIM_ATTEMPTS {
            let mac = candidate
                .take()
                .unwrap_or_else(|| forkvm_net::random_mac().to_string());
            if store.try_allocate(AllocKind::Mac, &mac, id)? {
                return Ok(mac);
            }
        }
        Err(CoreError::Exhausted(
            "could not claim a unique MAC address".into(),
        ))
    }

    /// Addresses of the pool nobody holds.
    pub fn free_addresses(&self, store: &Store) -> Result<usize> {
        let used = store
            .allocated(AllocKind::Ip)?
            .into_iter()
            .filter_map(|(v, _)| v.parse::<Ipv4Addr>().ok())
            .filter(|ip| self.pool.contains(*ip))
            .count();
        Ok(self.pool.capacity().saturating_sub(used))
    }

    /// Release every claim of the instance (idempotent).
    pub fn release(&self, store: &Store, id: &str) -> Result<()> {
        for k in [AllocKind::Ip, AllocKind::Mac, AllocKind::Tap] {
            store.release(k, id)?;
        }
        Ok(())
    }

    /// The instance's port: its TAP on the bridge, its MAC pinned to that
    /// port, and no stale neighbour entry left for its address (another
    /// instance may have had it before).
    pub async fn create_tap(&self, lease: &Lease) -> Result<()> {
        self.bridge_ready
            .get_or_try_init(|| async {
                self.host
                    .ensure_bridge(&self.bridge_cfg)
                    .await
                    .map_err(|e| {
                        CoreError::internal(&format!("setting up bridge {}", self.bridge), e)
                    })
            })
            .await?;
        let tap = &lease.tap;
        self.host
            .create_tap(tap, &self.bridge)
            .await
            .map_err(|e| CoreError::internal(&format!("creating TAP {tap}"), e))?;
        let mac: MacAddr = lease
            .mac
            .parse()
            .map_err(|e| CoreError::Internal(format!("bad MAC in lease: {e}")))?;
        self.host
            .pin_mac(tap, mac)
            .await
            .map_err(|e| CoreError::internal(&format!("pinning MAC on {tap}"), e))?;
        self.host
            .forget_neighbour(&self.bridge, lease.ip)
            .await
            .map_err(|e| CoreError::internal("flushing neighbour entry", e))
    }

    pub async fn delete_tap(&self, tap: &str) -> Result<()> {
        self.host
            .delete_tap(tap)
            .await
            .map_err(|e| CoreError::internal(&format!("deleting TAP {tap}"), e))
    }

    /// Ports of our bridge; empty when the bridge does not exist yet.
    pub async fn bridge_ports(&self) -> Result<Vec<String>> {
        if !self
            .host
            .tap_exists(&self.bridge)
            .await
            .map_err(|e| CoreError::internal("netlink", e))?
        {
            return Ok(vec![]);
        }
        self.host
            .list_bridge_ports(&self.bridge)
            .await
            .map_err(|e| CoreError::internal("listing bridge ports", e))
    }
}
