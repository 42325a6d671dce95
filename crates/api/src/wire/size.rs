//! Human-readable memory sizes ("256MB", "1GB") as hypeman spells them.

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// Parse a human-readable memory size into MiB.
///
/// Accepts an integer followed by an optional unit: none/`B` (bytes),
/// `K`/`KB`/`KiB`, `M`/`MB`/`MiB`, `G`/`GB`/`GiB`, `T`/`TB`/`TiB`, case-insensitive;
/// units are binary like hypeman's. The result must be a whole, non-zero
/// number of MiB that fits in u32. Hand-rolled: the grammar is tiny and a crate
/// would accept more (decimals, SI units) than we want.
pub fn parse_size_mb(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid size {s:?}: use e.g. \"256MB\", \"1GB\", \"512MiB\"");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => TIB,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if bytes == 0 {
        return Err(format!("invalid size {s:?}: must be more than zero"));
    }
    if !bytes.is_multiple_of(MIB) {
        return Err(format!("invalid size {s:?}: must be a whole number of MiB"));
    }
    u32::try_from(bytes / MIB).map_err(|_| format!("invalid size {s:?}: too large"))
}

/// Format MiB the way hypeman prints sizes: "1GB" when whole GiB, else "256MB".
pub fn format_size_mb(mb: u32) -> String {
    if mb != 0 && mb.is_multiple_of(1024) {
        format!("{}GB", mb / 1024)
    } else {
        format!("{mb}MB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (s, mb) in [
            ("256MB", 256),
            ("256mb", 256),
            ("1GB", 1024),
            ("2G", 2048),
            ("512MiB", 512),
            ("512 MiB", 512),
            ("1048576", 1),
            ("1024K", 1),
            ("1TiB", 1024 * 1024),
        ] {
            assert_eq!(parse_size_mb(s), Ok(mb), "{s}");
        }
        for s in [
            "",
            "MB",
            "0MB",
            "1.5GB",
            "-1GB",
            "12XB",
            "100",
            "1KB",
            "abc",
            "1 G B",
            "99999999T",
        ] {
            assert!(parse_size_mb(s).is_err(), "{s}");
        }
        assert_eq!(format_size_mb(256), "256MB");
        assert_eq!(format_size_mb(1024), "1GB");
        assert_eq!(format_size_mb(1536), "1536MB");
    }
}
