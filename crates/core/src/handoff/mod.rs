//! The network handoff: how a resumed fork, which still carries its source's
//! MAC and IPv4, learns its own identity. The fallback ladder:
//!
//! 1. [`HandoffPath::Mailbox`] (guest-initiated, [`mailbox`]): the identity is
//!    written into the paused fork's mailbox page ([`prepare`]); after resume
//!    the guest applies it and acks from its new address;
//! 2. [`HandoffPath::Rpc`] — the agent's `ReconfigureNetwork` (netlink inside
//!    the guest), retried while the agent channel reconnects after resume;
//! 3. [`HandoffPath::Exec`] — when the agent declines that RPC
//!    (`Unimplemented`), the same change as a shell `ip` script run through
//!    the agent's `Exec`.
//!
//! The request may start lower on the ladder (`handoff: rpc|exec`). The
//! record notes which path was used and why a faster one was not.

mod mailbox;

use crate::agent::{AgentError, CallPolicy};
use crate::error::{CoreError, ErrorKind, Result};
use crate::model::{HandoffPath, HandoffRecord, Instance, Snapshot, Stage};
use crate::netalloc::Lease;
use crate::services::Services;
use crate::teardown;
use forkvm_proto::agent as pb;
use forkvm_vmm::VmHandle;
use mailbox::{MailboxHandoff, MailboxPlan};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{Instrument, info, warn};

/// Why the mailbox path was not (or not successfully) used; recorded as the
/// fork's `fallback_reason`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MailboxFallback {
    #[error("handoff path {} requested", .0.as_str())]
    PathRequested(HandoffPath),
    #[error("the snapshot has no armed mailbox")]
    NoArmedMailbox,
    #[error("daemon restarted during the handoff")]
    DaemonRestarted,
    #[error("instance has no network lease")]
    NoLease,
    #[error("bad marker id {0:?}")]
    BadMarker(String),
    #[error("ack listener can't bind {addr}: {error}")]
    AckBind { addr: Ipv4Addr, error: String },
    #[error("ack listener: {0}")]
    AckListener(String),
    #[error("mailbox page address {0:#x} is outside guest RAM")]
    OutsideRam(u64),
    #[error("mailbox marker not found at its reported address")]
    MarkerNotFound,
    #[error("guest memory: {0}")]
    GuestMemory(String),
    #[error("mailbox patch: {0}")]
    Patch(String),
    #[error("guest rejected the mailbox payload (code {0})")]
    Rejected(u32),
    #[error("guest did not pick up the mailbox within {0:?}")]
    NotPickedUp(Duration),
    #[error("no valid mailbox ack within {0:?}")]
    NoAck(Duration),
}

impl MailboxFallback {
    /// A stable name for the reason (a metrics label: a closed set).
    pub fn code(&self) -> &'static str {
        match self {
            Self::PathRequested(_) => "path_requested",
            Self::NoArmedMailbox => "no_armed_mailbox",
            Self::DaemonRestarted => "daemon_restarted",
            Self::NoLease => "no_lease",
            Self::BadMarker(_) => "bad_marker",
            Self::AckBind { .. } => "ack_bind",
            Self::AckListener(_) => "ack_listener",
            Self::OutsideRam(_) => "outside_ram",
            Self::MarkerNotFound => "marker_not_found",
            Self::GuestMemory(_) => "guest_memory",
            Self::Patch(_) => "patch",
            Self::Rejected(_) => "rejected",
            Self::NotPickedUp(_) => "not_picked_up",
            Self::NoAck(_) => "no_ack",
        }
    }
}

/// The identity did not reach the guest on any path.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("instance {0} has no network lease")]
    NoLease(String),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("exec handoff failed (exit {code}): {stderr}")]
    ExecFailed { code: i32, stderr: String },
}

impl HandoffError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Agent(e) => e.kind(),
            Self::NoLease(_) | Self::ExecFailed { .. } => ErrorKind::Failed,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Agent(e) => e.code(),
            Self::NoLease(_) | Self::ExecFailed { .. } => "handoff_failed",
        }
    }
}

/// A fork made ready for its handoff while still paused.
pub(crate) struct Prepared {
    prefer: HandoffPath,
    mailbox: std::result::Result<MailboxHandoff, MailboxFallback>,
}

impl Prepared {
    /// No mailbox: the host-initiated paths from the start (`why`).
    pub fn without_mailbox(why: MailboxFallback) -> Self {
        Self {
            prefer: HandoffPath::Rpc,
            mailbox: Err(why),
        }
    }
}

/// While the fork is paused: write its identity into its mailbox page when
/// the mailbox path is wanted and possible (`snap`: what it was resumed
/// from, with the mailbox armed then).
pub(crate) async fn prepare(
    svc: &Services,
    inst: &Instance,
    vm: &VmHandle,
    snap: &Snapshot,
    prefer: HandoffPath,
    rec: &mut HandoffRecord,
) -> Prepared {
    let lease = Lease::of(&inst.network);
    let mailbox = match (prefer, snap.mailbox.as_ref(), &lease) {
        (HandoffPath::Mailbox, Some(info), Some(lease)) => {
            let t = Instant::now();
            let plan = MailboxPlan {
                info,
                now: svc.now(),
                // Older records: `created_at`, taken just after the pause.
                frozen_at: snap.frozen_at.unwrap_or(snap.created_at),
                lease,
                hostname: &inst.name,
                dns: &svc.cfg.dns,
                memory_mb: inst.memory_mb,
                ack_timeout: svc.cfg.mailbox_ack_timeout,
                ack_bind: svc.cfg.test_hooks.ack_bind_addr,
                forgery: svc.cfg.test_hooks.next_forgery(),
            };
            let mb = MailboxHandoff::prepare(svc.hv.clone(), vm, plan).await;
            rec.record(Stage::MailboxPrepare, t);
            mb
        }
        (HandoffPath::Mailbox, None, _) => Err(MailboxFallback::NoArmedMailbox),
        (HandoffPath::Mailbox, _, None) => Err(MailboxFallback::NoLease),
        (p, _, _) => Err(MailboxFallback::PathRequested(p)),
    };
    Prepared { prefer, mailbox }
}

/// After resume: the identity reaches the guest; the fork is Running after
/// it, with the record saying how. A guest that dies meanwhile fails the
/// handoff at once, not at the deadline.
pub(crate) async fn complete(
    svc: &Services,
    inst: &mut Instance,
    rec: &mut HandoffRecord,
    prepared: Prepared,
    resumed_at: Instant,
) -> Result<()> {
    svc.cfg.test_hooks.crash_point("fork:handoff");
    let (id, pid) = (inst.id.clone(), inst.pid);
    let outcome: Result<HandoffPath> = tokio::select! {
        r = run(svc, inst, rec, prepared) => r.map_err(Into::into),
        e = teardown::vmm_exit(svc, &id, pid, "during the network handoff") => Err(e.into()),
    };
    let observer = svc.store.observer();
    observer.handoff(inst, rec, outcome.as_ref().err().map(ToString::to_string));
    outcome?;
    rec.record(Stage::NetworkReady, resumed_at);
    inst.to_running();
    inst.handoff = Some(rec.clone());
    svc.store.update_instance(inst)?;
    // Only now its lease's rules (egress, published ports): until here
    // its TAP passed nothing but the handoff traffic.
    let rules = svc.net.sync_rules(&svc.store);
    if rec.path == Some(HandoffPath::Mailbox) {
        // The guest stepped its clock by the payload's `clock_behind_ns`
        // before it acked: no round trip on the fork's path.
        return rules.await;
    }
    // The host-initiated paths: stepped to the host's now over RPC, while
    // the rules are applied.
    let ((), applied) = tokio::join!(crate::guest::set_clock(svc, inst), rules);
    applied
}

/// The ladder: the prepared mailbox, else RPC, else exec.
async fn run(
    svc: &Services,
    inst: &Instance,
    rec: &mut HandoffRecord,
    prepared: Prepared,
) -> std::result::Result<HandoffPath, HandoffError> {
    let lease = Lease::of(&inst.network).ok_or_else(|| HandoffError::NoLease(inst.id.clone()))?;
    let why = match prepared.mailbox {
        Ok(mb) => match mb.wait_ack(rec).await {
            Ok(()) => {
                rec.path = Some(HandoffPath::Mailbox);
                info!(instance = %inst.id, ip = %lease.ip, "mailbox handoff acked");
                return Ok(HandoffPath::Mailbox);
            }
            Err(why) => why,
        },
        Err(why) => why,
    };
    if !matches!(why, MailboxFallback::PathRequested(_)) {
        warn!(instance = %inst.id, reason = %why, "mailbox handoff not used; falling back");
    }
    rec.fallback_reason = Some(why.to_string());
    svc.store.observer().metrics.fallback(why.code());
    let host = HostPaths { svc, inst, lease };
    let path = if prepared.prefer == HandoffPath::Exec {
        host.via_exec().await?;
        HandoffPath::Exec
    } else {
        match host.via_rpc().await {
            Ok(()) => HandoffPath::Rpc,
            Err(HandoffError::Agent(e @ AgentError::Unimplemented { .. })) => {
                warn!(instance = %inst.id, reason = %e, "falling back to exec handoff");
                rec.fallback_reason = Some(format!("{why}; {e}"));
                svc.store.observer().metrics.fallback("rpc_unimplemented");
                host.via_exec().await?;
                HandoffPath::Exec
            }
            Err(e) => return Err(e),
        }
    };
    rec.path = Some(path);
    info!(instance = %inst.id, path = path.as_str(), ip = %host.lease.ip, mac = %host.lease.mac, "handoff done");
    Ok(path)
}

/// The host-initiated paths for one instance.
struct HostPaths<'a> {
    svc: &'a Services,
    inst: &'a Instance,
    lease: Lease,
}

impl HostPaths<'_> {
    fn policy(&self) -> CallPolicy {
        CallPolicy::within(self.svc.cfg.handoff_timeout, Duration::from_secs(5))
    }

    fn exec_policy(&self) -> CallPolicy {
        let t = self.svc.cfg.handoff_timeout;
        CallPolicy::within(t, t)
    }

    async fn via_rpc(&self) -> std::result::Result<(), HandoffError> {
        let socket = self.svc.paths(self.inst).agent_socket;
        let cfg = self.lease.rpc_config(&self.inst.name, &self.svc.cfg.dns);
        self.svc
            .agent
            .reconfigure_network(&self.inst.id, &socket, cfg, self.policy())
            .await?;
        Ok(())
    }

    async fn via_exec(&self) -> std::result::Result<(), HandoffError> {
        let req = pb::ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                shell_script(&self.lease, &self.inst.name, &self.svc.cfg.dns),
            ],
            env: Default::default(),
            stdin: vec![],
            timeout_ms: 20_000,
            cwd: String::new(),
            // The agent's own root: the handoff configures the guest, not the image.
            image_root: false,
        };
        let socket = self.svc.paths(self.inst).agent_socket;
        let out = self
            .svc
            .agent
            // Sent once, so it gets the whole deadline to answer.
            .exec(&self.inst.id, &socket, req, self.exec_policy())
            .await?;
        if out.exit_code != 0 {
            return Err(HandoffError::ExecFailed {
                code: out.exit_code,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

/// Where the agent mounts an OCI workload's root (the agent's `ROOT_DIR`).
const ROOT: &str = "/run/forkvm/root";

/// The RPC's change as busybox `ip` commands. Every value is typed (MAC,
/// addresses, prefix) or a validated instance name, so nothing in it can
/// break out of the script.
fn shell_script(l: &Lease, hostname: &str, dns: &[Ipv4Addr]) -> String {
    debug_assert!(crate::validate_name(hostname).is_ok());
    let resolv: String = dns.iter().map(|d| format!("nameserver {d}\\n")).collect();
    // An OCI workload's root (mounted by the agent at ROOT) gets the same
    // file, written then renamed (a symlinked etc there is left alone).
    let resolv = match resolv.is_empty() {
        true => String::new(),
        false => format!(
            "; printf '{resolv}' > /etc/resolv.conf; \
             if [ -d {ROOT}/etc ] && [ ! -L {ROOT}/etc ]; then \
             cp /etc/resolv.conf {ROOT}/etc/.resolv.conf.forkvm && \
             mv -f {ROOT}/etc/.resolv.conf.forkvm {ROOT}/etc/resolv.conf; fi"
        ),
    };
    let script = format!(
        "set -e; ip link set dev eth0 down; ip link set dev eth0 address {mac}; \
         ip -4 addr flush dev eth0; ip addr add {ip}/{p} dev eth0; ip link set dev eth0 up; \
         ip route replace default via {gw} dev eth0; ip neigh flush dev eth0 || true; hostname {h}; \
         arping -U -c 1 -I eth0 {ip} >/dev/null 2>&1 || true",
        mac = l.mac,
        ip = l.ip,
        p = l.prefix_len,
        gw = l.gateway,
        h = hostname
    );
    script + &resolv + &uniqueness_script(&rand::random::<[u8; 32]>())
}

/// The exec path's share of what makes a fork unique (the agent does the
/// same natively, crates/agent identity.rs): the host's seed mixed into the
/// guest's RNG, a fresh machine-id in the agent's root and the image root.
/// Best effort, after the network is set.
fn uniqueness_script(seed: &[u8; 32]) -> String {
    let octal: String = seed.iter().map(|b| format!("\\{b:03o}")).collect();
    format!(
        "; printf '{octal}' > /dev/urandom || true;          tr -d - < /proc/sys/kernel/random/uuid > /etc/.machine-id.forkvm &&          mv -f /etc/.machine-id.forkvm /etc/machine-id || true;          if [ -d {ROOT}/etc ] && [ ! -L {ROOT}/etc ]; then          cp /etc/machine-id {ROOT}/etc/.machine-id.forkvm &&          mv -f {ROOT}/etc/.machine-id.forkvm {ROOT}/etc/machine-id || true; fi"
    )
}

/// Owner of a `wait_for_network: false` handoff: its outcome lands on the
/// instance (Running, or Stopped with the error and everything released).
pub(crate) fn spawn_observer(
    svc: Arc<Services>,
    mut inst: Instance,
    mut rec: HandoffRecord,
    prepared: Prepared,
    resumed_at: Instant,
) {
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            let _g = svc.locks.acquire(&inst.id).await;
            // The instance may have been deleted meanwhile.
            if svc.find(&inst.id).is_err() {
                return;
            }
            match complete(&svc, &mut inst, &mut rec, prepared, resumed_at).await {
                Ok(()) => {
                    svc.store.observer().metrics.pipeline("fork", &rec);
                    info!(instance = %inst.id, path = ?rec.path, "background handoff done")
                }
                Err(e) => handoff_failed(&svc, &mut inst, rec, e).await,
            }
        }
        .instrument(span),
    );
}

/// A background handoff failed: the fork stops and gives back everything.
async fn handoff_failed(svc: &Services, inst: &mut Instance, mut rec: HandoffRecord, e: CoreError) {
    warn!(instance = %inst.id, error = %e, "background handoff failed; stopping the fork");
    rec.error = Some(e.to_string());
    teardown::stop_vmm(svc, inst).await;
    if let Err(e) = svc.net.release(&svc.store, &inst.id) {
        warn!(instance = %inst.id, error = %e, "releasing network failed");
    }
    svc.paths(inst).remove_runtime();
    inst.network.forget_lease();
    // Its port claims went with the lease: a record listing them would
    // collide with whoever claims them next.
    inst.ports.clear();
    inst.handoff = Some(rec);
    inst.to_stopped(Some(format!("network handoff failed: {e}")), svc.now());
    if let Err(e) = svc.store.update_instance(inst) {
        warn!(instance = %inst.id, error = %e, "recording the failed handoff failed");
    }
    teardown::sync_rules(svc).await;
    svc.collect_unused();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_reasons_read_as_before() {
        assert_eq!(
            MailboxFallback::PathRequested(HandoffPath::Rpc).to_string(),
            "handoff path rpc requested"
        );
        assert_eq!(
            MailboxFallback::Rejected(11).to_string(),
            "guest rejected the mailbox payload (code 11)"
        );
    }

    #[test]
    fn shell_script_carries_the_lease() {
        let l = Lease {
            ip: Ipv4Addr::new(10, 0, 0, 7),
            mac: "02:fc:00:00:00:07".parse().unwrap(),
            tap: "t".into(),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            prefix_len: 24,
        };
        let s = shell_script(&l, "web-1", &[Ipv4Addr::new(10, 0, 0, 53)]);
        assert!(
            s.contains("; printf 'nameserver 10.0.0.53\\n' > /etc/resolv.conf;"),
            "{s}"
        );
        assert!(s.contains("/run/forkvm/root/etc/resolv.conf; fi"), "{s}");
        assert!(!shell_script(&l, "web-1", &[]).contains("resolv"));
        assert!(
            s.contains("> /dev/urandom") && s.contains("/etc/machine-id"),
            "{s}"
        );
        for part in [
            "address 02:fc:00:00:00:07",
            "ip addr add 10.0.0.7/24",
            "default via 10.0.0.1",
            "hostname web-1",
        ] {
            assert!(s.contains(part), "{part} in {s}");
        }
    }

    #[test]
    fn the_seed_goes_to_the_guest_as_octal_escapes() {
        let mut seed = [0u8; 32];
        seed[0] = 0o377;
        seed[1] = b'\'';
        let s = uniqueness_script(&seed);
        assert!(s.starts_with("; printf '\\377\\047\\000"), "{s}");
        // 32 escapes of 4 characters: no byte of the seed appears raw.
        let arg = s.split('\'').nth(1).unwrap();
        assert_eq!(arg.len(), 128, "{arg}");
    }
}
