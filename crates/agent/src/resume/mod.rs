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
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use forkvm_mailbox::MailboxState;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::mailbox::{self, Mailbox};
use crate::netconf::{self, LinkHint};
use crate::rpc::AgentState;

mod apply;

use apply::{ack_socket, handle};

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
/// The link hint is re-read every this many periodic checks (the gateway's
/// neighbour entry comes and goes with traffic).
const HINT_REFRESH_TICKS: u32 = 10;
/// The kernel's VMGenID reseed message (drivers/char/random.c).
const VMGENID_LINE: &[u8] = b"crng reseeded due to virtual machine fork";

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
    fn monotonic_clock_advances() {
        let a = monotonic_us();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_us();
        assert!(a > 0 && b >= a + 2000, "{a} {b}");
    }
}
