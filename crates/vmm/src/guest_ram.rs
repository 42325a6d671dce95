//! Guest RAM as the VMM process maps it: the q35 layout (guest-physical
//! address → offset in the RAM file) and reads/writes through
//! `/proc/<pid>/mem` at the mapping's address.
//!
//! Going through the process, not the file, is what makes a write land in
//! *that* VM's memory even when it maps a shared base copy-on-write
//! (`share=off`): the kernel copies the page into the process's private
//! mapping and the base file never changes. For a `share=on` mapping the
//! write reaches the file, as a direct file write would.

use crate::error::VmmError;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Offset of guest-physical address `gpa` in the RAM (file) of a q35 guest
/// with `memory_mb` MiB: RAM below the PCI hole maps 1:1, RAM above 4 GiB
/// follows it. `None` for addresses that are not RAM.
pub fn q35_ram_offset(memory_mb: u32, gpa: u64) -> Option<u64> {
    let ram = u64::from(memory_mb) * 1024 * 1024;
    let lowmem = if ram > 0xB000_0000 { 0x8000_0000 } else { ram };
    const FOUR_G: u64 = 1 << 32;
    if gpa < lowmem {
        Some(gpa)
    } else if gpa >= FOUR_G && gpa - FOUR_G < ram - lowmem {
        Some(gpa - FOUR_G + lowmem)
    } else {
        None
    }
}

/// One line of `/proc/<pid>/maps` that maps `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    /// File offset of `start`.
    offset: u64,
}

/// The mappings of `path` in a maps listing.
fn mappings_of(maps: &str, path: &Path) -> Vec<Mapping> {
    let want = path.to_string_lossy();
    maps.lines()
        .filter_map(|line| {
            // start-end perms offset dev inode path
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let _perms = f.next()?;
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            let _dev = f.next()?;
            let _inode = f.next()?;
            let p = f.collect::<Vec<_>>().join(" ");
            if p != want {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                offset,
            })
        })
        .collect()
}

/// The address in the VMM process of RAM offset `off..off+len`, which must
/// lie inside one mapping of `mem_path`.
fn host_address(pid: u32, mem_path: &Path, off: u64, len: usize) -> Result<u64, VmmError> {
    let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = std::fs::read_to_string(&maps_path).map_err(|source| VmmError::Io {
        op: "read",
        path: maps_path.clone(),
        source,
    })?;
    let end = off + len as u64;
    // The kernel shows the resolved path; the caller's may go through a symlink.
    let resolved = mem_path
        .canonicalize()
        .unwrap_or_else(|_| mem_path.to_path_buf());
    mappings_of(&maps, &resolved)
        .into_iter()
        .find(|m| m.offset <= off && end <= m.offset + (m.end - m.start))
        .map(|m| m.start + (off - m.offset))
        .ok_or_else(|| VmmError::Io {
            op: "find guest RAM mapping in",
            path: maps_path,
            source: io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no mapping of {} covers offset {off:#x}+{len}",
                    mem_path.display()
                ),
            ),
        })
}

fn proc_mem(pid: u32, write: bool) -> Result<(File, PathBuf), VmmError> {
    let path = PathBuf::from(format!("/proc/{pid}/mem"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(&path)
        .map_err(|source| VmmError::Io {
            op: "open",
            path: path.clone(),
            source,
        })?;
    Ok((f, path))
}

/// Reads `len` bytes of guest RAM at offset `off` from the VMM process `pid`.
pub fn read(pid: u32, mem_path: &Path, off: u64, len: usize) -> Result<Vec<u8>, VmmError> {
    let addr = host_address(pid, mem_path, off, len)?;
    let (f, path) = proc_mem(pid, false)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, addr)
        .map_err(|source| VmmError::Io {
            op: "read",
            path,
            source,
        })?;
    Ok(buf)
}

/// Writes `data` into guest RAM at offset `off` of the VMM process `pid`
/// (into its own mapping: private pages stay private).
pub fn write(pid: u32, mem_path: &Path, off: u64, data: &[u8]) -> Result<(), VmmError> {
    let addr = host_address(pid, mem_path, off, data.len())?;
    let (f, path) = proc_mem(pid, true)?;
    f.write_all_at(data, addr).map_err(|source| VmmError::Io {
        op: "write",
        path,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q35_address_map() {
        assert_eq!(q35_ram_offset(256, 0x1000), Some(0x1000));
        assert_eq!(q35_ram_offset(256, 256 << 20), None);
        // 4 GiB guest: 2 GiB below the hole, the rest from 4 GiB up.
        assert_eq!(q35_ram_offset(4096, 0x7fff_f000), Some(0x7fff_f000));
        assert_eq!(q35_ram_offset(4096, 0x9000_0000), None);
        assert_eq!(q35_ram_offset(4096, 1 << 32), Some(0x8000_0000));
        assert_eq!(q35_ram_offset(4096, (1 << 32) + (2 << 30)), None);
    }

    #[test]
    fn maps_lines_are_matched_by_exact_path() {
        let maps = "\
7f0000000000-7f0010000000 rw-s 00000000 00:1a 123 /dev/shm/f/a.mem
7f0010000000-7f0010001000 rw-p 00000000 00:1a 124 /dev/shm/f/a.mem.keep
7f0020000000-7f0030000000 rw-p 10000000 00:1a 123 /dev/shm/f/a.mem
55d0-55d1 r-xp 00000000 08:01 9 /usr/bin/qemu-system-x86_64
";
        let m = mappings_of(maps, Path::new("/dev/shm/f/a.mem"));
        assert_eq!(
            m,
            [
                Mapping {
                    start: 0x7f00_0000_0000,
                    end: 0x7f00_1000_0000,
                    offset: 0
                },
                Mapping {
                    start: 0x7f00_2000_0000,
                    end: 0x7f00_3000_0000,
                    offset: 0x1000_0000
                }
            ]
        );
    }

    /// Our own process stands in for a VMM: a private (copy-on-write)
    /// mapping of a file, written through /proc/self/mem, changes what the
    /// process sees and never the file.
    #[test]
    fn writes_land_in_the_private_mapping_only() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.mem");
        std::fs::write(&path, vec![7u8; 3 * 4096]).unwrap();
        let path = path.canonicalize().unwrap();
        let file = File::open(&path).unwrap();
        let len = std::num::NonZeroUsize::new(3 * 4096).unwrap();
        // SAFETY: a fresh private mapping of a file we own; unmapped below,
        // and only read through the pointer while mapped.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
                file.as_fd(),
                0,
            )
        }
        .unwrap();
        let pid = std::process::id();
        write(pid, &path, 4096 + 10, b"fork").unwrap();
        assert_eq!(
            read(pid, &path, 4096 + 8, 8).unwrap(),
            b"\x07\x07fork\x07\x07"
        );
        // SAFETY: the mapping is live and 3 pages long.
        let seen = unsafe { std::slice::from_raw_parts(ptr.as_ptr() as *const u8, 3 * 4096) };
        assert_eq!(&seen[4096 + 10..4096 + 14], b"fork");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![7u8; 3 * 4096],
            "base changed"
        );
        assert!(
            read(pid, &path, 3 * 4096 - 2, 8).is_err(),
            "past the mapping"
        );
        // SAFETY: unmapping what we mapped above; `seen` is not used after.
        unsafe { nix::sys::mman::munmap(ptr, len.get()) }.unwrap();
    }
}
