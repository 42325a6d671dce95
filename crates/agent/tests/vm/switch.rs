//! A tiny L2 "switch" at the other end of the guest NIC, so the guest's
//! mailbox ack really leaves the guest and the test can check it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// MAC the in-test switch answers ARP with.
const SWITCH_MAC: [u8; 6] = [0x02, 0xfc, 0, 0, 0, 0xfe];
/// The guest's gateway and ack target; the switch answers ARP for it.
pub const GW: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 0, 1);
/// The host's ack port the payloads name.
pub const ACK_PORT: u16 = 40000;

/// A UDP datagram the guest sent, as seen by the switch.
#[derive(Clone, Debug)]
pub struct Datagram {
    pub at: Instant,
    pub src: std::net::Ipv4Addr,
    pub dst: std::net::Ipv4Addr,
    pub dport: u16,
    pub payload: Vec<u8>,
}

/// The other end of the guest NIC: a unix datagram socket that QEMU's
/// `-netdev dgram` exchanges raw Ethernet frames with. Answers ARP requests
/// for [`GW`] and records UDP datagrams, so the guest's ack really leaves the
/// guest and is checked by the test; no host network is involved.
pub struct Switch {
    pub own_path: PathBuf,
    pub qemu_path: PathBuf,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Datagram>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Switch {
    pub fn start(dir: &Path) -> Switch {
        let own_path = dir.join("switch.nic");
        let qemu_path = dir.join("qemu.nic");
        let sock = std::os::unix::net::UnixDatagram::bind(&own_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen2, stop2, to) = (seen.clone(), stop.clone(), qemu_path.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                let f = &buf[..n];
                if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] {
                    // ARP request for the gateway (not a gratuitous one).
                    if f[38..42] == GW.octets() && f[28..32] != f[38..42] {
                        let mut r = [0u8; 60];
                        r[0..6].copy_from_slice(&f[6..12]);
                        r[6..12].copy_from_slice(&SWITCH_MAC);
                        r[12..22].copy_from_slice(&f[12..22]);
                        r[21] = 2; // reply
                        r[22..28].copy_from_slice(&SWITCH_MAC);
                        r[28..32].copy_from_slice(&f[38..42]);
                        r[32..38].copy_from_slice(&f[22..28]);
                        r[38..42].copy_from_slice(&f[28..32]);
                        let _ = sock.send_to(&r, &to);
                    }
                } else if f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[23] == 17 {
                    let ihl = usize::from(f[14] & 0x0f) * 4;
                    let u = 14 + ihl;
                    if f.len() >= u + 8 {
                        let ulen = usize::from(u16::from_be_bytes([f[u + 4], f[u + 5]]));
                        let end = (u + ulen).min(f.len());
                        seen2.lock().unwrap().push(Datagram {
                            at: Instant::now(),
                            src: std::net::Ipv4Addr::new(f[26], f[27], f[28], f[29]),
                            dst: std::net::Ipv4Addr::new(f[30], f[31], f[32], f[33]),
                            dport: u16::from_be_bytes([f[u + 2], f[u + 3]]),
                            payload: f[u + 8..end].to_vec(),
                        });
                    }
                }
            }
        });
        Switch {
            own_path,
            qemu_path,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn datagrams(&self) -> Vec<Datagram> {
        self.seen.lock().unwrap().clone()
    }

    /// The acks the guest sent to the host ([`GW`], [`ACK_PORT`]).
    pub fn acks(&self) -> Vec<Datagram> {
        self.datagrams()
            .into_iter()
            .filter(|d| d.dport == ACK_PORT && d.dst == GW)
            .collect()
    }
}
