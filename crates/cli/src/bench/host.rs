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
}

impl ProcessMemory {
    /// Private_Clean + Private_Dirty.
    pub fn private(&self) -> f64 {
        self.private_clean + self.private_dirty
    }
}

/// The memory figures of a running process; `None` when it is gone.
pub(super) fn process_memory(pid: u32) -> Option<ProcessMemory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_smaps_rollup(&text)
}

/// Pss, Private_Clean and Private_Dirty of a `smaps_rollup`; `None` unless
/// all three are there.
fn parse_smaps_rollup(text: &str) -> Option<ProcessMemory> {
    Some(ProcessMemory {
        pss: kib_field(text, "Pss")? * 1024.0,
        private_clean: kib_field(text, "Private_Clean")? * 1024.0,
        private_dirty: kib_field(text, "Private_Dirty")? * 1024.0,
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
    fn parses_meminfo() {
        let text = "MemTotal:       24684084 kB\nMemFree:        1000 kB\nMemAvailable:   23650792 kB\nHugePages_Total:       0\n";
        assert_eq!(kib_field(text, "MemAvailable"), Some(23650792.0));
        assert_eq!(kib_field(text, "HugePages_Total"), Some(0.0));
        assert_eq!(kib_field(text, "Mem"), None);
        assert_eq!(kib_field("MemAvailable: lots kB\n", "MemAvailable"), None);
    }
}
