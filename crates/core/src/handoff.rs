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
//! The guest-initiated [`MailboxHandoff`] comes first when the snapshot has
//! an armed mailbox; the record notes which path was used and why a faster
//! one was not.

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
             ip route replace default via {gw} dev eth0; ip neigh flush dev eth0 || true; hostname {h}; \
             arping -U -c 1 -I eth0 {ip} >/dev/null 2>&1 || true",
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
    prefer: HandoffPath,
}

impl<'a> Handoff<'a> {
    pub fn new(mgr: &'a Manager, inst: &'a Instance) -> Self {
        Self {
            mgr,
            inst,
            prefer: HandoffPath::Mailbox,
        }
    }

    /// Start at a slower path (the request's `handoff`); the mailbox is
    /// then not prepared at all.
    pub fn prefer(mut self, path: HandoffPath) -> Self {
        self.prefer = path;
        self
    }

    /// Hand the identity over; records the path taken in `rec`. With a
    /// prepared mailbox, wait for the guest's ack first.
    pub async fn run(
        &self,
        rec: &mut HandoffRecord,
        mailbox: Option<std::result::Result<MailboxHandoff, String>>,
    ) -> Result<HandoffPath> {
        let id = Identity::of(self.inst)?;
        match mailbox {
            Some(Ok(mb)) => match mb.wait_ack(rec).await {
                Ok(()) => {
                    rec.path = Some(HandoffPath::Mailbox);
                    info!(instance = %self.inst.id, ip = %id.ip, "mailbox handoff acked");
                    return Ok(HandoffPath::Mailbox);
                }
                Err(why) => {
                    warn!(instance = %self.inst.id, reason = %why, "mailbox handoff failed; falling back to RPC");
                    rec.fallback_reason = Some(why);
                }
            },
            Some(Err(why)) => {
                warn!(instance = %self.inst.id, reason = %why, "mailbox not usable; using RPC");
                rec.fallback_reason = Some(why);
            }
            None if self.prefer != HandoffPath::Mailbox => {
                rec.fallback_reason =
                    Some(format!("handoff path {:?} requested", self.prefer).to_lowercase());
            }
            None => {}
        }
        if self.prefer == HandoffPath::Exec {
            self.via_exec(&id).await?;
            rec.path = Some(HandoffPath::Exec);
            return Ok(HandoffPath::Exec);
        }
        let path = match self.via_rpc(&id).await {
            Ok(()) => HandoffPath::Rpc,
            Err(CoreError::NotImplemented(why)) => {
                warn!(instance = %self.inst.id, reason = %why, "falling back to exec handoff");
                rec.fallback_reason = Some(match rec.fallback_reason.take() {
                    Some(first) => format!("{first}; {why}"),
                    None => why,
                });
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

/// How long a fork may take to ack its mailbox before the host falls back to
/// the RPC path (override: FORKVM_MAILBOX_ACK_TIMEOUT_MS).
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The guest-initiated path: the identity is written into the fork's own
/// memory before it resumes, and the guest proves it applied it with an
/// authenticated datagram sent from the new address.
pub(crate) struct MailboxHandoff {
    socket: tokio::net::UdpSocket,
    key: forkvm_mailbox::AckKey,
    generation: u64,
    mac: forkvm_mailbox::MacAddr,
    ip: std::net::Ipv4Addr,
    mem_path: std::path::PathBuf,
    offset: u64,
    /// The page we wrote is ours while it carries this marker (the guest
    /// re-arms with a new one after answering).
    marker: forkvm_mailbox::MarkerId,
    ack_timeout: Duration,
}

/// Test knob `FORKVM_TEST_MAILBOX_FORGE=crc,version,mac,prefix`: successive
/// forks get successive forgeries from the list (a correct guest rejects
/// each; the fork must still end Running through the fallback).
fn test_forgery() -> Option<forkvm_mailbox::Forgery> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let list = std::env::var("FORKVM_TEST_MAILBOX_FORGE").ok()?;
    let kinds: Vec<&str> = list.split(',').filter(|k| !k.is_empty()).collect();
    if kinds.is_empty() {
        return None;
    }
    let k = kinds[NEXT.fetch_add(1, Ordering::Relaxed) % kinds.len()];
    Some(match k {
        "crc" => forkvm_mailbox::Forgery::BadCrc,
        "version" => forkvm_mailbox::Forgery::WrongVersion,
        "mac" => forkvm_mailbox::Forgery::MulticastMac,
        _ => forkvm_mailbox::Forgery::PrefixTooLong,
    })
}

fn raw_u32(page: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(page.get(off..off + 4)?.try_into().ok()?))
}

/// Guest-physical address → offset in a q35 guest's RAM file: RAM below the
/// PCI hole maps 1:1, RAM above 4 GiB follows it.
fn gpa_to_offset(gpa: u64, memory_mb: u32) -> Option<u64> {
    let ram = memory_mb as u64 * 1024 * 1024;
    let lowmem = if ram > 0xB000_0000 { 0x8000_0000 } else { ram };
    const FOUR_G: u64 = 1 << 32;
    if gpa < lowmem {
        Some(gpa)
    } else if gpa >= FOUR_G && gpa - FOUR_G < ram - lowmem {
        Some(gpa - FOUR_G + lowmem)
    } else {
        None
    }
}

/// Forged or malformed acks logged one by one per handoff; more are only counted.
const LOGGED_FORGERIES: u32 = 5;

impl MailboxHandoff {
    /// Before resume: bind the ack listener on the gateway, find the armed
    /// page in the fork's memory file (at the reported address, else by
    /// scanning) and write the payload into it. `Err` is the reason to fall
    /// back.
    pub fn prepare(
        mgr: &Manager,
        inst: &Instance,
        info: &crate::model::MailboxInfo,
    ) -> std::result::Result<Self, String> {
        use std::os::unix::fs::FileExt;
        let id = Identity::of(inst).map_err(|e| e.to_string())?;
        let marker_bytes: [u8; 16] = hex::decode(&info.marker)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("bad marker id {:?}", info.marker))?;
        let marker = forkvm_mailbox::MarkerId(marker_bytes);
        let bind_ip = std::env::var("FORKVM_TEST_ACK_BIND_ADDR")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(id.gateway);
        let std_sock = std::net::UdpSocket::bind((bind_ip, 0))
            .map_err(|e| format!("ack listener can't bind {bind_ip}: {e}"))?;
        std_sock
            .set_nonblocking(true)
            .map_err(|e| format!("ack listener: {e}"))?;
        let port = std_sock
            .local_addr()
            .map_err(|e| format!("ack listener: {e}"))?
            .port();
        let socket =
            tokio::net::UdpSocket::from_std(std_sock).map_err(|e| format!("ack listener: {e}"))?;

        let mem_path = mgr.paths(&inst.id).mem;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mem_path)
            .map_err(|e| format!("open fork memory: {e}"))?;
        let mut page = vec![0u8; forkvm_mailbox::PAGE_SIZE];
        let at_reported = gpa_to_offset(info.gpa, inst.memory_mb).filter(|off| {
            file.read_exact_at(&mut page, *off).is_ok()
                && forkvm_mailbox::verify_marker(&page, &marker).is_ok()
        });
        let offset = match at_reported {
            Some(off) => off,
            None => {
                let found = forkvm_mailbox::scan_file(&file, &marker)
                    .map_err(|e| format!("mailbox scan: {e}"))?
                    .ok_or("mailbox marker not found in guest memory")?;
                warn!(instance = %inst.id, reported = info.gpa, found, "mailbox page moved; found by scan");
                file.read_exact_at(&mut page, found)
                    .map_err(|e| format!("read mailbox: {e}"))?;
                found
            }
        };
        let key = forkvm_mailbox::AckKey(rand::random());
        let generation = rand::random::<u64>().max(1);
        let mac: forkvm_mailbox::MacAddr =
            id.mac.parse().map_err(|_| format!("bad MAC {}", id.mac))?;
        let payload = forkvm_mailbox::Payload {
            interface: "eth0".into(),
            mac,
            ipv4: id.ip,
            prefix_len: id.prefix_len,
            gateway: id.gateway,
            dns: vec![],
            hostname: id.hostname.clone(),
            host_time_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or_default(),
            rng_seed: forkvm_mailbox::Seed(rand::random()),
            ack: forkvm_mailbox::AckTarget {
                ip: id.gateway,
                port,
                key: key.clone(),
            },
        };
        // Test knob: write a payload a correct guest must reject, to prove
        // the rejection and the fallback end to end.
        let forgery = test_forgery();
        match forgery {
            Some(how) => forkvm_mailbox::forge(&mut page, &marker, generation, &payload, how),
            None => forkvm_mailbox::patch(&mut page, &marker, generation, &payload),
        }
        .map_err(|e| format!("mailbox patch: {e}"))?;
        // The VMM has not started yet: nothing reads the page concurrently.
        file.write_all_at(&page, offset)
            .map_err(|e| format!("write mailbox: {e}"))?;
        Ok(Self {
            socket,
            key,
            generation,
            mac,
            ip: id.ip,
            mem_path,
            offset,
            marker,
            ack_timeout: std::env::var("FORKVM_MAILBOX_ACK_TIMEOUT_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_ACK_TIMEOUT),
        })
    }

    /// After resume: the first valid ack from the fork's new address.
    /// Datagrams are read into a fixed 256-byte buffer and only counted, so
    /// a flood costs CPU, never memory.
    /// Forged, stale or malformed datagrams are counted and ignored.
    pub async fn wait_ack(&self, rec: &mut HandoffRecord) -> std::result::Result<(), String> {
        let timeout = self.ack_timeout;
        let mut forged = 0u32;
        let mut buf = [0u8; 256];
        let wait = async {
            loop {
                let (n, from) = self
                    .socket
                    .recv_from(&mut buf)
                    .await
                    .map_err(|e| format!("ack listener: {e}"))?;
                let from_fork = from.ip() == std::net::IpAddr::V4(self.ip);
                match forkvm_mailbox::ack_verify(
                    &buf[..n],
                    &self.key,
                    self.generation,
                    self.mac,
                    self.ip,
                ) {
                    Ok(_) if from_fork => return Ok::<(), String>(()),
                    // A flooding guest must not flood the log too: the first
                    // few are logged, the rest only counted (summary below).
                    Ok(_) => {
                        forged += 1;
                        if forged <= LOGGED_FORGERIES {
                            warn!(from = %from, "valid ack from a foreign address ignored");
                        }
                    }
                    Err(e) => {
                        forged += 1;
                        if forged <= LOGGED_FORGERIES {
                            warn!(from = %from, error = %e, "invalid ack ignored");
                        }
                    }
                }
            }
        };
        // Meanwhile watch the page: a guest that rejected the payload says
        // so there, and the fallback can start at once.
        let rejected = async {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                // Raw fields, not read_header(): a page the guest rejected
                // may carry a header we can't parse either (wrong version).
                if let Some(p) = self.read_page()
                    && raw_u32(&p, forkvm_mailbox::OFF_STATE)
                        == Some(forkvm_mailbox::MailboxState::Rejected.to_word())
                    && p.get(forkvm_mailbox::OFF_MARKER..forkvm_mailbox::OFF_MARKER + 16)
                        == Some(&self.marker.0[..])
                {
                    return format!(
                        "guest rejected the mailbox payload (code {})",
                        raw_u32(&p, forkvm_mailbox::OFF_REJECT_CODE).unwrap_or_default()
                    );
                }
            }
        };
        let r = match tokio::time::timeout(timeout, async {
            tokio::select! {
                r = wait => r,
                why = rejected => Err(why),
            }
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(self.timeout_reason(timeout)),
        };
        if forged > 0 {
            if forged > LOGGED_FORGERIES {
                warn!(
                    forged,
                    "more forged or malformed acks ignored than were logged"
                );
            }
            rec.stages_ms.insert("forged_acks".into(), forged as f64);
        }
        if r.is_ok()
            && let Some(g) = self.guest_report()
        {
            rec.stages_ms.insert(
                "guest_signal_to_applied".into(),
                g.applied_us as f64 / 1000.0,
            );
        }
        r
    }

    /// Why no ack came: the guest may have said so in the page.
    fn timeout_reason(&self, timeout: Duration) -> String {
        let page = self.read_page();
        match page.as_deref().map(forkvm_mailbox::read_header) {
            Some(Ok(h)) if h.state == forkvm_mailbox::MailboxState::Rejected => format!(
                "guest rejected the mailbox payload (code {})",
                h.guest.reject_code
            ),
            Some(Ok(h)) if h.state == forkvm_mailbox::MailboxState::Written => {
                format!("guest did not pick up the mailbox within {timeout:?}")
            }
            _ => format!("no valid mailbox ack within {timeout:?}"),
        }
    }

    fn read_page(&self) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&self.mem_path).ok()?;
        let mut page = vec![0u8; forkvm_mailbox::PAGE_SIZE];
        f.read_exact_at(&mut page, self.offset).ok()?;
        Some(page)
    }

    /// The guest's own timings, written into the page before it acked.
    fn guest_report(&self) -> Option<forkvm_mailbox::GuestReport> {
        let page = self.read_page()?;
        let h = forkvm_mailbox::read_header(&page).ok()?;
        (h.guest.outcome_generation == self.generation).then_some(h.guest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkvm_mailbox::{AckKey, MacAddr, MarkerId, ack_encode};
    use std::net::Ipv4Addr;

    /// A handoff waiting on loopback, as if the fork's new address were
    /// 127.0.0.1; the page file is empty (no guest report).
    async fn listener(timeout: Duration) -> (MailboxHandoff, u16, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        std::fs::write(&mem, vec![0u8; 8192]).unwrap();
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let h = MailboxHandoff {
            socket,
            key: AckKey([7; 32]),
            generation: 42,
            mac: "02:fc:00:00:00:01".parse().unwrap(),
            ip: Ipv4Addr::LOCALHOST,
            mem_path: mem,
            offset: 0,
            marker: MarkerId([1; 16]),
            ack_timeout: timeout,
        };
        (h, port, dir)
    }

    async fn send_all(port: u16, datagrams: Vec<Vec<u8>>) {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for d in datagrams {
            let _ = s.send_to(&d, ("127.0.0.1", port)).await;
        }
    }

    fn forgeries(mac: MacAddr) -> Vec<Vec<u8>> {
        let ip = Ipv4Addr::LOCALHOST;
        let mut v = vec![
            ack_encode(&AckKey([8; 32]), 42, mac, ip), // wrong key
            ack_encode(&AckKey([7; 32]), 41, mac, ip), // stale generation
            ack_encode(
                &AckKey([7; 32]),
                42,
                "02:fc:00:00:00:02".parse().unwrap(),
                ip,
            ), // other MAC
            ack_encode(&AckKey([7; 32]), 42, mac, Ipv4Addr::new(10, 0, 0, 9)), // other IP
            vec![],
            vec![0xff; 200],
        ];
        let mut long = ack_encode(&AckKey([7; 32]), 42, mac, ip);
        long.push(0);
        v.push(long); // trailing byte
        // A flood of garbage.
        v.extend((0..100u32).map(|i| i.to_le_bytes().repeat(15)));
        v
    }

    #[tokio::test]
    async fn forged_and_flooded_acks_are_ignored_and_counted() {
        let (h, port, _d) = listener(Duration::from_secs(10)).await;
        let mac = h.mac;
        let mut all = forgeries(mac);
        // The guest retransmits its ack; so does this sender.
        for _ in 0..3 {
            all.push(ack_encode(&AckKey([7; 32]), 42, mac, Ipv4Addr::LOCALHOST));
        }
        let sender = tokio::spawn(send_all(port, all));
        let mut rec = HandoffRecord::default();
        h.wait_ack(&mut rec)
            .await
            .expect("valid ack after forgeries");
        sender.await.unwrap();
        // Loopback may drop part of the flood; what arrived before the valid
        // ack was counted.
        assert!(
            rec.stages_ms.get("forged_acks").copied().unwrap_or(0.0) >= 1.0,
            "{rec:?}"
        );
    }

    #[tokio::test]
    async fn only_forgeries_never_complete_the_handoff() {
        let (h, port, _d) = listener(Duration::from_millis(700)).await;
        tokio::spawn(send_all(port, forgeries(h.mac)));
        let mut rec = HandoffRecord::default();
        let err = h
            .wait_ack(&mut rec)
            .await
            .expect_err("forged acks completed a handoff");
        assert!(err.contains("no valid mailbox ack"), "{err}");
        assert!(rec.stages_ms.get("forged_acks").copied().unwrap_or(0.0) > 0.0);
    }

    #[test]
    fn q35_address_map() {
        assert_eq!(gpa_to_offset(0x1000, 256), Some(0x1000));
        assert_eq!(gpa_to_offset(256 << 20, 256), None);
        // 4 GiB guest: 2 GiB below the hole, the rest from 4 GiB up.
        assert_eq!(gpa_to_offset(0x7fff_f000, 4096), Some(0x7fff_f000));
        assert_eq!(gpa_to_offset(0x9000_0000, 4096), None);
        assert_eq!(gpa_to_offset(1 << 32, 4096), Some(0x8000_0000));
        assert_eq!(gpa_to_offset((1 << 32) + (2 << 30), 4096), None);
    }
}
