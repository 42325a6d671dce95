//! The gratuitous ARP a re-addressed interface sends, so peers update
//! their caches for its address at once instead of when their entries expire.

use std::net::Ipv4Addr;

use forkvm_mailbox::MacAddr;

/// Builds a gratuitous ARP request (sender = target = `ip`) as a 60-byte
/// Ethernet frame (minimum frame size without FCS).
pub fn gratuitous_arp_frame(mac: MacAddr, ip: Ipv4Addr) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]); // broadcast destination
    f[6..12].copy_from_slice(&mac.octets());
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // htype Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // ptype IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac.octets());
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address stays zero
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends one gratuitous ARP on interface `index` through an AF_PACKET socket.
/// Hand-built because no dependency in the tree offers raw ARP.
pub fn send_gratuitous_arp(index: u32, mac: MacAddr, ip: Ipv4Addr) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let frame = gratuitous_arp_frame(mac, ip);
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created, owned descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid start value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = 0x0806u16.to_be();
    addr.sll_ifindex = i32::try_from(index).map_err(std::io::Error::other)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: buffer and address are valid for the given lengths.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW_MAC: MacAddr = MacAddr([0x02, 0xfc, 0, 0, 0, 2]);
    const NEW_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn garp_frame_layout() {
        let f = gratuitous_arp_frame(NEW_MAC, NEW_IP);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &NEW_MAC.octets());
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &NEW_MAC.octets());
        assert_eq!(&f[28..32], &[10, 0, 0, 2]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 0, 0, 2]);
        assert!(f[42..].iter().all(|b| *b == 0));
    }
}
