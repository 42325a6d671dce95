//! Selecting the guest's kernel modules from an unpacked kernel package, in load order.
//!
//! Debian's kernel package ships no `modules.dep` (depmod runs at install time), so
//! modules are found by file name and their dependencies are read from each module's
//! own `.modinfo` section (`depends=`), which is what depmod reads too.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::ImageError;
use crate::decompress::module_bytes;

/// The virtio stack every guest needs at boot, in the load order that works
/// (qemu-facts.md). The agent loads these before it serves.
pub const BOOT_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    // /sys/firmware/qemu_fw_cfg: the boot config (env included) arrives
    // there instead of on the kernel command line (crates/proto boot.rs).
    "qemu_fw_cfg",
];

/// What an OCI image's workload needs from its disks (docs/guest-workload.md):
/// the block driver, erofs for the read-only image, ext4 for the writable
/// layer and overlayfs joining them; dependencies (jbd2, mbcache, crc16,
/// libcrc32c…) follow from each module's `depends=`. Packed beside the boot
/// modules but loaded by the agent only when a workload starts: loading them
/// at boot cost ~200 ms of every boot under TCG (docs/image.md).
pub const DISK_MODULES: &[&str] = &[
    "virtio_blk",
    // Not a `depends=` of anything: ext4 and jbd2 ask the crypto API for
    // "crc32c" at mount time and libcrc32c (erofs' dependency) at load time,
    // which would need modprobe (absent) to find it. So it is listed, and
    // before erofs.
    "crc32c_generic",
    "erofs",
    "ext4",
    "overlay",
];

/// One module selected for the initramfs, already decompressed.
#[derive(Debug, Clone)]
pub struct SelectedModule {
    /// Normalised module name (dashes as underscores).
    pub name: String,
    /// Path relative to `/lib/modules/<ver>/`, always ending in `.ko`.
    pub rel_path: String,
    pub data: Vec<u8>,
}

/// Module names use `_` and `-` interchangeably; the kernel treats them as equal.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name_of(file_name: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))
}

/// Reads `modules.builtin` (paths like `kernel/drivers/virtio/virtio.ko`) into names.
pub fn builtin_names(modules_dir: &Path) -> Result<BTreeSet<String>, ImageError> {
    let path = modules_dir.join("modules.builtin");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        // A kernel with no builtin list simply has nothing we can skip.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(ImageError::io(&path, e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(module_name_of)
        .map(normalize)
        .collect())
}

/// Maps module name → file path (absolute) for every module file under `modules_dir/kernel`.
pub fn index_modules(modules_dir: &Path) -> Result<BTreeMap<String, PathBuf>, ImageError> {
    let mut index = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| ImageError::io(&dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| ImageError::io(&dir, e))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(|e| ImageError::io(&path, e))?;
            if ft.is_dir() {
                stack.push(path);
            } else if let Some(name) = entry.file_name().to_str().and_then(module_name_of) {
                index.insert(normalize(name), path);
            }
        }
    }
    Ok(index)
}

/// Resolves `wanted` plus their module dependencies into load order. Builtins are skipped;
/// a wanted module that is neither builtin nor present is skipped with a warning (the
/// kernel config may not have it), but a missing *dependency* is an error because the
/// dependent module could not load. (The one-list form of [`select_module_sets`].)
#[cfg(test)]
pub fn select_modules(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<SelectedModule>, ImageError> {
    let mut sets = select_module_sets(modules_dir, &[wanted])?;
    Ok(sets.pop().unwrap_or_default())
}

/// [`select_modules`] for several lists loaded one after the other: each
/// list's result holds only what the lists before it did not already load,
/// so every list is a valid load order once its predecessors are loaded.
pub fn select_module_sets(
    modules_dir: &Path,
    sets: &[&[&str]],
) -> Result<Vec<Vec<SelectedModule>>, ImageError> {
    let builtin = builtin_names(modules_dir)?;
    let index = index_modules(modules_dir)?;
    let mut ctx = Ctx {
        modules_dir,
        builtin: &builtin,
        index: &index,
        done: BTreeSet::new(),
        visiting: BTreeSet::new(),
        out: Vec::new(),
    };
    let mut result = Vec::new();
    for wanted in sets {
        for name in *wanted {
            let name = normalize(name);
            if builtin.contains(&name) {
                tracing::debug!(module = %name, "builtin; not packed");
                continue;
            }
            if !index.contains_key(&name) {
                tracing::warn!(module = %name, "module not in this kernel; skipped");
                continue;
            }
            ctx.visit(&name)?;
        }
        result.push(std::mem::take(&mut ctx.out));
    }
    Ok(result)
}

struct Ctx<'a> {
    modules_dir: &'a Path,
    builtin: &'a BTreeSet<String>,
    index: &'a BTreeMap<String, PathBuf>,
    done: BTreeSet<String>,
    visiting: BTreeSet<String>,
    out: Vec<SelectedModule>,
}

impl Ctx<'_> {
    fn visit(&mut self, name: &str) -> Result<(), ImageError> {
        if self.done.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if !self.visiting.insert(name.to_string()) {
            return Err(ImageError::Module {
                name: name.to_string(),
                reason: "dependency cycle".into(),
            });
        }
        let path = self.index.get(name).ok_or_else(|| ImageError::Module {
            name: name.to_string(),
            reason: "required as a dependency but not found in the package".into(),
        })?;
        let raw = fs::read(path).map_err(|e| ImageError::io(path, e))?;
        let file_name = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default();
        let data = module_bytes(file_name, raw)?;
        for dep in modinfo_depends(&data).map_err(|reason| ImageError::Module {
            name: name.to_string(),
            reason,
        })? {
            self.visit(&normalize(&dep))?;
        }
        let rel = path
            .strip_prefix(self.modules_dir)
            .map_err(|_| ImageError::Module {
                name: name.to_string(),
                reason: "module path outside the modules directory".into(),
            })?
            .to_string_lossy()
            .to_string();
        // Stored decompressed, so the name always ends in plain `.ko`.
        let rel_path = match rel.find(".ko") {
            Some(i) => format!("{}.ko", &rel[..i]),
            None => rel,
        };
        self.visiting.remove(name);
        self.done.insert(name.to_string());
        self.out.push(SelectedModule {
            name: name.to_string(),
            rel_path,
            data,
        });
        Ok(())
    }
}

/// Reads `depends=` from the `.modinfo` section of an ELF64 little-endian module.
/// Hand-rolled: we need one string from one section, not a general ELF parser.
pub fn modinfo_depends(elf: &[u8]) -> Result<Vec<String>, String> {
    let section = modinfo_section(elf)?;
    for entry in section.split(|&b| b == 0) {
        if let Some(v) = entry.strip_prefix(b"depends=") {
            let v = std::str::from_utf8(v).map_err(|_| "non-UTF-8 depends".to_string())?;
            return Ok(v
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect());
        }
    }
    Ok(Vec::new())
}

fn modinfo_section(elf: &[u8]) -> Result<&[u8], String> {
    let u16_at = |o: usize| -> Result<u16, String> {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated ELF".to_string())
    };
    let u32_at = |o: usize| -> Result<u32, String> {
        elf.get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| "truncated ELF".to_string())
    };
    let u64_at = |o: usize| -> Result<usize, String> {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| "truncated ELF".to_string())
    };
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not an ELF64 little-endian module".into());
    }
    let shoff = u64_at(0x28)?;
    let shentsize = usize::from(u16_at(0x3A)?);
    let shnum = usize::from(u16_at(0x3C)?);
    let shstrndx = usize::from(u16_at(0x3E)?);
    let sh = |i: usize| shoff + i * shentsize;
    let strtab_off = u64_at(sh(shstrndx) + 0x18)?;
    for i in 0..shnum {
        let name_off = u32_at(sh(i))? as usize;
        let name_start = strtab_off + name_off;
        let name = elf
            .get(name_start..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .ok_or_else(|| "bad section name".to_string())?;
        if name == b".modinfo" {
            let off = u64_at(sh(i) + 0x18)?;
            let size = u64_at(sh(i) + 0x20)?;
            return elf
                .get(off..off + size)
                .ok_or_else(|| "truncated .modinfo".to_string());
        }
    }
    Err("no .modinfo section".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny ELF64 with sections: null, .shstrtab, .modinfo.
    pub(crate) fn fake_module(depends: &str) -> Vec<u8> {
        let shstr = b"\0.shstrtab\0.modinfo\0";
        let modinfo = format!("license=GPL\0depends={depends}\0vermagic=6.1\0");
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let shstr_off = elf.len();
        elf.extend_from_slice(shstr);
        let mi_off = elf.len();
        elf.extend_from_slice(modinfo.as_bytes());
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[0..4].copy_from_slice(&name.to_le_bytes());
            s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&s);
        };
        sh(0, 0, 0);
        sh(1, shstr_off, shstr.len());
        sh(11, mi_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3E..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn parses_depends_from_modinfo() {
        assert_eq!(
            modinfo_depends(&fake_module("virtio,virtio_ring")).unwrap(),
            ["virtio", "virtio_ring"]
        );
        assert!(modinfo_depends(&fake_module("")).unwrap().is_empty());
        assert!(modinfo_depends(b"\x7fELF\x02\x01short").is_err());
        assert!(modinfo_depends(b"garbage").is_err());
    }

    /// A fake module at `rel` under the modules dir `m`.
    fn put_module(m: &std::path::Path, rel: &str, deps: &str) {
        let p = m.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, fake_module(deps)).unwrap();
    }

    #[test]
    fn selects_in_dependency_order_skipping_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        let put = |rel: &str, deps: &str| put_module(m, rel, deps);
        put("kernel/drivers/virtio/virtio_ring.ko", "");
        put("kernel/drivers/virtio/virtio.ko", "virtio_ring");
        put("kernel/drivers/virtio/virtio_pci.ko", "virtio,virtio_ring");
        // `failover` is not requested before net_failover here: the dependency pulls it in.
        put("kernel/drivers/net/net_failover.ko", "failover");
        put("kernel/net/core/failover.ko", "");
        put(
            "kernel/drivers/net/virtio_net.ko",
            "net_failover,virtio,virtio_ring",
        );
        put("kernel/drivers/char/hw_random/virtio-rng.ko", "virtio");
        fs::write(
            m.join("modules.builtin"),
            "kernel/drivers/char/virtio_console.ko\n",
        )
        .unwrap();
        let sel = select_modules(
            m,
            &[
                "virtio_pci",
                "virtio_net",
                "virtio_console",
                "virtio_rng",
                "nope",
            ],
        )
        .unwrap();
        let names: Vec<&str> = sel.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_rng"
            ]
        );
        assert_eq!(
            sel[6].rel_path,
            "kernel/drivers/char/hw_random/virtio-rng.ko"
        );
    }

    #[test]
    fn later_sets_hold_only_what_earlier_ones_did_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        let put = |rel: &str, deps: &str| put_module(m, rel, deps);
        put("kernel/drivers/virtio/virtio_ring.ko", "");
        put("kernel/drivers/virtio/virtio.ko", "virtio_ring");
        put("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring");
        put("kernel/fs/ext4/ext4.ko", "jbd2,crc16");
        put("kernel/fs/jbd2/jbd2.ko", "");
        put("kernel/lib/crc16.ko", "");
        let sets = select_module_sets(m, &[&["virtio"], &["virtio_blk", "ext4"]]).unwrap();
        let names = |s: &[SelectedModule]| s.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&sets[0]), ["virtio_ring", "virtio"]);
        assert_eq!(names(&sets[1]), ["virtio_blk", "jbd2", "crc16", "ext4"]);
    }

    #[test]
    fn missing_dependency_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kernel/a.ko");
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, fake_module("ghost")).unwrap();
        let err = select_modules(dir.path(), &["a"]).unwrap_err();
        assert!(
            matches!(err, ImageError::Module { ref name, .. } if name == "ghost"),
            "{err}"
        );
    }
}
