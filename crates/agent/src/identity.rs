//! What makes a fork a machine of its own besides its network identity: its
//! kernel RNG (the host's seed mixed in, a reseed forced) and its
//! `/etc/machine-id` (fresh per boot and per fork, in the agent's root and
//! in a mounted image root). Every handoff path runs this: the mailbox
//! watcher, the ReconfigureNetwork RPC, and the exec fallback's script (the
//! host writes the same steps in shell).
//!
//! `boot_id` (`/proc/sys/kernel/random/boot_id`) is the kernel's, generated
//! once per boot: forks share their source's (docs/security.md).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;

use tracing::{debug, warn};

use crate::workload::{mounts, resolv};

/// `_IOW('R', 0x03, int[2])`: add entropy, credited.
const RNDADDENTROPY: u64 = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG now.
const RNDRESEEDCRNG: u64 = 0x5207;

/// Mixes the host's 32-byte seed into the kernel RNG and forces a reseed,
/// so this fork's RNG diverges from its siblings even before (or without)
/// the VMGenID handler.
pub fn feed_rng(seed: &[u8; 32]) -> std::io::Result<()> {
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
    for (w, chunk) in info.buf.iter_mut().zip(seed.chunks_exact(4)) {
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

/// A new machine id: 32 lowercase hex digits and a newline (machine-id(5)),
/// from the kernel RNG (call after [`feed_rng`] on a fork).
fn new_machine_id() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(format!("{}\n", hex(&b)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes a fresh machine id into the agent's root and, when a workload's
/// image root is mounted, into that too. Best effort: logged.
pub fn renew_machine_id() {
    let id = match new_machine_id() {
        Ok(id) => id,
        Err(e) => {
            warn!(error = %e, "no random bytes for a machine id");
            return;
        }
    };
    write_machine_id(Path::new("/"), &id);
    match mounts::image_root_mounted() {
        Ok(true) => write_machine_id(Path::new(mounts::ROOT_DIR), &id),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "reading the mount table failed"),
    }
}

/// The machine id into `root/etc/machine-id` (same rules as resolv.conf).
pub fn write_machine_id(root: &Path, id: &str) {
    match resolv::write_etc(root, "machine-id", id.as_bytes(), 0o444) {
        Ok(_) => debug!(root = %root.display(), "machine-id written"),
        Err(e) => warn!(root = %root.display(), error = %e, "writing machine-id failed"),
    }
}

/// At boot and when an image root is prepared: `root` gets a machine id of
/// its own (the image's, if any, is shared by every instance of the image).
pub fn fresh_machine_id_in(root: &Path) {
    match new_machine_id() {
        Ok(id) => write_machine_id(root, &id),
        Err(e) => warn!(error = %e, "no random bytes for a machine id"),
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
    fn machine_ids_are_fresh_well_formed_and_written_without_following_links() {
        let a = new_machine_id().unwrap();
        let b = new_machine_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 33);
        assert!(
            a.trim_end()
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let victim = elsewhere.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, root.path().join("etc/machine-id")).unwrap();
        write_machine_id(root.path(), &a);
        assert_eq!(
            std::fs::read_to_string(root.path().join("etc/machine-id")).unwrap(),
            a
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }
}
