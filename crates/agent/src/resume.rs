//! The resume watcher: notices that the host wrote a payload into the mailbox
//! page (a fork was resumed), validates it and applies the new identity —
//! network (through the same plan as ReconfigureNetwork), RNG seed, clock —
//! records the outcome in the page, sends the authenticated ack from the new
//! address and re-arms with a fresh marker. It runs on its own real-time
//! thread ([`spawn_watcher`]) so a resumed fork's other work doesn't delay it.
//!
//! Wake sources; each wake costs one volatile load of the page's state word
//! unless it reads WRITTEN:
//! * SIGIO: raised on port events and ordinary port traffic. On the watcher's
//!   own thread this is the first wake of a restored fork, 20–100 ms before
//!   the port event below reaches the main runtime.
//! * a host connect/disconnect seen by the port code ([`crate::port::host_events`]);
//!   followed by a short bounded poll.
//! * `/dev/kmsg`: the kernel's `crng reseeded due to virtual machine fork`
//!   (VMGenID) line; followed by a short bounded poll.
//! * a 1 s periodic check, the last resort (it also re-checks the GPA and
//!   keeps the link hint fresh).

use std::collections::VecDeque;
use std::fs::File;
use std::io::IoSlice;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use forkvm_mailbox::{AckTarget, GuestReport, MacAddr, MailboxError, MailboxState, Payload, Seed};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::mailbox::{self, Mailbox, REJECT_APPLY_FAILED, REJECT_DUPLICATE_GENERATION};
use crate::netconf::{self, ApplyReport, LinkHint, NetDesired};
use crate::rpc::AgentState;

/// Boot env flag: arm and report the mailbox but never apply a payload (the
/// host's "guest never acks" fallback test).
pub const DISABLE_MAILBOX_ENV: &str = "FORKVM_AGENT_DISABLE_MAILBOX";
/// How many payload-less wakes are remembered for the next payload's log.
const MISSES_KEPT: usize = 4;
/// Last-resort poll interval.
pub const PERIODIC_CHECK: Duration = Duration::from_secs(1);
/// After a VMGenID kmsg wake that found no payload yet: poll this often...
const KMSG_FOLLOWUP_EVERY: Duration = Duration::from_millis(2);
/// ...for at most this long.
const KMSG_FOLLOWUP_FOR: Duration = Duration::from_millis(50);
/// How long a rejection stays on the page (the host polls for it) before the
/// agent re-arms with a new marker. An applied payload re-arms at once.
pub const REARM_DELAY: Duration = Duration::from_secs(1);
/// Ack send times after the identity is applied. No reply channel exists, so
/// the whole schedule is sent: the first frames on a fresh bridge port (or
/// before ARP resolves) can be lost.
pub const ACK_SCHEDULE_MS: [u64; 6] = [0, 10, 30, 100, 300, 1000];
/// The link hint is re-read every this many periodic checks (the gateway's
/// neighbour entry comes and goes with traffic).
const HINT_REFRESH_TICKS: u32 = 10;
/// The kernel's VMGenID reseed message (drivers/char/random.c).
const VMGENID_LINE: &[u8] = b"crng reseeded due to virtual machine fork";

/// `_IOW('R', 0x03, int[2])`: add entropy, credited.
const RNDADDENTROPY: u64 = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG now.
const RNDRESEEDCRNG: u64 = 0x5207;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    PortEvent,
    Sigio,
    Kmsg,
    Periodic,
}

/// Guest `CLOCK_MONOTONIC` in µs (the clock of the page's guest report).
pub fn monotonic_us() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64)
            .saturating_mul(1_000_000)
            .saturating_add(t.tv_nsec() as u64 / 1000),
        Err(_) => 0,
    }
}

fn us_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The interface a payload re-addresses and its gateway: the boot network's
/// until a payload names others.
#[derive(Clone, Debug)]
pub struct Watched {
    pub interface: String,
    pub gateway: Option<Ipv4Addr>,
}

/// Keeps a [`LinkHint`] for the watched interface fresh while idle, so a
/// payload's apply needs no link read on the fork's cold vCPU.
struct HintKeeper {
    watched: Option<Watched>,
    hint: Option<LinkHint>,
    ticks: u32,
}

impl HintKeeper {
    async fn refresh(&mut self, handle: &rtnetlink::Handle) {
        let Some(w) = &self.watched else { return };
        match netconf::read_hint(handle, &w.interface, w.gateway, self.hint.as_ref()).await {
            Ok(h) => self.hint = Some(h),
            Err(e) => {
                debug!(error = %e, interface = %w.interface, "link hint not read");
                self.hint = None;
            }
        }
    }

    async fn tick(&mut self, handle: &rtnetlink::Handle) {
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(HINT_REFRESH_TICKS) {
            self.refresh(handle).await;
        }
    }
}

/// The socket acks leave from: made once at start, so every fork inherits it
/// ready (a socket's creation and bind cost tens of ms on a cold TCG fork).
/// Bound to the wildcard address; each datagram names its source address.
fn ack_socket() -> std::io::Result<Arc<UdpSocket>> {
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

/// Real-time priority of the watcher thread (SCHED_FIFO, low end of 1..=99).
const WATCHER_RT_PRIORITY: libc::c_int = 10;

/// Starts the watcher on its own thread, with its own current-thread runtime
/// and netlink socket, at real-time priority: on a freshly resumed fork the
/// vCPU is busy with the restore's other work (the dead host connection's
/// teardown, port events, inherited processes), and the handoff should not
/// queue behind it. The thread sleeps between wakes, so the priority costs
/// an idle VM nothing; the kernel's RT throttling bounds a runaway.
pub fn spawn_watcher(
    state: Arc<AgentState>,
    mb: Arc<Mailbox>,
    watched: Option<Watched>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("resume-watch".into())
        .spawn(move || {
            let param = libc::sched_param {
                sched_priority: WATCHER_RT_PRIORITY,
            };
            // SAFETY: pid 0 = the calling thread; `param` is a valid sched_param.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) } != 0 {
                warn!(
                    error = %std::io::Error::last_os_error(),
                    "resume watcher stays at normal priority"
                );
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "no runtime for the resume watcher; forks fall back to RPC");
                    return;
                }
            };
            rt.block_on(async move {
                match rtnetlink::new_connection() {
                    Ok((conn, netlink, _)) => {
                        tokio::spawn(conn);
                        run(state, mb, watched, netlink).await;
                    }
                    Err(e) => {
                        warn!(error = %e, "no netlink socket for the resume watcher; forks fall back to RPC");
                    }
                }
            });
        })
        .map(|_| ())
}

/// Runs forever: waits for wakes and handles WRITTEN pages. `netlink` is
/// the watcher's own connection (see [`spawn_watcher`]).
async fn run(
    state: Arc<AgentState>,
    mb: Arc<Mailbox>,
    watched: Option<Watched>,
    netlink: rtnetlink::Handle,
) {
    let disabled = state.boot_env.get(DISABLE_MAILBOX_ENV).map(String::as_str) == Some("1");
    if disabled {
        info!("mailbox apply disabled by boot env; payloads will be left unapplied");
    }
    let mut wakes = WakeSources::new();
    let mut watcher = Watcher::start(state, mb, watched, netlink, disabled).await;
    loop {
        let wake = wakes.next().await;
        let Some(seen) = watcher.look(wake).await else {
            continue;
        };
        if watcher.ignore_if_disabled(wake) {
            continue;
        }
        if !watcher.take(seen).await {
            watcher.rearm_later().await;
        }
    }
}

/// What wakes the watcher; a source that fails is dropped (logged).
struct WakeSources {
    sigio: Option<Signal>,
    kmsg: Option<mpsc::Receiver<()>>,
    tick: tokio::time::Interval,
}

impl WakeSources {
    fn new() -> Self {
        let sigio = match signal(SignalKind::io()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "no SIGIO stream; resume watcher relies on kmsg and polling");
                None
            }
        };
        let kmsg = spawn_kmsg_reader();
        let mut tick = tokio::time::interval(PERIODIC_CHECK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self { sigio, kmsg, tick }
    }

    async fn next(&mut self) -> Wake {
        tokio::select! {
            // Fixed order so the logged wake is the earliest-class source.
            biased;
            () = crate::port::host_events().notified() => Wake::PortEvent,
            () = next_sigio(&mut self.sigio) => Wake::Sigio,
            () = next_kmsg(&mut self.kmsg) => Wake::Kmsg,
            _ = self.tick.tick() => Wake::Periodic,
        }
    }
}

/// The watcher's state between wakes.
struct Watcher {
    state: Arc<AgentState>,
    mb: Arc<Mailbox>,
    netlink: rtnetlink::Handle,
    /// [`DISABLE_MAILBOX_ENV`]: payloads are seen but left unapplied.
    disabled: bool,
    told_disabled: bool,
    link: HintKeeper,
    ack_sock: Option<Arc<UdpSocket>>,
    /// Recent wakes that found no payload (kind, µs, state word), logged with
    /// the next payload: shows which signal fired first and what it saw.
    misses: VecDeque<(Wake, u64, u32)>,
}

impl Watcher {
    /// Reads the link hint and makes the ack socket, before any payload.
    async fn start(
        state: Arc<AgentState>,
        mb: Arc<Mailbox>,
        watched: Option<Watched>,
        netlink: rtnetlink::Handle,
        disabled: bool,
    ) -> Self {
        let mut link = HintKeeper {
            watched,
            hint: None,
            ticks: 0,
        };
        link.refresh(&netlink).await;
        let ack_sock = ack_socket()
            .inspect_err(|e| warn!(error = %e, "no ack socket yet; made when a payload comes"))
            .ok();
        Self {
            state,
            mb,
            netlink,
            disabled,
            told_disabled: false,
            link,
            ack_sock,
            misses: VecDeque::with_capacity(MISSES_KEPT),
        }
    }

    /// Reads the page's state word at a wake. `Some` when there is a payload
    /// to handle (WRITTEN, or a clobbered page that decode will reject).
    /// Without one, a periodic wake does the idle upkeep and a kmsg or port
    /// wake polls briefly; other wakes that still find none are remembered.
    async fn look(&mut self, wake: Wake) -> Option<Seen> {
        let mut seen = Instant::now();
        let mut seen_us = monotonic_us();
        let mut word = self.mb.state_word();
        if wake == Wake::Periodic && word != MailboxState::WRITTEN_WORD {
            if let Err(e) = self.mb.check_gpa() {
                debug!(error = %e, "GPA re-check failed");
            }
            self.link.tick(&self.netlink).await;
        }
        if matches!(wake, Wake::Kmsg | Wake::PortEvent) && word != MailboxState::WRITTEN_WORD {
            // A resume-like event; a host patch may become visible a moment
            // later. Bounded, and port events are once per host connection.
            let end = Instant::now() + KMSG_FOLLOWUP_FOR;
            while word != MailboxState::WRITTEN_WORD && Instant::now() < end {
                tokio::time::sleep(KMSG_FOLLOWUP_EVERY).await;
                word = self.mb.state_word();
            }
            seen = Instant::now();
            seen_us = monotonic_us();
        }
        match word {
            MailboxState::WRITTEN_WORD => {}
            // Armed and idle, an outcome awaiting re-arm, or never armed.
            MailboxState::EMPTY_WORD
            | MailboxState::APPLIED_WORD
            | MailboxState::REJECTED_WORD
            | 0 => {
                if wake != Wake::Periodic {
                    if self.misses.len() == MISSES_KEPT {
                        self.misses.pop_front();
                    }
                    self.misses.push_back((wake, seen_us, word));
                }
                return None;
            }
            // Anything else is a clobbered page: decode rejects it below.
            _ => {}
        }
        Some(Seen {
            wake,
            at: seen,
            us: seen_us,
        })
    }

    /// True (and said once) when apply is disabled: the payload stays WRITTEN.
    fn ignore_if_disabled(&mut self, wake: Wake) -> bool {
        if self.disabled && !self.told_disabled {
            info!(
                ?wake,
                "mailbox payload seen but apply is disabled; ignoring"
            );
            self.told_disabled = true;
        }
        self.disabled
    }

    /// Handles the payload and updates the interface the link hint follows.
    /// Handles a WRITTEN page; true when the identity was applied (and the
    /// page re-armed at once).
    async fn take(&mut self, seen: Seen) -> bool {
        self.state.crash_if_asked();
        if self.ack_sock.is_none() {
            self.ack_sock = ack_socket()
                .inspect_err(|e| warn!(error = %e, "ack socket failed; no ack sent"))
                .ok();
        }
        // `handle` logs the payload once the ack is out: nothing slow before it.
        let applied = handle(
            &self.state,
            &self.netlink,
            &self.mb,
            seen,
            self.link.hint.as_ref(),
            self.ack_sock.clone(),
        )
        .await;
        if !self.misses.is_empty() {
            info!(misses = ?self.misses, "wakes before this payload that found none");
            self.misses.clear();
        }
        match applied {
            Some(watched) => {
                self.link.watched = Some(watched);
                true
            }
            None => false,
        }
    }

    /// After a rejected or ignored payload: leaves the outcome on the page
    /// for [`REARM_DELAY`] (the host watches for the rejection), then
    /// re-arms.
    async fn rearm_later(&mut self) {
        tokio::time::sleep(REARM_DELAY).await;
        // The gateway is resolved by now (the ack went through it).
        self.link.refresh(&self.netlink).await;
        match self.mb.rearm() {
            Ok((marker, gpa)) => info!(
                marker = %mailbox::hex(&marker.0),
                gpa = format_args!("{gpa:#x}"),
                "mailbox re-armed"
            ),
            Err(e) => warn!(error = %e, "mailbox re-arm failed; running without a mailbox"),
        }
    }
}

async fn next_sigio(s: &mut Option<Signal>) {
    if let Some(sig) = s {
        if sig.recv().await.is_some() {
            return;
        }
        *s = None;
    }
    std::future::pending().await
}

async fn next_kmsg(rx: &mut Option<mpsc::Receiver<()>>) {
    if let Some(r) = rx {
        if r.recv().await.is_some() {
            return;
        }
        // Reader thread ended (already logged why).
        *rx = None;
    }
    std::future::pending().await
}

/// When and how a payload was noticed.
#[derive(Clone, Copy, Debug)]
struct Seen {
    wake: Wake,
    at: Instant,
    /// Guest `CLOCK_MONOTONIC` µs (the page's guest report clock).
    us: u64,
}

/// Validates and applies the WRITTEN page, recording the outcome in it.
/// Returns the interface and gateway it applied, for the link hint.
///
/// Critical path, in order: decode, network (without the deferrable steps),
/// outcome into the page, first ack. The RNG seed, the deferred steps
/// (gratuitous ARP, resolv.conf, hostname), the clock and all logging follow
/// the first ack. The kernel's VMGenID handler has already reseeded its RNG
/// by the time the agent runs; the host's seed is mixed in on top.
async fn handle(
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
        rng_seed,
        ack,
        ..
    } = payload;
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
        host_time_unix_ns,
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
    host_time_unix_ns: u64,
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
        let rng_result = feed_rng(&self.rng_seed);
        self.rng_seed.0.fill(0);
        if let Err(e) = state.finish_network(netlink, &mut self.report).await {
            warn!(error = %e, generation = self.generation, "mailbox ARP/resolv.conf/hostname apply failed");
        }
        if let Err(e) = set_realtime(self.host_time_unix_ns) {
            warn!(error = %e, "stepping the clock to the host time failed");
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

/// Mixes the host's seed into the kernel RNG and forces a reseed, so this
/// fork's RNG diverges from its siblings before the VMGenID handler runs.
fn feed_rng(seed: &Seed) -> std::io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    #[repr(C)]
    struct RandPoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u32; 8],
    }
    let mut info = RandPoolInfo {
        entropy_count: 256,
        buf_size: 32,
        buf: [0; 8],
    };
    for (w, chunk) in info.buf.iter_mut().zip(seed.as_bytes().chunks_exact(4)) {
        *w = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    let f = File::options().write(true).open("/dev/random")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info with buf_size bytes of
    // buffer, which `info` provides; the fd is valid.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, &raw const info) };
    info.buf.fill(0);
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_realtime(unix_ns: u64) -> nix::Result<()> {
    let secs = i64::try_from(unix_ns / 1_000_000_000).map_err(|_| nix::errno::Errno::EINVAL)?;
    let ts = nix::sys::time::TimeSpec::new(secs, (unix_ns % 1_000_000_000) as i64);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
}

/// Starts a thread that follows `/dev/kmsg` from its current end and sends a
/// wake for each VMGenID line. Memory is bounded: one record buffer and a
/// 4-slot channel (extra wakes are dropped; one pending is enough).
fn spawn_kmsg_reader() -> Option<mpsc::Receiver<()>> {
    let mut f = match File::open("/dev/kmsg") {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "cannot open /dev/kmsg; no VMGenID wake");
            return None;
        }
    };
    // Only lines logged from now on matter (an old fork line is history).
    if let Err(e) = f.seek(SeekFrom::End(0)) {
        warn!(error = %e, "cannot seek /dev/kmsg to its end; no VMGenID wake");
        return None;
    }
    let (tx, rx) = mpsc::channel(4);
    let spawned = std::thread::Builder::new()
        .name("kmsg-watch".into())
        .spawn(move || {
            // A kmsg record is at most ~1 KiB of text plus its prefix.
            let mut buf = vec![0u8; 8192];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => {
                        warn!("/dev/kmsg returned EOF; VMGenID watch stops");
                        return;
                    }
                    Ok(n) => {
                        if buf[..n]
                            .windows(VMGENID_LINE.len())
                            .any(|w| w == VMGENID_LINE)
                            && let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(())
                        {
                            return;
                        }
                    }
                    // EPIPE: records were overwritten before we read them.
                    Err(e)
                        if e.raw_os_error() == Some(libc::EPIPE)
                            || e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!(error = %e, "reading /dev/kmsg failed; VMGenID watch stops");
                        return;
                    }
                }
            }
        });
    match spawned {
        Ok(_) => Some(rx),
        Err(e) => {
            warn!(error = %e, "cannot start the kmsg thread; no VMGenID wake");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_uapi() {
        // _IOC(dir, type, nr, size) = dir<<30 | size<<16 | type<<8 | nr
        let iow = (1u64 << 30) | (8 << 16) | (u64::from(b'R') << 8) | 0x03;
        assert_eq!(RNDADDENTROPY, iow);
        assert_eq!(RNDRESEEDCRNG, (u64::from(b'R') << 8) | 0x07);
        assert_eq!(std::mem::size_of::<[u32; 8]>(), 32);
    }

    #[test]
    fn ack_schedule_is_increasing_and_bounded() {
        assert!(ACK_SCHEDULE_MS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ACK_SCHEDULE_MS[0], 0);
        assert!(ACK_SCHEDULE_MS[ACK_SCHEDULE_MS.len() - 1] <= 1000);
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_us();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_us();
        assert!(a > 0 && b >= a + 2000, "{a} {b}");
    }
}
