//! Applying a WRITTEN mailbox page on the fork's hot path: decode → clock
//! step → network → outcome into the page → first ack → re-arm; then, off
//! the critical path, the remaining acks, the RNG seed and the deferred
//! network steps (and an older host's absolute clock).

use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use forkvm_mailbox::{AckTarget, GuestReport, MacAddr, MailboxError, Payload, Seed};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Seen, Watched, us_since};
use crate::mailbox::{self, Mailbox, REJECT_APPLY_FAILED, REJECT_DUPLICATE_GENERATION};
use crate::netconf::{self, ApplyReport, LinkHint, NetDesired};
use crate::rpc::AgentState;

/// Ack send times after the identity is applied. No reply channel exists, so
/// the whole schedule is sent: the first frames on a fresh bridge port (or
/// before ARP resolves) can be lost.
pub const ACK_SCHEDULE_MS: [u64; 6] = [0, 10, 30, 100, 300, 1000];

/// The socket acks leave from: made once at start, so every fork inherits it
/// ready (a socket's creation and bind cost tens of ms on a cold TCG fork).
/// Bound to the wildcard address; each datagram names its source address.
pub(super) fn ack_socket() -> std::io::Result<Arc<UdpSocket>> {
    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    s.set_nonblocking(true)?;
    Ok(Arc::new(s))
}

/// One ack datagram from `from` (`IP_PKTINFO`) to `to`; never blocks.
fn send_ack(sock: &UdpSocket, msg: &[u8], from: Ipv4Addr, to: SocketAddrV4) -> nix::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrIn, sendmsg};
    let info = libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: libc::in_addr {
            s_addr: u32::from(from).to_be(),
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    let dest = SockaddrIn::from(to);
    sendmsg(
        sock.as_raw_fd(),
        &[IoSlice::new(msg)],
        &[ControlMessage::Ipv4PacketInfo(&info)],
        MsgFlags::empty(),
        Some(&dest),
    )
    .map(|_| ())
}

/// Validates and applies the WRITTEN page, recording the outcome in it.
/// Returns the interface and gateway it applied, for the link hint.
///
/// Critical path, in order: decode, clock step, network (without the
/// deferrable steps), outcome into the page, first ack. The RNG seed, the
/// deferred steps (gratuitous ARP, resolv.conf, hostname) and all logging follow
/// the first ack. The kernel's VMGenID handler has already reseeded its RNG
/// by the time the agent runs; the host's seed is mixed in on top.
pub(super) async fn handle(
    state: &AgentState,
    netlink: &rtnetlink::Handle,
    mb: &Mailbox,
    seen: Seen,
    hint: Option<&LinkHint>,
    ack_sock: Option<Arc<UdpSocket>>,
) -> Option<Watched> {
    let page = Handoff::new(mb, seen);
    let Accepted {
        generation,
        payload,
        desired,
        decoded_us,
    } = page.accept()?;
    // The network fields now live in `desired`; the rest is for after it.
    let Payload {
        mac,
        ipv4,
        host_time_unix_ns,
        clock_behind_ns,
        rng_seed,
        ack,
        ..
    } = payload;
    // First of all: one syscall, and nothing the fork runs from here on
    // should see the snapshot's time.
    let clock = match clock_behind_ns {
        Some(behind) => Clock::Stepped(step_realtime(behind)),
        None => Clock::SetLater(host_time_unix_ns),
    };
    // Only what the new address needs; the rest runs after the first ack.
    let report = match state.configure_network_part(netlink, &desired, hint).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, generation, "mailbox network apply failed");
            page.reject(REJECT_APPLY_FAILED);
            return None;
        }
    };
    let applied_us = us_since(seen.at);

    // The outcome goes into the page before the first ack leaves: the host
    // reads the guest report as soon as the ack arrives.
    let marked = page.mark_applied(generation, applied_us);
    let first_ack = page.send_first_ack(ack, generation, mac, ipv4, ack_sock.as_deref());
    // Re-armed before the host can act on the ack, so this VM is forkable
    // through the mailbox the moment its fork call returns (the guest
    // report stays on the page for the host).
    match mb.rearm() {
        Ok((marker, gpa)) => info!(
            marker = %mailbox::hex(&marker.0),
            gpa = format_args!("{gpa:#x}"),
            "mailbox re-armed"
        ),
        Err(e) => warn!(error = %e, "mailbox re-arm failed; running without a mailbox"),
    }

    // Everything below is off the ack's critical path.
    let applied = Applied {
        seen,
        generation,
        mac,
        ipv4,
        clock,
        rng_seed,
        decoded_us,
        applied_us,
        desired,
        report,
        marked,
    };
    Some(applied.finish(state, netlink, first_ack, ack_sock).await)
}

/// The WRITTEN page [`handle`] works on: when it was seen, and the generation
/// field it carried before decoding (what a rejection reports).
struct Handoff<'a> {
    mb: &'a Mailbox,
    seen: Seen,
    page_generation: u64,
}

/// A payload that passed every check.
struct Accepted {
    generation: u64,
    payload: Payload,
    /// The payload's network fields, as the planner takes them.
    desired: NetDesired,
    /// µs from the wake to the end of decoding.
    decoded_us: u64,
}

/// The first ack as it left (or did not): the resends reuse its datagram.
struct FirstAck {
    msg: Vec<u8>,
    to: SocketAddrV4,
    /// µs from the wake to the send.
    sent_us: nix::Result<u64>,
}

impl<'a> Handoff<'a> {
    fn new(mb: &'a Mailbox, seen: Seen) -> Self {
        Self {
            mb,
            seen,
            page_generation: mb.raw_generation(),
        }
    }

    /// Marks the page REJECTED with `code`; the network is left untouched.
    fn reject(&self, code: u32) {
        let report = GuestReport {
            signal_seen_us: self.seen.us,
            applied_us: us_since(self.seen.at),
            outcome_generation: self.page_generation,
            reject_code: code,
        };
        if let Err(e) = self.mb.mark_rejected(&report) {
            warn!(error = %e, "marking the mailbox REJECTED failed");
        }
    }

    /// Decodes the page against the current marker and checks the payload
    /// (new generation, the agent's own network rules); rejects it if not.
    fn accept(&self) -> Option<Accepted> {
        let (generation, payload) = match self.mb.decode() {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, code = e.code(), generation = self.page_generation, wake = ?self.seen.wake, "mailbox payload rejected");
                self.reject(e.code());
                return None;
            }
        };
        if self.mb.already_applied(generation) {
            warn!(generation, "mailbox generation already applied; ignored");
            self.reject(REJECT_DUPLICATE_GENERATION);
            return None;
        }
        let decoded_us = us_since(self.seen.at);
        // Typed all the way: the decoder already parsed and validated the
        // payload; the agent's own rules are re-checked on the typed fields.
        let desired = match NetDesired::from_payload(&payload) {
            Ok(d) => d,
            Err(e) => {
                // The mailbox validation is stricter; this would be a bug.
                warn!(error = %e, generation, "payload passed mailbox validation but not the net check");
                self.reject(REJECT_APPLY_FAILED);
                return None;
            }
        };
        Some(Accepted {
            generation,
            payload,
            desired,
            decoded_us,
        })
    }

    /// Marks the page APPLIED with the guest report; the result is logged
    /// after the first ack.
    fn mark_applied(&self, generation: u64, applied_us: u64) -> Result<(), MailboxError> {
        let outcome = GuestReport {
            signal_seen_us: self.seen.us,
            applied_us,
            outcome_generation: generation,
            reject_code: 0,
        };
        self.mb.mark_applied(&outcome)
    }

    /// Sends the first ack from the new address, inline; zeroes the key copy.
    fn send_first_ack(
        &self,
        mut ack: AckTarget,
        generation: u64,
        mac: MacAddr,
        ipv4: Ipv4Addr,
        sock: Option<&UdpSocket>,
    ) -> FirstAck {
        let msg = forkvm_mailbox::ack_encode(&ack.key, generation, mac, ipv4);
        ack.key.0.fill(0);
        let to = SocketAddrV4::new(ack.ip, ack.port);
        let sent_us = match sock {
            Some(sock) => send_ack(sock, &msg, ipv4, to).map(|()| us_since(self.seen.at)),
            None => Err(nix::errno::Errno::ENOTSOCK),
        };
        FirstAck { msg, to, sent_us }
    }
}

/// An applied payload after its first ack: what the rest of [`handle`] does
/// and logs.
struct Applied {
    seen: Seen,
    generation: u64,
    mac: MacAddr,
    ipv4: Ipv4Addr,
    clock: Clock,
    rng_seed: Seed,
    decoded_us: u64,
    applied_us: u64,
    desired: NetDesired,
    report: ApplyReport,
    /// Marking the page APPLIED, reported here rather than before the ack.
    marked: Result<(), MailboxError>,
}

impl Applied {
    /// The steps off the ack's critical path: the ack resends, the RNG seed,
    /// the deferred network steps, the clock, then the log lines.
    async fn finish(
        mut self,
        state: &AgentState,
        netlink: &rtnetlink::Handle,
        first_ack: FirstAck,
        ack_sock: Option<Arc<UdpSocket>>,
    ) -> Watched {
        let FirstAck { msg, to, sent_us } = first_ack;
        if let Some(sock) = ack_sock {
            tokio::spawn(resend_acks(sock, msg, self.ipv4, to, self.generation));
        }
        let rng_result = crate::identity::feed_rng(&self.rng_seed.0);
        self.rng_seed.0.fill(0);
        crate::identity::renew_machine_id();
        if let Err(e) = state.finish_network(netlink, &mut self.report).await {
            warn!(error = %e, generation = self.generation, "mailbox ARP/resolv.conf/hostname apply failed");
        }
        match self.clock {
            Clock::Stepped(Ok(())) => {}
            Clock::Stepped(Err(e)) => warn!(error = %e, "stepping the clock forward failed"),
            Clock::SetLater(unix_ns) => {
                if let Err(e) = set_realtime(unix_ns) {
                    warn!(error = %e, "setting the clock to the host time failed");
                }
            }
        }
        if let Err(e) = &self.marked {
            warn!(error = %e, "marking the mailbox APPLIED failed");
        }
        if let Err(e) = rng_result {
            warn!(error = %e, "feeding the RNG seed to the kernel failed");
        }
        if let Err(e) = &sent_us {
            warn!(error = %e, %to, "first ack not sent; the later ones may be");
        }
        self.log(sent_us.ok());
        Watched {
            interface: self.desired.interface,
            gateway: self.desired.gateway,
        }
    }

    fn log(&self, first_ack_us: Option<u64>) {
        info!(
            wake = ?self.seen.wake,
            signal_seen_us = self.seen.us,
            host_event_us = crate::port::last_host_event_us(),
            "mailbox payload seen"
        );
        netconf::log_configured(&self.desired, &self.report);
        info!(
            generation = self.generation,
            decoded_us = self.decoded_us,
            applied_us = self.applied_us,
            first_ack_us,
            link_read = self.report.link_read,
            netlink_us = self.report.elapsed_us,
            step_us = ?self.report.step_us,
            steps = ?self.report.steps,
            ipv4 = %self.ipv4,
            mac = %self.mac,
            "mailbox identity applied"
        );
    }
}

/// Sends the rest of [`ACK_SCHEDULE_MS`] (the first went out inline).
async fn resend_acks(
    sock: Arc<UdpSocket>,
    msg: Vec<u8>,
    from: Ipv4Addr,
    to: SocketAddrV4,
    generation: u64,
) {
    let start = Instant::now();
    let mut sent = 0;
    for ms in ACK_SCHEDULE_MS.into_iter().skip(1) {
        tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
        match send_ack(&sock, &msg, from, to) {
            Ok(()) => sent += 1,
            Err(e) => debug!(error = %e, at_ms = ms, "ack send failed"),
        }
    }
    info!(generation, %to, resent = sent, "ack schedule done");
}

/// What the payload asks of the clock.
enum Clock {
    /// Stepped forward by `clock_behind_ns` on receipt (the outcome).
    Stepped(nix::Result<()>),
    /// An older host's absolute time, set off the critical path.
    SetLater(u64),
}

/// CLOCK_REALTIME forward by `behind_ns`. Relative, so the time the fork
/// has run since resume is kept (an absolute host time taken before resume
/// would set it back by the resume and wake-up).
fn step_realtime(behind_ns: u64) -> nix::Result<()> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)?;
    let now_ns = u64::try_from(now.tv_sec())
        .ok()
        .and_then(|s| s.checked_mul(1_000_000_000))
        .and_then(|ns| ns.checked_add(now.tv_nsec() as u64))
        .ok_or(nix::errno::Errno::EINVAL)?;
    set_realtime(
        now_ns
            .checked_add(behind_ns)
            .ok_or(nix::errno::Errno::EINVAL)?,
    )
}

fn set_realtime(unix_ns: u64) -> nix::Result<()> {
    let secs = i64::try_from(unix_ns / 1_000_000_000).map_err(|_| nix::errno::Errno::EINVAL)?;
    let ts = nix::sys::time::TimeSpec::new(secs, (unix_ns % 1_000_000_000) as i64);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_schedule_is_increasing_and_bounded() {
        assert!(ACK_SCHEDULE_MS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ACK_SCHEDULE_MS[0], 0);
        assert!(ACK_SCHEDULE_MS[ACK_SCHEDULE_MS.len() - 1] <= 1000);
    }
}
