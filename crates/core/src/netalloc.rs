//! Network identity: leases (IPv4, MAC, TAP name) claimed in the state store,
//! whose keys make duplicates impossible, and the host side of each lease (a
//! TAP port on the bridge) behind the [`HostNetwork`] trait.

use crate::error::{CoreError, Result};
use crate::model::{Instance, InstanceState, NetworkInfo, PublishedPort};
use crate::store::{AllocKind, Store};
use forkvm_mailbox::MacAddr;
use forkvm_net::firewall::{self, FirewallSettings, GuestMode, GuestRules, Ruleset};
use forkvm_net::{BridgeConfig, HostNet, IpPool, Ipv4Cidr};
use forkvm_proto::agent as pb;
use forkvm_proto::boot::BootNetwork;
use std::collections::HashSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;

/// The guest's interface name in every identity forkvm hands out.
pub const GUEST_INTERFACE: &str = "eth0";

/// An instance's claimed network identity: the one typed form every other
/// form (boot config, RPC message, mailbox payload, QEMU NIC) is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub tap: String,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
}

impl Lease {
    /// The full lease recorded on an instance, if it has one.
    pub fn of(n: &NetworkInfo) -> Option<Self> {
        Some(Self {
            ip: n.ip?,
            mac: n.mac?,
            tap: n.tap.clone()?,
            gateway: n.gateway?,
            prefix_len: n.prefix_len?,
        })
    }

    /// As recorded on an instance; `egress` is the instance's own setting.
    pub fn info(&self, bridge: &str, egress: bool) -> NetworkInfo {
        NetworkInfo {
            enabled: true,
            ip: Some(self.ip),
            mac: Some(self.mac),
            tap: Some(self.tap.clone()),
            gateway: Some(self.gateway),
            prefix_len: Some(self.prefix_len),
            bridge: Some(bridge.to_string()),
            egress,
        }
    }

    /// As the agent reads it from the kernel command line at boot.
    pub fn boot_network(&self, dns: &[Ipv4Addr]) -> BootNetwork {
        BootNetwork {
            interface: GUEST_INTERFACE.into(),
            mac: self.mac.to_string(),
            ipv4: self.ip.to_string(),
            prefix_len: self.prefix_len,
            gateway: self.gateway.to_string(),
            dns: dns.iter().map(Ipv4Addr::to_string).collect(),
        }
    }

    /// As the agent's ReconfigureNetwork RPC takes it.
    pub fn rpc_config(&self, hostname: &str, dns: &[Ipv4Addr]) -> pb::NetworkConfig {
        pb::NetworkConfig {
            interface: GUEST_INTERFACE.into(),
            mac: self.mac.to_string(),
            ipv4: self.ip.to_string(),
            prefix_len: u32::from(self.prefix_len),
            gateway: self.gateway.to_string(),
            dns: dns.iter().map(Ipv4Addr::to_string).collect(),
            hostname: hostname.to_string(),
            // Fresh per call: every fork's RNG diverges from its siblings'.
            rng_seed: rand::random::<[u8; 32]>().to_vec(),
        }
    }

    /// The VM's NIC.
    pub fn nic(&self) -> forkvm_vmm::NetSpec {
        forkvm_vmm::NetSpec {
            backend: forkvm_vmm::NetBackend::Tap(self.tap.clone()),
            mac: self.mac.to_string(),
        }
    }
}

/// Boxed future of a [`HostNetwork`] call.
pub type NetFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// The host side of instance networking: one bridge, one TAP port per VM.
pub trait HostNetwork: Send + Sync {
    /// The bridge exists with the gateway address (idempotent).
    fn ensure_bridge(&self) -> NetFuture<'_, ()>;
    /// TAP `tap` on the bridge, `mac` pinned to its port, and no stale
    /// neighbour entry left for `ip` (another instance may have had it).
    fn add_port<'a>(&'a self, tap: &'a str, mac: MacAddr, ip: Ipv4Addr) -> NetFuture<'a, ()>;
    fn delete_port<'a>(&'a self, tap: &'a str) -> NetFuture<'a, ()>;
    /// Ports of the bridge; empty when it does not exist yet.
    fn ports(&self) -> NetFuture<'_, Vec<String>>;
    fn bridge_exists(&self) -> NetFuture<'_, bool>;
    /// Replace the packet filter and NAT with `rules`, and make the
    /// bridge's permanent neighbour entries exactly `pinned`.
    /// With `delta` (the element-only change from the last ruleset this
    /// daemon applied, [`Ruleset::delta_from`]; empty: none) that alone is
    /// tried first, the full ruleset if it fails.
    fn apply_rules<'a>(
        &'a self,
        rules: &'a Ruleset,
        delta: Option<&'a str>,
        pinned: &'a [(Ipv4Addr, MacAddr)],
    ) -> NetFuture<'a, ()>;
}

/// [`HostNetwork`] on the real bridge, through netlink in the daemon's
/// network namespace.
pub struct BridgeHost {
    host: HostNet,
    cfg: BridgeConfig,
    /// IPv4 forwarding is turned on with the first ruleset.
    forwarding: tokio::sync::OnceCell<()>,
}

impl BridgeHost {
    pub async fn new(cfg: BridgeConfig) -> Result<Self> {
        let host = HostNet::new().await.map_err(CoreError::net("netlink"))?;
        Ok(Self {
            host,
            cfg,
            forwarding: tokio::sync::OnceCell::new(),
        })
    }
}

impl HostNetwork for BridgeHost {
    fn ensure_bridge(&self) -> NetFuture<'_, ()> {
        Box::pin(async move {
            self.host
                .ensure_bridge(&self.cfg)
                .await
                .map_err(CoreError::net(format!(
                    "setting up bridge {}",
                    self.cfg.name
                )))
        })
    }

    fn add_port<'a>(&'a self, tap: &'a str, mac: MacAddr, ip: Ipv4Addr) -> NetFuture<'a, ()> {
        Box::pin(async move {
            let bridge = &self.cfg.name;
            self.host
                .create_tap(tap, bridge)
                .await
                .map_err(CoreError::net(format!("creating TAP {tap}")))?;
            self.host
                .pin_mac(tap, mac)
                .await
                .map_err(CoreError::net(format!("pinning MAC on {tap}")))?;
            self.host
                .pin_neighbour(bridge, ip, mac)
                .await
                .map_err(CoreError::net(format!(
                    "pinning the neighbour entry of {ip}"
                )))
        })
    }

    fn delete_port<'a>(&'a self, tap: &'a str) -> NetFuture<'a, ()> {
        Box::pin(async move {
            self.host
                .delete_tap(tap)
                .await
                .map_err(CoreError::net(format!("deleting TAP {tap}")))
        })
    }

    fn apply_rules<'a>(
        &'a self,
        rules: &'a Ruleset,
        delta: Option<&'a str>,
        pinned: &'a [(Ipv4Addr, MacAddr)],
    ) -> NetFuture<'a, ()> {
        Box::pin(async move {
            let done = match delta {
                None => false,
                Some("") => true,
                Some(delta) => match firewall::apply_script(delta).await {
                    Ok(()) => true,
                    // Someone changed forkvm's tables: rebuild them whole.
                    Err(e) => {
                        tracing::warn!(error = %e, "ruleset delta refused; rebuilding");
                        false
                    }
                },
            };
            if !done {
                // Egress and published ports are routed: forwarding on, once.
                self.forwarding
                    .get_or_try_init(|| async {
                        firewall::enable_forwarding()
                            .map_err(CoreError::net("enabling IPv4 forwarding"))
                    })
                    .await?;
                firewall::apply(rules)
                    .await
                    .map_err(CoreError::net("applying the nftables ruleset"))?;
            }
            self.host
                .sync_neighbours(&self.cfg.name, pinned)
                .await
                .map_err(CoreError::net("pinning neighbour entries"))
        })
    }

    fn bridge_exists(&self) -> NetFuture<'_, bool> {
        Box::pin(async move {
            self.host
                .tap_exists(&self.cfg.name)
                .await
                .map_err(CoreError::net("netlink"))
        })
    }

    fn ports(&self) -> NetFuture<'_, Vec<String>> {
        Box::pin(async move {
            let bridge = &self.cfg.name;
            if !self
                .host
                .tap_exists(bridge)
                .await
                .map_err(CoreError::net("netlink"))?
            {
                return Ok(vec![]);
            }
            self.host
                .list_bridge_ports(bridge)
                .await
                .map_err(CoreError::net("listing bridge ports"))
        })
    }
}

/// Leases from the instance subnet, claimed in the store, with their ports
/// on the host.
pub struct NetAllocator {
    host: Arc<dyn HostNetwork>,
    /// The bridge is created on first use, so opening a manager (e.g. in API
    /// tests) never touches the host's network.
    bridge_ready: tokio::sync::OnceCell<()>,
    pool: IpPool,
    cidr: Ipv4Cidr,
    gateway: Ipv4Addr,
    bridge: String,
    /// The daemon's egress setting (off: no guest's traffic is NATed out).
    egress: bool,
    /// One ruleset rebuild at a time: each reads the store afresh, so the
    /// last one applied always reflects the latest recorded state. Holds
    /// that ruleset (`None` until the first, or after a failed apply).
    rules_lock: tokio::sync::Mutex<Option<Ruleset>>,
}

/// Bound on claim retries when another allocation wins the race.
const CLAIM_ATTEMPTS: usize = 64;

/// The subnet and bridge configuration for `subnet`, validated.
pub fn bridge_config(bridge: &str, subnet: &str) -> Result<BridgeConfig> {
    let cidr: Ipv4Cidr = subnet
        .parse()
        .map_err(|e| CoreError::Invalid(format!("subnet {subnet:?}: {e}")))?;
    Ok(BridgeConfig::new(bridge, cidr))
}

impl NetAllocator {
    pub fn new(cfg: &BridgeConfig, host: Arc<dyn HostNetwork>, egress: bool) -> Result<Self> {
        let pool = cfg
            .pool()
            .map_err(|e| CoreError::Invalid(format!("bridge configuration: {e}")))?;
        Ok(Self {
            host,
            bridge_ready: tokio::sync::OnceCell::new(),
            pool,
            cidr: cfg.subnet,
            gateway: cfg.gateway,
            bridge: cfg.name.clone(),
            egress,
            rules_lock: tokio::sync::Mutex::new(None),
        })
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn subnet(&self) -> Ipv4Cidr {
        self.cidr
    }

    /// The instance's existing claims, or new ones (preferring the previous
    /// identity when it is still free). Nothing stays claimed on failure.
    pub fn ensure_lease(
        &self,
        store: &Store,
        id: &str,
        previous: Option<&NetworkInfo>,
    ) -> Result<Lease> {
        let held = store.allocations_of(id)?;
        let get = |k: AllocKind| {
            held.iter()
                .find(|(kind, _)| kind == k.as_str())
                .map(|(_, v)| v.clone())
        };
        let ip = match get(AllocKind::Ip).and_then(|v| v.parse().ok()) {
            Some(ip) => ip,
            None => self.claim_ip(store, id, previous.and_then(|p| p.ip))?,
        };
        let claimed = get(AllocKind::Mac).and_then(|m| m.parse().ok());
        let mac = match claimed {
            Some(m) => m,
            None => self
                .claim_mac(store, id, previous.and_then(|p| p.mac))
                .inspect_err(|_| {
                    let _ = store.release(AllocKind::Ip, id);
                })?,
        };
        let tap = match get(AllocKind::Tap) {
            Some(t) => t,
            None => {
                let t = forkvm_net::tap_name_for(id);
                if !store.try_allocate(AllocKind::Tap, &t, id)? {
                    self.release(store, id)?;
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

    fn claim_mac(&self, store: &Store, id: &str, preferred: Option<MacAddr>) -> Result<MacAddr> {
        let mut candidate = preferred;
        for _ in 0..CLAIM_ATTEMPTS {
            let mac = candidate.take().unwrap_or_else(forkvm_net::random_mac);
            if store.try_allocate(AllocKind::Mac, &mac.to_string(), id)? {
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
        for k in [
            AllocKind::Ip,
            AllocKind::Mac,
            AllocKind::Tap,
            AllocKind::Port,
        ] {
            store.release(k, id)?;
        }
        Ok(())
    }

    /// Release the address and TAP name, keeping the MAC (a stopped
    /// instance keeps its MAC; start claims an address again).
    pub fn release_address(&self, store: &Store, id: &str) -> Result<()> {
        store.release(AllocKind::Ip, id)?;
        store.release(AllocKind::Tap, id)?;
        Ok(())
    }

    /// The lease's port on the bridge (the bridge is made on first use).
    pub async fn create_tap(&self, lease: &Lease) -> Result<()> {
        self.bridge_ready
            .get_or_try_init(|| self.host.ensure_bridge())
            .await?;
        self.host.add_port(&lease.tap, lease.mac, lease.ip).await
    }

    pub async fn delete_tap(&self, tap: &str) -> Result<()> {
        self.host.delete_port(tap).await
    }

    pub async fn bridge_ports(&self) -> Result<Vec<String>> {
        self.host.ports().await
    }

    /// Claims `ports` for instance `id`, all or none: a host port another
    /// instance holds is a conflict (the store's key decides, so two
    /// concurrent requests can't both win).
    pub fn claim_ports(&self, store: &Store, id: &str, ports: &[PublishedPort]) -> Result<()> {
        for p in ports {
            let key = p.claim_key();
            match store.try_allocate(AllocKind::Port, &key, id) {
                Ok(true) => {}
                Ok(false) => {
                    store.release(AllocKind::Port, id)?;
                    return Err(CoreError::Conflict(format!(
                        "host port {key} is already published by another instance"
                    )));
                }
                Err(e) => {
                    let _ = store.release(AllocKind::Port, id);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The packet filter, NAT and pinned neighbours re-derived from the
    /// store and applied as one transaction. Called after every change of
    /// a lease's state (TAP created, handoff done, instance gone) and at
    /// start-up: re-applying is harmless, stale rules vanish.
    pub async fn sync_rules(&self, store: &Store) -> Result<()> {
        let mut last = self.rules_lock.lock().await;
        let (guests, pinned) = guest_rules(&store.list_instances()?);
        let settings = FirewallSettings {
            bridge: self.bridge.clone(),
            subnet: self.cidr,
            gateway: self.gateway,
            egress: self.egress,
        };
        let rules = firewall::plan(&settings, &guests)
            .map_err(|e| CoreError::Internal(format!("firewall plan from the store: {e}")))?;
        // After the first, every change is element-only (cheap on the
        // fork's path); the first (and one after a failure) rebuilds.
        let delta = last.as_ref().and_then(|l| rules.delta_from(l));
        let t = std::time::Instant::now();
        let applied = self
            .host
            .apply_rules(&rules, delta.as_deref(), &pinned)
            .await;
        *last = applied.is_ok().then_some(rules);
        applied?;
        tracing::debug!(
            guests = guests.len(),
            delta = delta.is_some(),
            took_ms = t.elapsed().as_secs_f64() * 1000.0,
            "firewall rules synced"
        );
        Ok(())
    }

    /// At start-up: rules are rebuilt when anything may have left some (an
    /// instance holds a lease, or the bridge exists), so a manager opened
    /// on an empty store in a namespace without the bridge (API tests)
    /// never touches its firewall.
    pub async fn restore_rules(&self, store: &Store) -> Result<()> {
        let leased = store
            .list_instances()?
            .iter()
            .any(|i| Lease::of(&i.network).is_some());
        if leased || self.host.bridge_exists().await? {
            self.sync_rules(store).await?;
        }
        Ok(())
    }
}

/// The store's instances as the firewall planner sees them: every one with
/// a full lease and a VMM or a snapshot to come back from (a Stopped one
/// gave its address back). A fork whose identity has not reached its guest
/// gets only its handoff traffic.
pub fn guest_rules(instances: &[Instance]) -> (Vec<GuestRules>, Vec<(Ipv4Addr, MacAddr)>) {
    let mut rules = vec![];
    let mut pinned = vec![];
    for inst in instances {
        if inst.state == InstanceState::Stopped {
            continue;
        }
        let Some(lease) = Lease::of(&inst.network) else {
            continue;
        };
        pinned.push((lease.ip, lease.mac));
        rules.push(GuestRules {
            mode: match inst.pending_handoff {
                true => GuestMode::Handoff,
                false => GuestMode::Active,
            },
            egress: inst.network.egress,
            ports: inst.ports.iter().map(PublishedPort::forward).collect(),
            tap: lease.tap,
            mac: lease.mac,
            ip: lease.ip,
        });
    }
    (rules, pinned)
}
