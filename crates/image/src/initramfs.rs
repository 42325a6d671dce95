//! Assembling the guest initramfs (cpio newc, uncompressed: the kernel unpacks it
//! faster under TCG than it could gunzip it).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use crate::modules::SelectedModule;
use forkvm_cpio::CpioWriter;

/// Busybox applets users expect in a sandbox shell, plus what init scripts need.
pub const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "ls",
    "cat",
    "echo",
    "ip",
    "ping",
    "httpd",
    "wget",
    "sleep",
    "ps",
    "kill",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "grep",
    "sed",
    "awk",
    "head",
    "tail",
    "dd",
    "mount",
    "umount",
    "hostname",
    "arping",
    "uname",
    "date",
    "env",
    "true",
    "false",
    "printf",
    "seq",
    "wc",
    "sort",
    "uniq",
    "tr",
    "cut",
    "id",
    "whoami",
    "find",
    "xargs",
    "vi",
    "nc",
    "top",
    "free",
    "df",
    "du",
    "sync",
    "stat",
    "touch",
    "ln",
    "chmod",
    "chown",
    "basename",
    "dirname",
    "readlink",
    "test",
    "[",
    "dmesg",
    "insmod",
    "lsmod",
    "poweroff",
    "reboot",
    "md5sum",
    "sha256sum",
    "cmp",
];

/// Where the agent reads the module load order from.
pub const MODULES_LIST: &str = "etc/forkvm/modules";
/// Where the agent reads the load order of the disk modules from when a
/// workload starts (after the boot modules).
pub const DISK_MODULES_LIST: &str = "etc/forkvm/modules-disk";

pub struct Contents<'a> {
    pub init: &'a [u8],
    pub busybox: &'a [u8],
    /// Applets to link as `/bin/<applet> -> busybox`.
    pub applets: &'a [&'a str],
    pub kernel_version: &'a str,
    pub modules: &'a [SelectedModule],
    /// Loaded by the agent when a workload starts, after `modules`.
    pub disk_modules: &'a [SelectedModule],
}

/// Applets the given busybox actually provides (`busybox --list`). If the binary can't
/// be run on the host (e.g. another arch), all wanted applets are linked unchecked.
pub fn available_applets(busybox: &Path) -> Vec<&'static str> {
    let out = Command::new(busybox).arg("--list").output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let have: std::collections::BTreeSet<&str> = text.lines().map(str::trim).collect();
            APPLETS
                .iter()
                .copied()
                .filter(|a| {
                    let ok = have.contains(a);
                    if !ok {
                        tracing::warn!(applet = a, "busybox lacks applet; not linked");
                    }
                    ok
                })
                .collect()
        }
        _ => {
            tracing::warn!(busybox = %busybox.display(), "cannot run `busybox --list`; linking all applets unchecked");
            APPLETS.to_vec()
        }
    }
}

/// Writes the whole initramfs to `out`; returns its size.
pub fn write<W: Write>(out: W, c: &Contents<'_>) -> std::io::Result<u64> {
    let mut w = CpioWriter::new(out);
    for d in [
        "bin", "dev", "etc", "lib", "proc", "run", "sys", "usr", "var", "var/www",
    ] {
        w.dir(d, 0o755)?;
    }
    w.dir("root", 0o700)?;
    w.dir("tmp", 0o1777)?;
    // Merged-/usr style so `#!/usr/bin/env sh` and `/sbin/ip` resolve too.
    w.symlink("sbin", "bin")?;
    w.symlink("usr/bin", "../bin")?;
    w.symlink("usr/sbin", "../bin")?;
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("init", 0o755, c.init)?;
    w.file("bin/busybox", 0o755, c.busybox)?;
    for a in c.applets {
        w.symlink(&format!("bin/{a}"), "busybox")?;
    }
    w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    w.file("etc/group", 0o644, b"root:x:0:\n")?;
    w.file("etc/hostname", 0o644, b"forkvm\n")?;
    w.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
    let base = format!("lib/modules/{}", c.kernel_version);
    for (set, list_path) in [
        (c.modules, MODULES_LIST),
        (c.disk_modules, DISK_MODULES_LIST),
    ] {
        let mut list = String::new();
        for m in set {
            w.file(&format!("{base}/{}", m.rel_path), 0o644, &m.data)?;
            list.push_str(&m.rel_path);
            list.push('\n');
        }
        w.file(list_path, 0o644, list.as_bytes())?;
    }
    w.file(
        "etc/forkvm/kernel-version",
        0o644,
        format!("{}\n", c.kernel_version).as_bytes(),
    )?;
    let (_, size) = w.finish()?;
    Ok(size)
}
