//! Figures read from the host rather than the API: the machine the
//! benchmark ran on, a memory file's allocated bytes and a process's private
//! memory.

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

/// Private_Clean + Private_Dirty of a process, in bytes.
pub(super) fn private_bytes(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_private_kb(&text).map(|kb| (kb * 1024) as f64)
}

fn parse_private_kb(smaps_rollup: &str) -> Option<u64> {
    let mut sum = None;
    for line in smaps_rollup.lines() {
        if let Some(rest) = line
            .strip_prefix("Private_Clean:")
            .or_else(|| line.strip_prefix("Private_Dirty:"))
        {
            let kb = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()?;
            sum = Some(sum.unwrap_or(0) + kb);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps_rollup() {
        let text = "00400000-7ffd [rollup]\nRss:  9000 kB\nPrivate_Clean:   120 kB\nPrivate_Dirty:  2048 kB\nSwap: 0 kB\n";
        assert_eq!(parse_private_kb(text), Some(2168));
        assert_eq!(parse_private_kb("Rss: 1 kB\n"), None);
    }
}
