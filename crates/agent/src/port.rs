//! The virtio-serial port the RPC server speaks over.
//!
//! Port behaviour (see qemu-facts.md): while no host is connected, `read`
//! returns 0 and `poll` reports POLLHUP constantly, so readiness can't be used
//! to wait for a host. A host connecting raises SIGIO (F_SETOWN + O_ASYNC), so
//! [`Port::accept`] waits for SIGIO, with a bounded re-check as a fallback. One
//! accepted [`PortConn`] carries one HTTP/2 connection until the host is gone
//! (see [`HUP_GRACE`] for why "gone" needs a second look); the port fd itself
//! stays open across connections so the host can reconnect at any time.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
use nix::sys::stat::Mode;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, trace, warn};

/// Fallback re-check period while waiting for a host (SIGIO is the fast path).
const RECHECK: Duration = Duration::from_millis(200);

/// Host connect/disconnect seen by the port code. A restored fork's first
/// guest-visible event is its port's "host closed", so the resume watcher
/// waits on this too rather than relying on SIGIO alone.
static HOST_EVENT: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Notified on every host connect/disconnect the port code detects; a
/// notification while nobody waits is kept (one permit).
pub fn host_events() -> &'static tokio::sync::Notify {
    &HOST_EVENT
}

/// `CLOCK_MONOTONIC` µs of the last host event (0 = none yet), for the
/// resume watcher's log: how long the event took to reach it.
static HOST_EVENT_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn last_host_event_us() -> u64 {
    HOST_EVENT_US.load(std::sync::atomic::Ordering::Relaxed)
}

fn host_event() {
    let us = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64) * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    HOST_EVENT_US.store(us, std::sync::atomic::Ordering::Relaxed);
    HOST_EVENT.notify_one();
}

/// Finds `/dev/<vportNpM>` for the port whose sysfs name is `name`.
pub fn find_port(name: &str) -> io::Result<Option<PathBuf>> {
    find_port_in(
        Path::new("/sys/class/virtio-ports"),
        Path::new("/dev"),
        name,
    )
}

fn find_port_in(sys: &Path, dev: &Path, name: &str) -> io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(sys) {
        Ok(e) => e,
        // Class directory appears only once virtio_console is loaded.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(n) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if n.trim_end() == name {
            return Ok(Some(dev.join(entry.file_name())));
        }
    }
    Ok(None)
}

/// Waits until the named port's device node exists (the driver and devtmpfs
/// create it asynchronously after module load).
pub async fn wait_for_port(name: &str) -> PathBuf {
    let start = tokio::time::Instant::now();
    let mut warned = false;
    loop {
        match find_port(name) {
            Ok(Some(p)) if p.exists() => return p,
            Ok(_) => {}
            Err(e) => warn!(error = %e, "scanning virtio ports"),
        }
        if !warned && start.elapsed() > Duration::from_secs(10) {
            warn!(
                port = name,
                "virtio-serial port not found yet; still waiting"
            );
            warned = true;
        }
        let period = if warned { 1000 } else { 20 };
        tokio::time::sleep(Duration::from_millis(period)).await;
    }
}

/// HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Largest frame the server accepts (its SETTINGS_MAX_FRAME_SIZE). With
/// frames ≤ 16 KiB the first byte of every frame header (the top byte of the
/// 24-bit length) is zero, which is what lets [`FrameTracker`] spot a new
/// client's preface (`'P'`) at a frame boundary.
pub const MAX_FRAME_SIZE: u32 = 16 * 1024;

/// The open port, kept for the agent's lifetime.
pub struct Port {
    fd: OwnedFd,
    sigio: Signal,
    /// Bytes read from the port that belong to the next connection.
    carry: Vec<u8>,
}

enum Probe {
    Disconnected,
    Connected(Vec<u8>),
}

impl Port {
    /// Opens the port non-blocking and arms SIGIO delivery to this process.
    pub fn open(path: &Path) -> io::Result<Port> {
        // The handler must exist before O_ASYNC: SIGIO's default action kills.
        let sigio = signal(SignalKind::io())?;
        let fd = open(
            path,
            OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )?;
        // nix has no F_SETOWN wrapper.
        // SAFETY: fcntl on a valid, owned fd with an integer argument.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETOWN, libc::getpid()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_ASYNC))?;
        info!(path = %path.display(), "agent port open");
        Ok(Port {
            fd,
            sigio,
            carry: Vec::new(),
        })
    }

    fn probe(&self) -> io::Result<Probe> {
        let mut buf = vec![0u8; 16 << 10];
        match nix::unistd::read(&self.fd, &mut buf) {
            Ok(0) => Ok(Probe::Disconnected),
            Ok(n) => {
                buf.truncate(n);
                Ok(Probe::Connected(buf))
            }
            Err(Errno::EAGAIN) => Ok(Probe::Connected(Vec::new())),
            Err(Errno::EINTR) => Ok(Probe::Connected(Vec::new())),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until a host is connected *and* has sent an HTTP/2 preface, and
    /// returns a connection starting at that preface.
    ///
    /// The port is one byte stream across host connections: bytes of a dead
    /// client (or of a client whose start was eaten by the previous session)
    /// are discarded up to the next preface, so a fresh client always gets a
    /// clean session.
    pub async fn accept(&mut self) -> io::Result<PortConn> {
        loop {
            if let Some(pos) = find(&self.carry, H2_PREFACE) {
                if pos > 0 {
                    warn!(discarded = pos, "discarding bytes before HTTP/2 preface");
                }
                let inbuf = self.carry.split_off(pos);
                self.carry.clear();
                // A dup per connection: the AsyncFd registration is dropped
                // with it while the port itself (and its SIGIO setup) stays.
                let dup = self.fd.as_fd().try_clone_to_owned()?;
                debug!(buffered = inbuf.len(), "host connected");
                return PortConn::new(dup, inbuf);
            }
            // Keep only a tail that may still grow into a preface.
            let keep = partial_preface_suffix(&self.carry);
            if keep < self.carry.len() {
                let drop_n = self.carry.len() - keep;
                warn!(
                    discarded = drop_n,
                    "discarding bytes that are not an HTTP/2 preface"
                );
                self.carry.drain(..drop_n);
            }
            match self.probe()? {
                Probe::Connected(data) if !data.is_empty() => {
                    if self.carry.is_empty() {
                        host_event();
                    }
                    self.carry.extend_from_slice(&data);
                    continue;
                }
                Probe::Connected(_) => {}
                // Bytes of a client that is gone would only be replayed to a
                // dead connection, whose stray answers can reach the next
                // one. (A new client's preface arrives in one piece, so it
                // is not at risk here even when "no host" is stale.)
                Probe::Disconnected => self.carry.clear(),
            }
            // SIGIO fires on host connect/disconnect and on data arrival; the
            // timer bounds the wait should a signal be missed.
            tokio::select! {
                _ = self.sigio.recv() => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Takes back the bytes a finished connection read but did not deliver
    /// (e.g. a new client's preface), so the next [`Port::accept`] sees them.
    pub fn give_back(&mut self, conn: PortConn) {
        // Undelivered input too: a session that died on a protocol error may
        // hold a new client's preface mid-buffer.
        let mut rest = conn.inbuf;
        rest.extend_from_slice(&conn.leftover);
        rest.extend_from_slice(&self.carry);
        self.carry = rest;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `buf` that is a proper prefix of the preface.
fn partial_preface_suffix(buf: &[u8]) -> usize {
    (1..H2_PREFACE.len().min(buf.len() + 1))
        .rev()
        .find(|&k| buf[buf.len() - k..] == H2_PREFACE[..k])
        .unwrap_or(0)
}

/// Follows HTTP/2 frame boundaries in the client→server byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameTracker {
    Preface(usize),
    Header { have: usize, len: u32 },
    Payload(u32),
}

impl Default for FrameTracker {
    fn default() -> Self {
        FrameTracker::Preface(0)
    }
}

impl FrameTracker {
    /// Advances over `data`. Returns `Err(k)` if a frame boundary at offset
    /// `k` starts with a non-zero byte: not a frame this server accepts, so
    /// the rest belongs to a new client (its preface starts with `P`).
    fn advance(&mut self, data: &[u8]) -> Result<(), usize> {
        let mut i = 0;
        while i < data.len() {
            match *self {
                FrameTracker::Preface(k) => {
                    let take = (H2_PREFACE.len() - k).min(data.len() - i);
                    i += take;
                    *self = if k + take == H2_PREFACE.len() {
                        FrameTracker::Header { have: 0, len: 0 }
                    } else {
                        FrameTracker::Preface(k + take)
                    };
                }
                FrameTracker::Header { have, len } => {
                    if have == 0 && data[i] != 0 {
                        return Err(i);
                    }
                    let len = if have < 3 {
                        (len << 8) | u32::from(data[i])
                    } else {
                        len
                    };
                    i += 1;
                    *self = match (have + 1, len) {
                        (9, 0) => FrameTracker::Header { have: 0, len: 0 },
                        (9, len) => FrameTracker::Payload(len),
                        (have, len) => FrameTracker::Header { have, len },
                    };
                }
                FrameTracker::Payload(r) => {
                    let take = (r as usize).min(data.len() - i);
                    i += take;
                    let r = r - take as u32;
                    *self = if r == 0 {
                        FrameTracker::Header { have: 0, len: 0 }
                    } else {
                        FrameTracker::Payload(r)
                    };
                }
            }
        }
        Ok(())
    }
}

/// How long the driver may keep saying "no host" (a read of 0) before the
/// session is taken as disconnected. The host's connect notice travels on
/// the control queue, handled in a kernel workqueue, while its first bytes
/// arrive on the data queue: under load the bytes can be read before the
/// driver believes a host is there, so one "no host" reading is not proof.
const HUP_GRACE: Duration = Duration::from_secs(2);
/// How often to look again while the driver says "no host" (the port reports
/// POLLHUP level-triggered then, so readiness can't be waited on).
const HUP_RECHECK: Duration = Duration::from_millis(20);

/// One host connection over the port. Ends (EOF to the reader, broken pipe to
/// the writer) when the host is gone for [`HUP_GRACE`], or when a new client's
/// preface shows up — at a frame boundary, or as the first bytes after the
/// driver reported the host gone — so a stale session never consumes a new
/// client's requests (it can still answer into the new connection in the
/// moment before it sees the preface; hosts retry such a call).
///
/// tokio treats POLLHUP as a final "closed" readiness that never clears, but
/// on this port it is transient (the host reconnects, or the driver was just
/// late to learn it is connected). After any "no host" reading the fd is
/// registered afresh, which re-samples the port's real state; without that
/// the session would spin on `EAGAIN` and starve its own writes.
pub struct PortConn {
    fd: Option<AsyncFd<OwnedFd>>,
    /// Bytes read from the port not yet handed to the session.
    inbuf: Vec<u8>,
    tracker: FrameTracker,
    dead: bool,
    /// Bytes past the end of this connection (for [`Port::give_back`]).
    leftover: Vec<u8>,
    /// Since when the driver has been saying "no host" (reset by any data or
    /// `EAGAIN`, which both mean a host is connected).
    hup_since: Option<Instant>,
    /// Bytes arrived after a "no host" reading and were not yet checked
    /// against the preface.
    check_preface: bool,
    read_recheck: Option<Pin<Box<Sleep>>>,
    write_recheck: Option<Pin<Box<Sleep>>>,
}

impl PortConn {
    fn new(fd: OwnedFd, inbuf: Vec<u8>) -> io::Result<PortConn> {
        Ok(PortConn {
            fd: Some(register(fd)?),
            inbuf,
            tracker: FrameTracker::default(),
            dead: false,
            leftover: Vec::new(),
            hup_since: None,
            check_preface: false,
            read_recheck: None,
            write_recheck: None,
        })
    }

    fn afd(&self) -> io::Result<&AsyncFd<OwnedFd>> {
        self.fd
            .as_ref()
            .ok_or_else(|| io::Error::other("agent port registration lost"))
    }

    /// Drops the epoll registration and makes a new one, so readiness is
    /// sampled from the port's current state (see the type docs).
    fn reregister(&mut self) -> io::Result<()> {
        if let Some(afd) = self.fd.take() {
            self.fd = Some(register(afd.into_inner())?);
        }
        Ok(())
    }

    /// Waits out a pending "no host" recheck of the read or write side,
    /// then re-samples the port's state.
    fn poll_recheck(&mut self, write: bool, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let slot = if write {
            &mut self.write_recheck
        } else {
            &mut self.read_recheck
        };
        if let Some(t) = slot.as_mut() {
            ready!(t.as_mut().poll(cx));
            *slot = None;
            self.reregister()?;
        }
        Poll::Ready(Ok(()))
    }

    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut tmp = [0u8; 16 << 10];
        loop {
            ready!(self.poll_recheck(false, cx))?;
            let afd = self.afd()?;
            let mut guard = ready!(afd.poll_read_ready(cx))?;
            let hup = guard.ready().is_read_closed();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), &mut tmp).map_err(io::Error::from))
            {
                Ok(Ok(0)) => {
                    if self.hup_since.is_none() {
                        // A restored fork's first guest-visible event.
                        host_event();
                    }
                    let since = *self.hup_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= HUP_GRACE {
                        debug!("port EOF: host disconnected");
                        self.dead = true;
                        return Poll::Ready(Ok(()));
                    }
                    self.check_preface = true;
                    self.read_recheck = Some(Box::pin(tokio::time::sleep(HUP_RECHECK)));
                }
                Ok(Ok(n)) => {
                    trace!(bytes = n, "port read");
                    self.hup_since = None;
                    self.inbuf.extend_from_slice(&tmp[..n]);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {
                    // EAGAIN: a host is connected and has sent nothing yet.
                    self.hup_since = None;
                    if hup {
                        trace!("port connected again; re-registering");
                        self.reregister()?;
                    }
                }
            }
        }
    }

    /// After a "no host" reading, bytes that begin with a preface are a new
    /// client even mid-frame (the old host may have died mid-write).
    /// Returns `Pending`-like `None` while too few bytes arrived to tell.
    fn new_client_after_hup(&mut self) -> Option<bool> {
        if !self.check_preface {
            return Some(false);
        }
        let n = self.inbuf.len().min(H2_PREFACE.len());
        if self.inbuf[..n] != H2_PREFACE[..n] {
            self.check_preface = false;
            return Some(false);
        }
        if n < H2_PREFACE.len() {
            return None;
        }
        self.check_preface = false;
        Some(true)
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and
    // unchanged for the AsyncFd's lifetime.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

impl AsyncRead for PortConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.inbuf.is_empty() && !this.dead {
                ready!(this.fill(cx))?;
            }
            if this.inbuf.is_empty() {
                // EOF (dead) — a read of zero bytes.
                return Poll::Ready(Ok(()));
            }
            match this.new_client_after_hup() {
                None if !this.dead => {
                    // A possible preface, still short: read more first.
                    ready!(this.fill(cx))?;
                    continue;
                }
                Some(true) => {
                    info!("new host connection after a disconnect; ending the old session");
                    this.leftover = std::mem::take(&mut this.inbuf);
                    this.dead = true;
                    return Poll::Ready(Ok(()));
                }
                _ => {}
            }
            break;
        }
        let n = this.inbuf.len().min(buf.remaining());
        let n = match this.tracker.advance(&this.inbuf[..n]) {
            Ok(()) => n,
            Err(k) => {
                info!("new host connection detected inside the old session; ending it");
                this.leftover = this.inbuf.split_off(k);
                this.dead = true;
                k
            }
        };
        buf.put_slice(&this.inbuf[..n]);
        this.inbuf.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PortConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.dead {
                // Never write into a newer host connection.
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            ready!(this.poll_recheck(true, cx))?;
            let afd = this.afd()?;
            let mut guard = ready!(afd.poll_write_ready(cx))?;
            let hup = guard.ready().is_write_closed();
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(r) => {
                    trace!(bytes = data.len(), result = ?r.as_ref().map_err(|e| e.kind()), "port write");
                    return Poll::Ready(r);
                }
                Err(_would_block) => {
                    trace!(bytes = data.len(), hup, "port write would block");
                    if hup {
                        // No host (or the driver doesn't know it yet): a
                        // closed readiness would make this loop spin.
                        this.write_recheck = Some(Box::pin(tokio::time::sleep(HUP_RECHECK)));
                    }
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the virtqueue; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // There is no half-close on a virtio-serial port; the host closes its socket.
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_by_name() {
        let tmp = std::env::temp_dir().join(format!("fvt-ports-{}", std::process::id()));
        let sys = tmp.join("sys");
        for (dir, name) in [("vport0p0", "other"), ("vport1p1", "forkvm.agent")] {
            std::fs::create_dir_all(sys.join(dir)).unwrap();
            std::fs::write(sys.join(dir).join("name"), format!("{name}\n")).unwrap();
        }
        std::fs::create_dir_all(sys.join("vport2p0")).unwrap(); // no name file
        let dev = Path::new("/dev");
        assert_eq!(
            find_port_in(&sys, dev, "forkvm.agent").unwrap(),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find_port_in(&sys, dev, "nope").unwrap(), None);
        assert_eq!(find_port_in(&tmp.join("missing"), dev, "x").unwrap(), None);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    fn frame(len: usize, ty: u8) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            ty,
            0,
            0,
            0,
            0,
            1,
        ];
        f.extend(std::iter::repeat_n(b'P', len)); // payload may contain anything
        f
    }

    #[test]
    fn tracker_spots_new_preface_at_frame_boundary_only() {
        let mut stream = H2_PREFACE.to_vec();
        stream.extend(frame(6, 4)); // SETTINGS
        stream.extend(frame(0, 4)); // SETTINGS ack, empty
        stream.extend(frame(300, 0)); // DATA full of 'P'
        let boundary = stream.len();
        stream.extend_from_slice(H2_PREFACE);
        // Whole stream at once.
        let mut t = FrameTracker::default();
        assert_eq!(t.advance(&stream), Err(boundary));
        // Byte by byte: same boundary.
        let mut t = FrameTracker::default();
        let hit = (0..stream.len()).find(|&i| t.advance(&stream[i..i + 1]).is_err());
        assert_eq!(hit, Some(boundary));
        // Without the second preface: no false positive.
        let mut t = FrameTracker::default();
        assert_eq!(t.advance(&stream[..boundary]), Ok(()));
        assert_eq!(t, FrameTracker::Header { have: 0, len: 0 });
    }

    #[test]
    fn preface_helpers() {
        assert_eq!(
            find(b"xxPRI * HTTP/2.0\r\n\r\nSM\r\n\r\nyy", H2_PREFACE),
            Some(2)
        );
        assert_eq!(find(b"garbage", H2_PREFACE), None);
        assert_eq!(partial_preface_suffix(b"junkPRI * HT"), 8);
        assert_eq!(partial_preface_suffix(b"junk"), 0);
        assert_eq!(partial_preface_suffix(b""), 0);
        assert_eq!(partial_preface_suffix(b"P"), 1);
    }
}
