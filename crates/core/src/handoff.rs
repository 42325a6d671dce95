//! The network handoff: how a resumed fork, which still carries its source's
//! MAC and IPv4, learns its own identity.
//!
//! Host-initiated paths, tried in order:
//! 1. [`HandoffPath::Rpc`] — the agent's `ReconfigureNetwork` (netlink inside
//!    the guest), retried while the agent channel reconnects after resume;
//! 2. [`HandoffPath::Exec`] — when the agent declines that RPC
//!    (`Unimplemented`), the same change as a shell `ip` script run through
//!    the agent's `Exec`.
//!
//! The guest-initiated mailbox path comes first once it exists; the record
//! notes which path was used and why a faster one was not.

use crate::agent::CallPolicy;
use crate::error::{CoreError, Result};
use crate::manager::Manager;
use crate::model::{HandoffPath, HandoffRecord, Instance};
use forkvm_proto::agent as pb;
use std::time::Duration;
use tracing::{info, warn};

/// The identity to hand over, validated from the instance's lease.
struct Identity {
    mac: String,
    ip: std::net::Ipv4Addr,
    prefix_len: u8,
    gateway: std::net::Ipv4Addr,
    hostname: String,
}

impl Identity {
    fn of(inst: &Instance) -> Result<Self> {
        let n = &inst.network;
        let missing = || CoreError::Internal(format!("instance {} has no network lease", inst.id));
        let mac = n.mac.clone().ok_or_else(missing)?;
        // Values go into a shell script on the exec path: parse, never trust.
        mac.parse::<forkvm_net::MacAddr>()
            .map_err(|e| CoreError::Internal(format!("bad MAC in lease: {e}")))?;
        let parse_ip = |v: &Option<String>| -> Result<std::net::Ipv4Addr> {
            v.as_deref()
                .ok_or_else(missing)?
                .parse()
                .map_err(|e| CoreError::Internal(format!("bad address in lease: {e}")))
        };
        crate::validate_name(&inst.name)?;
        Ok(Self {
            mac,
            ip: parse_ip(&n.ip)?,
            prefix_len: n.prefix_len.ok_or_else(missing)?,
            gateway: parse_ip(&n.gateway)?,
            hostname: inst.name.clone(),
        })
    }

    fn rpc(&self) -> pb::NetworkConfig {
        pb::NetworkConfig {
            interface: "eth0".into(),
            mac: self.mac.clone(),
            ipv4: self.ip.to_string(),
            prefix_len: self.prefix_len as u32,
            gateway: self.gateway.to_string(),
            dns: vec![],
            hostname: self.hostname.clone(),
        }
    }

    /// The same change as `rpc()`, as busybox `ip` commands.
    fn shell(&self) -> String {
        format!(
            "set -e; ip link set dev eth0 down; ip link set dev eth0 address {mac}; \
             ip -4 addr flush dev eth0; ip addr add {ip}/{p} dev eth0; ip link set dev eth0 up; \
             ip route replace default via {gw} dev eth0; ip neigh flush dev eth0 || true; hostname {h}",
            mac = self.mac,
            ip = self.ip,
            p = self.prefix_len,
            gw = self.gateway,
            h = self.hostname
        )
    }
}

/// One fork's handoff.
pub(crate) struct Handoff<'a> {
    mgr: &'a Manager,
    inst: &'a Instance,
}

impl<'a> Handoff<'a> {
    pub fn new(mgr: &'a Manager, inst: &'a Instance) -> Self {
        Self { mgr, inst }
    }

    /// Hand the identity over; records the path taken in `rec`.
    pub async fn run(&self, rec: &mut HandoffRecord) -> Result<HandoffPath> {
        let id = Identity::of(self.inst)?;
        let path = match self.via_rpc(&id).await {
            Ok(()) => HandoffPath::Rpc,
            Err(CoreError::NotImplemented(why)) => {
                warn!(instance = %self.inst.id, reason = %why, "falling back to exec handoff");
                rec.fallback_reason = Some(why);
                self.via_exec(&id).await?;
                HandoffPath::Exec
            }
            Err(e) => return Err(e),
        };
        rec.path = Some(path);
        info!(instance = %self.inst.id, path = ?path, ip = %id.ip, mac = %id.mac, "handoff done");
        Ok(path)
    }

    fn policy(&self) -> CallPolicy {
        CallPolicy::within(self.mgr.handoff_timeout, Duration::from_secs(5))
    }

    async fn via_rpc(&self, id: &Identity) -> Result<()> {
        let msg = id.rpc();
        self.mgr
            .agents
            .call(
                &self.inst.id,
                &self.mgr.paths(&self.inst.id).agent_socket,
                "ReconfigureNetwork",
                self.policy(),
                |mut c| {
                    let msg = msg.clone();
                    async move { c.reconfigure_network(msg).await }
                },
            )
            .await
            .map(|_| ())
    }

    async fn via_exec(&self, id: &Identity) -> Result<()> {
        let req = pb::ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), id.shell()],
            env: Default::default(),
            stdin: vec![],
            timeout_ms: 20_000,
            cwd: String::new(),
        };
        let out = self
            .mgr
            .agents
            .call(
                &self.inst.id,
                &self.mgr.paths(&self.inst.id).agent_socket,
                "Exec",
                self.policy(),
                |mut c| {
                    let req = req.clone();
                    async move { c.exec(req).await }
                },
            )
            .await?;
        if out.exit_code != 0 {
            return Err(CoreError::Internal(format!(
                "exec handoff failed (exit {}): {}",
                out.exit_code,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}
