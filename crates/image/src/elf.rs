//! Is the guest agent a static binary? It runs as `/init` of an initramfs
//! with no dynamic loader and no libc, so a dynamically linked one (what a
//! plain `cargo build` makes) can never start: the guest drops to a shell
//! and every create times out. Checked from the ELF program headers (a
//! `PT_INTERP` entry names a loader); hand-written because it is twenty
//! lines of fixed offsets, not worth a parser crate.

const PT_INTERP: u32 = 3;

/// Why `bytes` cannot run as `/init`, or `None`: a static x86-64 ELF
/// executable, or a `#!` script (its interpreter, busybox's sh, is in the
/// initramfs).
pub(crate) fn not_static(bytes: &[u8]) -> Option<String> {
    if bytes.starts_with(b"#!") {
        return None;
    }
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Some("neither an ELF executable nor a #! script".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Some("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if u16_at(18) != 62 {
        return Some("not an x86-64 executable".into());
    }
    let phoff = u64_at(32)? as usize;
    let (phentsize, phnum) = (u16_at(54) as usize, u16_at(56) as usize);
    for i in 0..phnum {
        let Some(kind) = u32_at(phoff.saturating_add(i.saturating_mul(phentsize))) else {
            return Some("truncated program headers".into());
        };
        if kind == PT_INTERP {
            return Some(
                "dynamically linked (it names a program interpreter); build it with \
                 RUSTFLAGS=\"-C target-feature=+crt-static\" --target x86_64-unknown-linux-gnu"
                    .into(),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_is_judged_by_its_interpreter() {
        // The test binary itself: dynamically linked in a normal build.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let dynamic = std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .contains("ld-linux");
        assert_eq!(not_static(&me).is_some(), dynamic);
    }

    #[test]
    fn garbage_and_truncation_are_refused() {
        assert!(not_static(b"#!/bin/sh\necho hi\n").is_none(), "scripts run");
        assert!(not_static(b"MZ\x90\x00").is_some());
        let mut hdr = vec![0u8; 64];
        hdr[..4].copy_from_slice(b"\x7fELF");
        hdr[4] = 2;
        hdr[5] = 1;
        hdr[18] = 62;
        hdr[32] = 200; // program headers beyond the end
        hdr[56] = 1;
        assert_eq!(
            not_static(&hdr).as_deref(),
            Some("truncated program headers")
        );
    }
}
