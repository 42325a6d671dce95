//! Interface naming.

use sha2::{Digest, Sha256};

use crate::NetError;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Prefix of every TAP forkvm creates; lets operators (and cleanup) find them.
pub const TAP_PREFIX: &str = "fvm";

/// The TAP name for an instance: `fvm` + 12 characters of base32 of
/// SHA-256(instance id), 15 bytes in total.
///
/// Deterministic, so a restarted daemon finds its TAPs again. Hashing rather
/// than truncating keeps ids that share a 12-character prefix (`fork-of-web-1`,
/// `fork-of-web-2`) apart; the 60 bits make accidental collisions negligible,
/// and the state store still keeps TAP names UNIQUE.
pub fn tap_name_for(instance_id: &str) -> String {
    // RFC 4648 base32, lowercased: only [a-z2-7], all valid in interface names.
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let digest = Sha256::digest(instance_id.as_bytes());
    // 12 symbols × 5 bits = 60 bits, taken from the first 8 digest bytes.
    let mut bits = u64::from_be_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ]);
    let mut name = String::with_capacity(IFNAME_MAX);
    name.push_str(TAP_PREFIX);
    for _ in 0..12 {
        name.push(char::from(ALPHABET[(bits >> 59) as usize]));
        bits <<= 5;
    }
    name
}

/// Checks a name the kernel would accept for a new interface.
pub fn validate_ifname(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(NetError::InvalidIfName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_name_shape() {
        for id in [
            "",
            "a",
            "web-1",
            &"x".repeat(63),
            "6f1c3a52-8d7e-4f0b-9a51-0f3b2c1d4e5f",
            "ünïcødé",
        ] {
            let n = tap_name_for(id);
            assert_eq!(n.len(), IFNAME_MAX, "{n}");
            assert!(n.starts_with(TAP_PREFIX));
            assert!(validate_ifname(&n).is_ok(), "{n}");
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            );
        }
    }

    #[test]
    fn tap_name_deterministic_and_distinct() {
        assert_eq!(tap_name_for("web-1"), tap_name_for("web-1"));
        // Known value (computed independently with Python's base64.b32encode)
        // pins the scheme: changing it would orphan TAPs of running instances.
        assert_eq!(tap_name_for("web-1"), "fvmyryzv6tw7jci");
        let names: std::collections::HashSet<String> = (0..10_000)
            .map(|i| tap_name_for(&format!("fork-of-web-{i}")))
            .collect();
        assert_eq!(names.len(), 10_000);
    }

    #[test]
    fn ifname_validation() {
        for good in ["forkvm0", "fvmabcdefghijkl", "br-x_1"] {
            assert!(validate_ifname(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "a:b", "a b", ".", "..", "sixteen-chars-xx"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
