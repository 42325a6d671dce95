//! The resume watcher: notices that the host wrote a payload into the mailbox
//! page (a fork was resumed), validates it and applies the new identity —
//! RNG seed, network (through the same path as ReconfigureNetwork), clock —
//! then records the outcome in the page, sends the authenticated ack from the
//! new address and re-arms with a fresh marker.
//!
//! Wake sources, cheapest first; each wake costs one volatile load of the
//! page's state word unless it reads WRITTEN:
//! * SIGIO: a restored QEMU's virtio-serial port raises it ("host
//!   closed/connected") 14–21 ms after `cont`; it also fires on ordinary
//!   port traffic.
//! * `/dev/kmsg`: the kernel's `crng reseeded due to virtual machine fork`
//!   (VMGenID) line, ~15 ms later; followed by a short bounded poll.
//! * a 1 s periodic check, the last resort (it also re-checks the GPA).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use forkvm_mailbox::{AckTarget, GuestReport, MacAddr, MailboxState, Payload, Seed};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::mailbox::{self, Mailbox, REJECT_APPLY_FAILED, REJECT_DUPLICATE_GENERATION};
use crate::netconf::NetRequest;
use crate::rpc::AgentState;

/// Boot env flag: arm and report the mailbox but never apply a payload (the
/// host's "guest never acks" fallback test).
pub const DISABLE_MAILBOX_ENV: &str = "FORKVM_AGENT_DISABLE_MAILBOX";
/// Last-resort poll interval.
pub const PERIODIC_CHECK: Duration = Duration::from_secs(1);
/// After a VMGenID kmsg wake that found no payload yet: poll this often...
const KMSG_FOLLOWUP_EVERY: Duration = Duration::from_millis(2);
/// ...for at most this long.
const KMSG_FOLLOWUP_FOR: Duration = Duration::from_millis(50);
/// How long an outcome stays on the page (for the host to read the guest
/// report) before the agent re-arms with a new marker.
pub const REARM_DELAY: Duration = Duration::from_secs(1);
/// Ack send times after the identity is applied. No reply channel exists, so
/// the whole schedule is sent: the first frames on a fresh bridge port (or
/// before ARP resolves) can be lost.
pub const ACK_SCHEDULE_MS: [u64; 6] = [0, 10, 30, 100, 300, 1000];
/// The kernel's VMGenID reseed message (drivers/char/random.c).
const VMGENID_LINE: &[u8] = b"crng reseeded due to virtual machine fork";

/// `_IOW('R', 0x03, int[2])`: add entropy, credited.
const RNDADDENTROPY: u64 = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG now.
const RNDRESEEDCRNG: u64 = 0x5207;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
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

/// Runs forever: waits for wakes and handles WRITTEN pages.
pub async fn run(state: Arc<AgentState>, mb: Arc<Mailbox>) {
    let disabled = state.boot_env.get(DISABLE_MAILBOX_ENV).map(String::as_str) == Some("1");
    if disabled {
        info!("mailbox apply disabled by boot env; payloads will be left unapplied");
    }
    let mut sigio = match signal(SignalKind::io()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "no SIGIO stream; resume watcher relies on kmsg and polling");
            None
        }
    };
    let mut kmsg = spawn_kmsg_reader();
    let mut tick = tokio::time::interval(PERIODIC_CHECK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut told_disabled = false;
    loop {
        let wake = tokio::select! {
            () = next_sigio(&mut sigio) => Wake::Sigio,
            () = next_kmsg(&mut kmsg) => Wake::Kmsg,
            _ = tick.tick() => Wake::Periodic,
        };
        let mut seen = Instant::now();
        let mut seen_us = monotonic_us();
        if wake == Wake::Periodic
            && let Err(e) = mb.check_gpa()
        {
            debug!(error = %e, "GPA re-check failed");
        }
        let mut word = mb.state_word();
        if wake == Wake::Kmsg && word != MailboxState::WRITTEN_WORD {
            // VMGenID fired; a host patch may become visible a moment later.
            let end = Instant::now() + KMSG_FOLLOWUP_FOR;
            while word != MailboxState::WRITTEN_WORD && Instant::now() < end {
                tokio::time::sleep(KMSG_FOLLOWUP_EVERY).await;
                word = mb.state_word();
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
            | 0 => continue,
            // Anything else is a clobbered page: decode rejects it below.
            _ => {}
        }
        if disabled {
            if !told_disabled {
                info!(
                    ?wake,
                    "mailbox payload seen but apply is disabled; ignoring"
                );
                told_disabled = true;
            }
            continue;
        }
        info!(?wake, signal_seen_us = seen_us, "mailbox payload seen");
        state.crash_if_asked();
        handle(&state, &mb, seen, seen_us).await;
        tokio::time::sleep(REARM_DELAY).await;
        match mb.rearm() {
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

/// Validates and applies the WRITTEN page, recording the outcome in it.
async fn handle(state: &AgentState, mb: &Mailbox, seen: Instant, seen_us: u64) {
    let page_generation = mb.raw_generation();
    let reject = |code: u32| {
        let report = GuestReport {
            signal_seen_us: seen_us,
            applied_us: us_since(seen),
            outcome_generation: page_generation,
            reject_code: code,
        };
        if let Err(e) = mb.mark_rejected(&report) {
            warn!(error = %e, "marking the mailbox REJECTED failed");
        }
    };
    let (generation, payload) = match mb.decode() {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, code = e.code(), generation = page_generation, "mailbox payload rejected");
            reject(e.code());
            return;
        }
    };
    if mb.already_applied(generation) {
        warn!(generation, "mailbox generation already applied; ignored");
        reject(REJECT_DUPLICATE_GENERATION);
        return;
    }
    let Payload {
        interface,
        mac,
        ipv4,
        prefix_len,
        gateway,
        dns,
        hostname,
        host_time_unix_ns,
        mut rng_seed,
        ack,
    } = payload;

    if let Err(e) = feed_rng(&rng_seed) {
        warn!(error = %e, "feeding the RNG seed to the kernel failed");
    }
    rng_seed.0.fill(0);

    let request = NetRequest {
        interface,
        mac: mac.to_string(),
        ipv4: ipv4.to_string(),
        prefix_len: u32::from(prefix_len),
        gateway: gateway.to_string(),
        dns: dns.iter().map(ToString::to_string).collect(),
        hostname,
    };
    let desired = match request.validate() {
        Ok(d) => d,
        Err(e) => {
            // The mailbox validation is stricter; this would be a bug.
            warn!(error = %e, generation, "payload passed mailbox validation but not the net check");
            reject(REJECT_APPLY_FAILED);
            return;
        }
    };
    let report = match state.configure_network(&desired).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, generation, "mailbox network apply failed");
            reject(REJECT_APPLY_FAILED);
            return;
        }
    };
    let applied_us = us_since(seen);

    if let Err(e) = set_realtime(host_time_unix_ns) {
        warn!(error = %e, "stepping the clock to the host time failed");
    }

    // The outcome goes into the page before the first ack leaves: the host
    // reads the guest report as soon as the ack arrives.
    let outcome = GuestReport {
        signal_seen_us: seen_us,
        applied_us,
        outcome_generation: generation,
        reject_code: 0,
    };
    if let Err(e) = mb.mark_applied(&outcome) {
        warn!(error = %e, "marking the mailbox APPLIED failed");
    }
    info!(
        generation,
        applied_us,
        netlink_us = report.elapsed_us,
        steps = report.steps.len(),
        ipv4 = %ipv4,
        mac = %mac,
        "mailbox identity applied"
    );
    tokio::spawn(send_acks(ack, generation, mac, ipv4));
}

/// Sends the ack on [`ACK_SCHEDULE_MS`] from `(ip, 0)` to the ack target.
async fn send_acks(mut ack: AckTarget, generation: u64, mac: MacAddr, ip: Ipv4Addr) {
    let msg = forkvm_mailbox::ack_encode(&ack.key, generation, mac, ip);
    ack.key.0.fill(0);
    let sock = match tokio::net::UdpSocket::bind(SocketAddrV4::new(ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, %ip, "ack socket bind failed; no ack sent");
            return;
        }
    };
    let to = SocketAddrV4::new(ack.ip, ack.port);
    let start = Instant::now();
    let mut sent = 0;
    for ms in ACK_SCHEDULE_MS {
        tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
        match sock.send_to(&msg, to).await {
            Ok(_) => sent += 1,
            Err(e) => debug!(error = %e, at_ms = ms, "ack send failed"),
        }
    }
    info!(generation, %to, sent, "ack schedule done");
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
