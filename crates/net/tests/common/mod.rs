//! Helpers shared by the namespace tests: a private network namespace per
//! test thread, and raw frames through TAP fds.

#![allow(dead_code)]

use forkvm_net::MacAddr;
use std::fs::File;
use std::future::Future;
use std::io::{ErrorKind, Read};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::Instant;

pub fn netns_id() -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/thread-self/ns/net").expect("stat netns");
    (m.dev(), m.ino())
}

/// Runs `body` on a new thread inside a new, private network namespace.
pub fn in_new_netns<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let host_ns = netns_id();
    let t = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN");
        // Guard: never run networking code in the host's namespace.
        assert_ne!(netns_id(), host_ns, "still in the host network namespace");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(body());
    });
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p);
    }
}

/// Frames carry no PI and no vnet header: raw Ethernet.
pub fn arp_request(src: MacAddr, sip: Ipv4Addr, tip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&sip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tip.octets());
    f.resize(60, 0);
    f
}

pub fn set_nonblocking(f: &File) {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        assert!(fl >= 0);
        assert!(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) >= 0);
    }
}

/// Reads frames until `pred` matches one or the deadline passes; waits with
/// poll(2) on the fd, so it returns as soon as the frame arrives.
pub fn wait_frame(
    f: &mut File,
    deadline: Instant,
    pred: impl Fn(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    loop {
        match f.read(&mut buf) {
            Ok(n) if pred(&buf[..n]) => return Some(buf[..n].to_vec()),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("tap read: {e}"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
    }
}

/// Everything already queued on the fd (non-blocking drain).
pub fn drain(f: &mut File) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        match f.read(&mut buf) {
            Ok(n) => out.push(buf[..n].to_vec()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
            Err(e) => panic!("tap read: {e}"),
        }
    }
}

pub fn is_arp_from(frame: &[u8], src: MacAddr) -> bool {
    frame.len() >= 42 && frame[6..12] == src.0 && frame[12..14] == [0x08, 0x06]
}

/// Until every TAP in `taps` forwards and the bridge has carrier (both
/// follow the ports through the kernel's linkwatch, up to ~1 s late).
pub async fn wait_forwarding(net: &forkvm_net::HostNet, bridge: &str, taps: &[&str]) {
    use futures::TryStreamExt;
    use netlink_packet_route::link::LinkFlags;
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    for t in taps {
        loop {
            let st = net.bridge_port_info(t).await.unwrap().unwrap().state;
            if st == Some(forkvm_net::BridgePortState::Forwarding) {
                break;
            }
            assert!(Instant::now() < deadline, "{t} stuck in {st:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    loop {
        let br = net
            .handle()
            .link()
            .get()
            .match_name(bridge.to_string())
            .execute()
            .try_next()
            .await
            .unwrap()
            .unwrap();
        if br.header.flags.contains(LinkFlags::Running) {
            return;
        }
        assert!(Instant::now() < deadline, "bridge never got carrier");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// An ARP reply `sip is-at src` sent to `dst`.
pub fn arp_reply(src: MacAddr, sip: Ipv4Addr, dst: MacAddr, dip: Ipv4Addr) -> Vec<u8> {
    let mut f = arp_request(src, sip, dip);
    f[0..6].copy_from_slice(&dst.0);
    f[21] = 2;
    f[32..38].copy_from_slice(&dst.0);
    f
}
