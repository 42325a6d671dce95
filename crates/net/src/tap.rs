//! TAP devices through `/dev/net/tun`.
//!
//! The kernel refuses to create tun/tap links over rtnetlink, so creation and
//! persistence go through the tun character device's ioctls.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::NetError;
use crate::names::validate_ifname;

const TUN_PATH: &str = "/dev/net/tun";

/// Opens one queue of the TAP `name` (creating a non-persistent TAP if it
/// does not exist), as QEMU does with `-netdev tap,ifname=`. Hand the fd to
/// QEMU (`-netdev tap,fd=N`) or read/write raw Ethernet frames on it.
///
/// `vnet_hdr` prefixes every frame with a `virtio_net_hdr`; QEMU wants it when
/// it was started with `vnet_hdr=on`. The TAP is bound to the network namespace
/// of the calling thread.
pub fn open_tap(name: &str, vnet_hdr: bool) -> Result<File, NetError> {
    validate_ifname(name)?;
    let tun_err = |op: &'static str| {
        let name = name.to_string();
        move |source: io::Error| NetError::Tun { op, name, source }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(tun_err("open /dev/net/tun"))?;

    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    // Flags are < 0x8000, so they fit the kernel's short.
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives on our stack
    // for the duration of the call; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc < 0 {
        return Err(tun_err("TUNSETIFF")(io::Error::last_os_error()));
    }
    Ok(file)
}

/// Creates (or re-opens) the TAP `name` and marks it persistent, so it
/// outlives this call and QEMU can open it by name later. No owner or group
/// is set: only CAP_NET_ADMIN holders may attach to it.
pub(crate) fn create_persistent_tap(name: &str) -> Result<(), NetError> {
    let file = open_tap(name, false)?;
    // SAFETY: TUNSETPERSIST takes its argument by value; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(NetError::Tun {
            op: "TUNSETPERSIST",
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    // Closing the fd detaches our queue; the persistent device stays.
    drop(file);
    Ok(())
}

/// Identity (device, inode) of the calling thread's network namespace.
pub(crate) fn current_netns_id() -> Result<(u64, u64), NetError> {
    use std::os::unix::fs::MetadataExt;
    // thread-self, not self: namespaces are per thread and tests unshare one thread.
    let m = std::fs::metadata("/proc/thread-self/ns/net").map_err(|source| NetError::Tun {
        op: "stat /proc/thread-self/ns/net",
        name: String::new(),
        source,
    })?;
    Ok((m.dev(), m.ino()))
}
