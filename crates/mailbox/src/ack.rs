//! The authenticated ack datagram the guest sends over its new address.
//!
//! Fixed-size binary, 58 bytes, little-endian where numeric:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `FVMACK\0\x01` |
//! | 8 | 8 | generation (u64 LE) |
//! | 16 | 6 | MAC the guest applied |
//! | 22 | 4 | IPv4 the guest applied (network byte order) |
//! | 26 | 32 | HMAC-SHA256(key, bytes 0..26) |

use std::net::Ipv4Addr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::AckError;
use crate::mac::MacAddr;
use crate::payload::AckKey;

pub const ACK_MAGIC: [u8; 8] = *b"FVMACK\0\x01";
/// Bytes covered by the tag.
pub const ACK_SIGNED_LEN: usize = 26;
/// Total datagram length; anything else is rejected.
pub const ACK_LEN: usize = ACK_SIGNED_LEN + 32;

type HmacSha256 = Hmac<Sha256>;

/// A verified ack.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Ack {
    pub generation: u64,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub tag: [u8; 32],
}

fn keyed(key: &AckKey) -> HmacSha256 {
    // HMAC zero-pads keys shorter than the 64-byte SHA-256 block (RFC 2104),
    // so padding by hand gives the same MAC through the infallible
    // fixed-size constructor instead of the fallible `new_from_slice`.
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(key.as_bytes());
    <HmacSha256 as hmac::digest::KeyInit>::new(&k.into())
}

fn signed_part(generation: u64, mac: MacAddr, ip: Ipv4Addr) -> [u8; ACK_SIGNED_LEN] {
    let mut b = [0u8; ACK_SIGNED_LEN];
    b[..8].copy_from_slice(&ACK_MAGIC);
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    b[16..22].copy_from_slice(&mac.0);
    b[22..26].copy_from_slice(&ip.octets());
    b
}

/// Guest: build the ack datagram.
pub fn ack_encode(key: &AckKey, generation: u64, mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    let signed = signed_part(generation, mac, ip);
    let mut m = keyed(key);
    m.update(&signed);
    let tag = m.finalize().into_bytes();
    let mut out = Vec::with_capacity(ACK_LEN);
    out.extend_from_slice(&signed);
    out.extend_from_slice(&tag);
    out
}

/// Host: strictly parse and authenticate an ack, then check it is for the
/// expected fork. The tag is checked (in constant time) before any field is
/// interpreted, so an unauthenticated sender learns nothing but "bad tag".
pub fn ack_verify(
    bytes: &[u8],
    key: &AckKey,
    expected_generation: u64,
    expected_mac: MacAddr,
    expected_ip: Ipv4Addr,
) -> Result<Ack, AckError> {
    if bytes.len() < ACK_LEN {
        return Err(AckError::Truncated {
            len: bytes.len(),
            expected: ACK_LEN,
        });
    }
    if bytes.len() > ACK_LEN {
        return Err(AckError::TrailingBytes {
            len: bytes.len(),
            expected: ACK_LEN,
        });
    }
    if bytes[..8] != ACK_MAGIC {
        return Err(AckError::BadMagic);
    }
    let (signed, tag) = bytes.split_at(ACK_SIGNED_LEN);
    let mut m = keyed(key);
    m.update(signed);
    m.verify_slice(tag).map_err(|_| AckError::BadTag)?;

    let mut g = [0u8; 8];
    g.copy_from_slice(&signed[8..16]);
    let generation = u64::from_le_bytes(g);
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&signed[16..22]);
    let mac = MacAddr(mac);
    let ip = Ipv4Addr::new(signed[22], signed[23], signed[24], signed[25]);
    let mut t = [0u8; 32];
    t.copy_from_slice(tag);

    if generation != expected_generation {
        return Err(AckError::WrongGeneration {
            got: generation,
            expected: expected_generation,
        });
    }
    if mac != expected_mac {
        return Err(AckError::WrongMac);
    }
    if ip != expected_ip {
        return Err(AckError::WrongIp {
            got: ip,
            expected: expected_ip,
        });
    }
    Ok(Ack {
        generation,
        mac,
        ip,
        tag: t,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 9]);
    const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);

    #[test]
    fn padded_key_equals_rfc_hmac() {
        let key = AckKey([0x5a; 32]);
        let mut a = keyed(&key);
        a.update(b"x");
        let mut b = match HmacSha256::new_from_slice(key.as_bytes()) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        b.update(b"x");
        assert_eq!(a.finalize().into_bytes(), b.finalize().into_bytes());
    }

    #[test]
    fn known_answer() {
        // RFC 4231 test case 1: key 0x0b x 20. Zero-padding it to 32 bytes
        // is the same HMAC key, so our fixed-size path must reproduce it.
        let mut k = [0u8; 32];
        k[..20].fill(0x0b);
        let mut m = keyed(&AckKey(k));
        m.update(b"Hi There");
        let want = "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7";
        let got: String = m
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, want);

        let a = ack_encode(&AckKey([1; 32]), 7, MAC, IP);
        assert_eq!(a.len(), ACK_LEN);
        assert_eq!(&a[..8], b"FVMACK\0\x01");
        assert_eq!(&a[8..16], &7u64.to_le_bytes());
        assert_eq!(&a[16..22], &MAC.0);
        assert_eq!(&a[22..26], &[10, 0, 0, 9]);
    }

    #[test]
    fn round_trip() {
        let key = AckKey([3; 32]);
        let a = ack_encode(&key, 42, MAC, IP);
        let ack = ack_verify(&a, &key, 42, MAC, IP).unwrap();
        assert_eq!((ack.generation, ack.mac, ack.ip), (42, MAC, IP));
        assert_eq!(&ack.tag[..], &a[26..]);
    }

    #[test]
    fn rejections() {
        let key = AckKey([3; 32]);
        let a = ack_encode(&key, 42, MAC, IP);
        assert_eq!(
            ack_verify(&a, &AckKey([4; 32]), 42, MAC, IP),
            Err(AckError::BadTag)
        );
        assert_eq!(
            ack_verify(&a, &key, 43, MAC, IP),
            Err(AckError::WrongGeneration {
                got: 42,
                expected: 43
            })
        );
        assert_eq!(
            ack_verify(&a, &key, 42, MacAddr([2, 0, 0, 0, 0, 8]), IP),
            Err(AckError::WrongMac)
        );
        assert!(matches!(
            ack_verify(&a, &key, 42, MAC, Ipv4Addr::new(10, 0, 0, 8)),
            Err(AckError::WrongIp { .. })
        ));
        assert_eq!(
            ack_verify(&a[..ACK_LEN - 1], &key, 42, MAC, IP),
            Err(AckError::Truncated {
                len: ACK_LEN - 1,
                expected: ACK_LEN
            })
        );
        assert_eq!(
            ack_verify(&[], &key, 42, MAC, IP),
            Err(AckError::Truncated {
                len: 0,
                expected: ACK_LEN
            })
        );
        let mut ext = a.clone();
        ext.push(0);
        assert_eq!(
            ack_verify(&ext, &key, 42, MAC, IP),
            Err(AckError::TrailingBytes {
                len: ACK_LEN + 1,
                expected: ACK_LEN
            })
        );
        let mut bad_magic = a.clone();
        bad_magic[0] ^= 1;
        assert_eq!(
            ack_verify(&bad_magic, &key, 42, MAC, IP),
            Err(AckError::BadMagic)
        );
        // Forged fields with the old tag: caught by the tag, not by the field check.
        let mut forged = a.clone();
        forged[8] = 43;
        assert_eq!(
            ack_verify(&forged, &key, 43, MAC, IP),
            Err(AckError::BadTag)
        );
        // Every single-bit flip anywhere is rejected.
        for bit in 0..ACK_LEN * 8 {
            let mut f = a.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            assert!(ack_verify(&f, &key, 42, MAC, IP).is_err(), "bit {bit}");
        }
    }
}
