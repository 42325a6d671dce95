//! Minimal cpio "newc" (SVR4, no CRC) archive writer — the format the Linux kernel
//! unpacks as an initramfs.
//!
//! Hand-written because the format is a fixed 110-byte ASCII header plus 4-byte padding,
//! and owning it lets us pin uid/gid/mtime (root, epoch 0) for reproducible images
//! without depending on a crate's defaults.

use std::collections::BTreeSet;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams newc entries into `W`. All entries are owned by root with mtime 0.
/// Parent directories that were not added explicitly are created (mode 0755) on demand,
/// because the kernel's unpacker does not create missing parents.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
    finished: bool,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
            finished: false,
        }
    }

    /// Adds a directory (idempotent: a directory added twice is written once).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = normalize(path)?;
        if self.dirs.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.dirs.insert(path.clone());
        self.entry(&path, S_IFDIR | (perm & 0o7777), 2, 0, 0, &[])
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFREG | (perm & 0o7777), 1, 0, 0, data)
    }

    /// Adds a symbolic link `path -> target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, 0, 0, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFCHR | (perm & 0o7777), 1, major, minor, &[])
    }

    /// Writes the trailer and returns the inner writer and the archive size in bytes.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.header("TRAILER!!!", 0, 0, 1, 0, 0, 0)?;
        self.finished = true;
        self.out.flush()?;
        let written = self.written;
        // `Drop` is not implemented, so moving `out` out is fine.
        Ok((self.out, written))
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut idx = 0;
        while let Some(pos) = path[idx..].find('/') {
            let parent = &path[..idx + pos];
            if !self.dirs.contains(parent) {
                let parent = parent.to_string();
                self.dirs.insert(parent.clone());
                self.entry(&parent, S_IFDIR | 0o755, 2, 0, 0, &[])?;
            }
            idx += pos + 1;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev_major: u32,
        rdev_minor: u32,
        data: &[u8],
    ) -> io::Result<()> {
        if self.finished {
            return Err(io::Error::other("cpio archive already finished"));
        }
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file larger than 4 GiB"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(name, ino, mode, nlink, size, rdev_major, rdev_minor)?;
        self.write_all(data)?;
        self.pad()
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev_major: u32,
        rdev_minor: u32,
    ) -> io::Result<()> {
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
        // Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check.
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{rdev_major:08x}{rdev_minor:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, 0
        );
        self.write_all(hdr.as_bytes())?;
        self.write_all(name.as_bytes())?;
        self.write_all(&[0])?;
        self.pad()
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.write_all(&[0u8; 3][..4 - rem])?;
        }
        Ok(())
    }
}

/// Archive names are relative ("bin/sh"); reject anything that could escape the root.
fn normalize(path: &str) -> io::Result<String> {
    let p = path.trim_start_matches('/').trim_end_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid archive path {path:?}"),
        ));
    }
    Ok(p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/proc", 0o755).unwrap();
        w.dir("tmp", 0o1777).unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("etc/forkvm/modules", 0o644, b"a.ko\n").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("odd", 0o644, b"x").unwrap();
        let (buf, n) = w.finish().unwrap();
        assert_eq!(n as usize, buf.len());
        buf
    }

    /// Debian's `cpio` reads what we wrote: an independent check of the format.
    /// `scripts/setup.sh` installs it (its test-tool list).
    fn cpio_cli(args: &[&str], input: &[u8], cwd: Option<&std::path::Path>) -> String {
        let mut cmd = Command::new("cpio");
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run cpio ({e}): scripts/setup.sh installs it"));
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cpio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn archive_is_aligned_and_ends_with_trailer() {
        let buf = sample();
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
        let trailer = buf
            .windows(10)
            .rposition(|w| w == b"TRAILER!!!")
            .expect("trailer");
        assert!(buf[trailer + 10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn cpio_cli_lists_entries_with_types_and_owners() {
        let buf = sample();
        let list = cpio_cli(&["-it", "--quiet"], &buf, None);
        let names: Vec<&str> = list.lines().collect();
        assert_eq!(
            names,
            [
                "proc",
                "tmp",
                "init",
                "etc",
                "etc/forkvm",
                "etc/forkvm/modules",
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "odd"
            ]
        );
        let verbose = cpio_cli(&["-itv", "--quiet", "--numeric-uid-gid"], &buf, None);
        let line = |name: &str| {
            verbose
                .lines()
                .find(|l| {
                    l.split_whitespace().last() == Some(name) || l.contains(&format!(" {name} -> "))
                })
                .unwrap_or_else(|| panic!("{name} missing in {verbose}"))
                .to_string()
        };
        assert!(line("init").starts_with("-rwxr-xr-x"), "{}", line("init"));
        assert!(line("tmp").starts_with("drwxrwxrwt"), "{}", line("tmp"));
        assert!(line("bin/sh").starts_with("lrwxrwxrwx"));
        assert!(line("bin/sh").ends_with("bin/sh -> busybox"));
        let console = line("dev/console");
        assert!(console.starts_with("crw-------"), "{console}");
        assert!(console.contains("5,"), "{console}");
        for l in verbose.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!((f[2], f[3]), ("0", "0"), "not root-owned: {l}");
        }
    }

    #[test]
    fn cpio_cli_extracts_identical_contents() {
        let buf = sample();
        let dir = tempfile::tempdir().unwrap();
        cpio_cli(
            &["-idm", "--quiet", "--no-absolute-filenames"],
            &buf,
            Some(dir.path()),
        );
        // dev/console cannot be created unprivileged; everything else must match.
        assert_eq!(
            std::fs::read(dir.path().join("init")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(std::fs::read(dir.path().join("odd")).unwrap(), b"x");
        assert_eq!(
            std::fs::read_link(dir.path().join("bin/sh")).unwrap(),
            std::path::Path::new("busybox")
        );
    }

    #[test]
    fn rejects_escaping_paths() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("../etc/passwd", 0o644, b"").is_err());
        assert!(w.file("a//b", 0o644, b"").is_err());
        assert!(w.dir("/", 0o755).is_err());
    }
}
