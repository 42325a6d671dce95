//! The guest-initiated path: the identity is written into the paused fork's
//! own memory before it resumes, and the guest proves it applied it with an
//! authenticated datagram sent from the new address.

use super::MailboxFallback;
use crate::model::{HandoffRecord, MailboxInfo, Stage};
use crate::netalloc::{GUEST_INTERFACE, Lease};
use chrono::{DateTime, Utc};
use forkvm_mailbox as mbx;
use forkvm_vmm::{Hypervisor, VmHandle};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Forged or malformed acks logged one by one per handoff; more are only counted.
const LOGGED_FORGERIES: u32 = 5;
/// How often the page is read while waiting for the ack (a guest that
/// rejected the payload says so there).
const PAGE_POLL: Duration = Duration::from_millis(10);

/// Everything the mailbox path needs to know before the fork resumes.
pub(crate) struct MailboxPlan<'a> {
    pub info: &'a MailboxInfo,
    /// Host time now (the payload's) and when the snapshot's guest clock
    /// stopped: the guest steps its clock forward by the difference.
    pub now: DateTime<Utc>,
    pub frozen_at: DateTime<Utc>,
    pub lease: &'a Lease,
    pub hostname: &'a str,
    /// Name servers for the guest's resolv.conf.
    pub dns: &'a [Ipv4Addr],
    pub memory_mb: u32,
    pub ack_timeout: Duration,
    /// Test hooks: bind the listener elsewhere, write a forged payload.
    pub ack_bind: Option<Ipv4Addr>,
    pub forgery: Option<mbx::Forgery>,
}

/// Host time from `frozen_at` to `now`, in ns: how far a guest resumed from
/// that snapshot is behind. Never negative (a clock stepped back meanwhile)
/// and never beyond `now` (what the payload's validation allows).
fn clock_behind_ns(now: DateTime<Utc>, frozen_at: DateTime<Utc>) -> u64 {
    let now_ns = now.timestamp_nanos_opt().unwrap_or_default().max(0);
    let behind = (now - frozen_at).num_nanoseconds().unwrap_or(i64::MAX);
    behind.clamp(0, now_ns) as u64
}

/// A payload written into a paused fork, waiting for its ack.
pub(crate) struct MailboxHandoff {
    socket: tokio::net::UdpSocket,
    key: mbx::AckKey,
    generation: u64,
    mac: mbx::MacAddr,
    ip: Ipv4Addr,
    hv: Arc<dyn Hypervisor>,
    vm: VmHandle,
    /// RAM offset of the page.
    offset: u64,
    /// The page we wrote is ours while it carries this marker (the guest
    /// re-arms with a new one after answering).
    marker: mbx::MarkerId,
    ack_timeout: Duration,
}

fn raw_u32(page: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(page.get(off..off + 4)?.try_into().ok()?))
}

fn ack_listener(bind_ip: Ipv4Addr) -> Result<(tokio::net::UdpSocket, u16), MailboxFallback> {
    let listener = |e: std::io::Error| MailboxFallback::AckListener(e.to_string());
    let std_sock =
        std::net::UdpSocket::bind((bind_ip, 0)).map_err(|e| MailboxFallback::AckBind {
            addr: bind_ip,
            error: e.to_string(),
        })?;
    std_sock.set_nonblocking(true).map_err(listener)?;
    let port = std_sock.local_addr().map_err(listener)?.port();
    let socket = tokio::net::UdpSocket::from_std(std_sock).map_err(listener)?;
    Ok((socket, port))
}

/// The armed page, read at the address the agent reported and nowhere else.
/// The agent keeps its page pinned, so a page that is not there was moved
/// or overwritten by the guest: falling back costs that guest one RPC, where
/// searching its memory would cost the host a read of all of it.
async fn locate(
    hv: &dyn Hypervisor,
    vm: &VmHandle,
    plan: &MailboxPlan<'_>,
    marker: &mbx::MarkerId,
) -> Result<(u64, Vec<u8>), MailboxFallback> {
    let gpa = plan.info.gpa;
    let off = hv
        .ram_offset(plan.memory_mb, gpa)
        .ok_or(MailboxFallback::OutsideRam(gpa))?;
    let page = hv
        .read_ram(vm, off, mbx::PAGE_SIZE)
        .await
        .map_err(|e| MailboxFallback::GuestMemory(e.to_string()))?;
    match mbx::verify_marker(&page, marker) {
        Ok(_) => Ok((off, page)),
        Err(e) => {
            warn!(vm = %vm.id, gpa, error = %e, "mailbox page not at its reported address");
            Err(MailboxFallback::MarkerNotFound)
        }
    }
}

impl MailboxHandoff {
    /// While the fork is paused: bind the ack listener on the gateway, find
    /// the armed page and write the payload into the fork's own memory.
    /// `Err` is the reason to fall back.
    pub async fn prepare(
        hv: Arc<dyn Hypervisor>,
        vm: &VmHandle,
        plan: MailboxPlan<'_>,
    ) -> Result<Self, MailboxFallback> {
        let marker = hex::decode(&plan.info.marker)
            .ok()
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(mbx::MarkerId)
            .ok_or_else(|| MailboxFallback::BadMarker(plan.info.marker.clone()))?;
        let lease = plan.lease;
        let (socket, port) = ack_listener(plan.ack_bind.unwrap_or(lease.gateway))?;
        let (offset, mut page) = locate(hv.as_ref(), vm, &plan, &marker).await?;
        let key = mbx::AckKey(rand::random());
        let generation = rand::random::<u64>().max(1);
        let payload = mbx::Payload {
            interface: GUEST_INTERFACE.into(),
            mac: lease.mac,
            ipv4: lease.ip,
            prefix_len: lease.prefix_len,
            gateway: lease.gateway,
            dns: plan.dns.to_vec(),
            hostname: plan.hostname.to_string(),
            host_time_unix_ns: plan.now.timestamp_nanos_opt().unwrap_or_default().max(0) as u64,
            clock_behind_ns: Some(clock_behind_ns(plan.now, plan.frozen_at)),
            rng_seed: mbx::Seed(rand::random()),
            ack: mbx::AckTarget {
                ip: lease.gateway,
                port,
                key: key.clone(),
            },
        };
        match plan.forgery {
            Some(how) => mbx::forge(&mut page, &marker, generation, &payload, how),
            None => mbx::patch(&mut page, &marker, generation, &payload),
        }
        .map_err(|e| MailboxFallback::Patch(e.to_string()))?;
        // The fork is paused: nothing reads the page while it is written.
        hv.write_ram(vm, offset, &page)
            .await
            .map_err(|e| MailboxFallback::GuestMemory(e.to_string()))?;
        Ok(Self {
            socket,
            key,
            generation,
            mac: lease.mac,
            ip: lease.ip,
            hv,
            vm: vm.clone(),
            offset,
            marker,
            ack_timeout: plan.ack_timeout,
        })
    }

    /// After resume: the first valid ack from the fork's new address.
    /// Datagrams are read into a fixed 256-byte buffer and only counted, so
    /// a flood costs CPU, never memory. Forged, stale or malformed
    /// datagrams are counted (`rec.forged_acks`) and ignored.
    pub async fn wait_ack(&self, rec: &mut HandoffRecord) -> Result<(), MailboxFallback> {
        let timeout = self.ack_timeout;
        let mut forged = 0u32;
        let r = match tokio::time::timeout(timeout, async {
            tokio::select! {
                r = self.valid_ack(&mut forged) => r,
                why = self.rejection() => Err(why),
            }
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(self.timeout_reason(timeout).await),
        };
        if forged > LOGGED_FORGERIES {
            warn!(
                forged,
                "more forged or malformed acks ignored than were logged"
            );
        }
        rec.forged_acks += forged;
        if r.is_ok()
            && let Some(g) = self.guest_report().await
        {
            rec.set(Stage::GuestSignalToApplied, g.applied_us as f64 / 1000.0);
        }
        r
    }

    async fn valid_ack(&self, forged: &mut u32) -> Result<(), MailboxFallback> {
        let mut buf = [0u8; 256];
        loop {
            let (n, from) = self
                .socket
                .recv_from(&mut buf)
                .await
                .map_err(|e| MailboxFallback::AckListener(e.to_string()))?;
            let from_fork = from.ip() == std::net::IpAddr::V4(self.ip);
            let verdict = mbx::ack_verify(&buf[..n], &self.key, self.generation, self.mac, self.ip);
            if verdict.is_ok() && from_fork {
                return Ok(());
            }
            // A flooding guest must not flood the log too: the first few are
            // logged, the rest only counted.
            *forged += 1;
            if *forged <= LOGGED_FORGERIES {
                match verdict {
                    Ok(_) => warn!(from = %from, "valid ack from a foreign address ignored"),
                    Err(e) => warn!(from = %from, error = %e, "invalid ack ignored"),
                }
            }
        }
    }

    /// Resolves when the guest marks our payload rejected in the page.
    async fn rejection(&self) -> MailboxFallback {
        let mut tick = tokio::time::interval(PAGE_POLL);
        loop {
            tick.tick().await;
            // Raw fields, not read_header(): a page the guest rejected may
            // carry a header we can't parse either (wrong version).
            if let Some(p) = self.read_page().await
                && raw_u32(&p, mbx::OFF_STATE) == Some(mbx::MailboxState::Rejected.to_word())
                && p.get(mbx::OFF_MARKER..mbx::OFF_MARKER + 16) == Some(&self.marker.0[..])
            {
                return MailboxFallback::Rejected(
                    raw_u32(&p, mbx::OFF_REJECT_CODE).unwrap_or_default(),
                );
            }
        }
    }

    /// Why no ack came: the guest may have said so in the page.
    async fn timeout_reason(&self, timeout: Duration) -> MailboxFallback {
        let page = self.read_page().await;
        match page.as_deref().map(mbx::read_header) {
            Some(Ok(h)) if h.state == mbx::MailboxState::Rejected => {
                MailboxFallback::Rejected(h.guest.reject_code)
            }
            Some(Ok(h)) if h.state == mbx::MailboxState::Written => {
                MailboxFallback::NotPickedUp(timeout)
            }
            _ => MailboxFallback::NoAck(timeout),
        }
    }

    async fn read_page(&self) -> Option<Vec<u8>> {
        self.hv
            .read_ram(&self.vm, self.offset, mbx::PAGE_SIZE)
            .await
            .ok()
    }

    /// The guest's own timings, written into the page before it acked.
    async fn guest_report(&self) -> Option<mbx::GuestReport> {
        let page = self.read_page().await?;
        let h = mbx::read_header(&page).ok()?;
        (h.guest.outcome_generation == self.generation).then_some(h.guest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::FakeHypervisor;
    use forkvm_mailbox::{AckKey, MacAddr, MarkerId, ack_encode};

    /// A handoff waiting on loopback, as if the fork's new address were
    /// 127.0.0.1; its page is blank (no guest report).
    async fn listener(timeout: Duration) -> (MailboxHandoff, u16, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let hv = Arc::new(FakeHypervisor::default());
        let vm = hv.blank_vm(dir.path(), 8192);
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let h = MailboxHandoff {
            socket,
            key: AckKey([7; 32]),
            generation: 42,
            mac: "02:fc:00:00:00:01".parse().unwrap(),
            ip: Ipv4Addr::LOCALHOST,
            hv,
            vm,
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
        assert!(rec.forged_acks >= 1, "{rec:?}");
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
        assert!(matches!(err, MailboxFallback::NoAck(_)), "{err}");
        assert!(err.to_string().contains("no valid mailbox ack"), "{err}");
        assert!(rec.forged_acks > 0);
    }
}
