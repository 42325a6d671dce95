//! Figures read from the host rather than the API: the machine the
//! benchmark ran on, a file's allocated bytes, a process's memory
//! (`smaps_rollup`) and the host's `MemAvailable`.

use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// The machine the benchmark ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub date: String,
    pub cores: usize,
    pub cpu: String,
    pub accel: Option<String>,
    pub qemu_version: String,
    pub host_kernel: String,
    pub guest_kernel: Option<String>,
}

/// Describes this host; `accel` is what the source instance ran with.
pub(super) fn machine_record(image: &Path, accel: Option<String>) -> Machine {
    let qemu_version = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into());
    let guest_kernel = std::fs::read(image.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["kernel_version"].as_str().map(str::to_string));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        accel,
        qemu_version,
        host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        guest_kernel,
    }
}

/// Bytes allocated to a file on disk (st_blocks * 512).
pub(super) fn bytes_allocated(path: &Path) -> Option<f64> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.blocks() * 512) as f64)
}

/// Bytes of a process's memory from `/proc/<pid>/smaps_rollup`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct ProcessMemory {
    /// Proportional set size: private pages plus each shared page divided
    /// by the number of processes mapping it.
    pub pss: f64,
    pub private_clean: f64,
    pub private_dirty: f64,
    /// Private_Dirty of the mapping of one file (`/proc/<pid>/smaps`): for
    /// a fork's QEMU, its base — the guest RAM pages the fork wrote (copied
    /// on write); the rest of Private_Dirty is QEMU's own memory.
    pub file_private_dirty: Option<f64>,
}

impl ProcessMemory {
    /// Private_Clean + Private_Dirty.
    pub fn private(&self) -> f64 {
        self.private_clean + self.private_dirty
    }
}

/// The memory figures of a running process, with the Private_Dirty of its
/// mappings of `file` when given; `None` when it is gone.
pub(super) fn process_memory(pid: u32, file: Option<&Path>) -> Option<ProcessMemory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let mut m = parse_smaps_rollup(&text)?;
    if let Some(f) = file {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
        m.file_private_dirty = Some(mapping_kib(&smaps, f, "Private_Dirty") * 1024.0);
    }
    Some(m)
}

/// The sum of `field` (KiB) over the mappings of `file` in a `smaps`.
fn mapping_kib(smaps: &str, file: &Path, field: &str) -> f64 {
    let file = file.to_string_lossy();
    let mut inside = false;
    let mut sum = 0.0;
    for line in smaps.lines() {
        if is_mapping_header(line) {
            // `start-end perms offset dev inode [path]`
            inside = line.split_whitespace().nth(5) == Some(file.as_ref());
        } else if inside {
            sum += kib_field(line, field).unwrap_or(0.0);
        }
    }
    sum
}

/// A `smaps` line that opens a mapping (`7f00-7f10 rw-p ...`), not a field.
fn is_mapping_header(line: &str) -> bool {
    line.split_whitespace()
        .next()
        .and_then(|r| r.split_once('-'))
        .is_some_and(|(a, b)| {
            !a.is_empty() && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
        })
}

/// Pss, Private_Clean and Private_Dirty of a `smaps_rollup`; `None` unless
/// all three are there.
fn parse_smaps_rollup(text: &str) -> Option<ProcessMemory> {
    Some(ProcessMemory {
        pss: kib_field(text, "Pss")? * 1024.0,
        private_clean: kib_field(text, "Private_Clean")? * 1024.0,
        private_dirty: kib_field(text, "Private_Dirty")? * 1024.0,
        file_private_dirty: None,
    })
}

/// The host's `MemAvailable` in bytes.
pub(super) fn mem_available() -> Option<f64> {
    meminfo("MemAvailable")
}

/// The host's `MemTotal` in bytes.
pub(super) fn mem_total() -> Option<f64> {
    meminfo("MemTotal")
}

fn meminfo(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&text, field).map(|kb| kb * 1024.0)
}

/// The value of a `Name:   123 kB` line (`/proc/meminfo`, `smaps_rollup`),
/// in KiB; the name must match exactly (`Pss` is not `Pss_Anon`).
fn kib_field(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        if k.trim() != name {
            return None;
        }
        let v = v.trim();
        let num = v.strip_suffix("kB").unwrap_or(v).trim();
        num.parse::<u64>().ok().map(|kb| kb as f64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps_rollup() {
        let text = "00400000-7ffd [rollup]\nRss:  9000 kB\nPss:   5000 kB\nPss_Anon:  1 kB\n\
                    Pss_File: 4 kB\nPrivate_Clean:   120 kB\nPrivate_Dirty:  2048 kB\nSwap: 0 kB\n";
        let m = parse_smaps_rollup(text).unwrap();
        assert_eq!(m.pss, 5000.0 * 1024.0);
        assert_eq!(m.private_dirty, 2048.0 * 1024.0);
        assert_eq!(m.private(), 2168.0 * 1024.0);
        assert_eq!(parse_smaps_rollup("Rss: 1 kB\n"), None);
        assert_eq!(
            parse_smaps_rollup("Pss_Anon: 1 kB\nPrivate_Clean: 1 kB\nPrivate_Dirty: 1 kB\n"),
            None
        );
    }

    #[test]
    fn sums_one_files_mappings_in_smaps() {
        let smaps = "\
55d0-55e0 r-xp 00000000 08:01 77  /usr/bin/qemu-system-x86_64
Private_Dirty:       8 kB
7f00-7f40 rw-p 00000000 00:1a 12  /dev/shm/b/bases/abc.mem
Size:          1048576 kB
Pss:              9000 kB
Private_Clean:     500 kB
Private_Dirty:    2048 kB
Anonymous:        2048 kB
VmFlags: rd wr mr mw me ac sd
7f40-7f50 rw-p 00000000 00:00 0
Private_Dirty:   30000 kB
7f50-7f60 rw-p 00100000 00:1a 12  /dev/shm/b/bases/abc.mem
Private_Dirty:      16 kB
7f60-7f70 rw-p 00000000 00:1a 13  /dev/shm/b/bases/abc.mem.old
Private_Dirty:     999 kB
";
        let f = Path::new("/dev/shm/b/bases/abc.mem");
        assert_eq!(mapping_kib(smaps, f, "Private_Dirty"), 2064.0);
        assert_eq!(mapping_kib(smaps, f, "Anonymous"), 2048.0);
        assert_eq!(mapping_kib(smaps, Path::new("/nope"), "Private_Dirty"), 0.0);
        assert!(is_mapping_header("7f00-7f40 rw-p 00000000 00:1a 12"));
        assert!(!is_mapping_header("Private_Dirty:    2048 kB"));
        assert!(!is_mapping_header("VmFlags: rd wr mr-mw"));
    }

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       24684084 kB\nMemFree:        1000 kB\nMemAvailable:   23650792 kB\nHugePages_Total:       0\n";
        assert_eq!(kib_field(text, "MemAvailable"), Some(23650792.0));
        assert_eq!(kib_field(text, "HugePages_Total"), Some(0.0));
        assert_eq!(kib_field(text, "Mem"), None);
        assert_eq!(kib_field("MemAvailable: lots kB\n", "MemAvailable"), None);
    }
}
