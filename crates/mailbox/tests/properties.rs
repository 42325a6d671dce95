//! Property tests: round trip, single-bit flips, truncation, and a bounded
//! stable-Rust stand-in for the cargo-fuzz targets in `fuzz/` (random bytes
//! everywhere), which CI runs through scripts/fuzz.sh.

mod common;

use std::io::Cursor;
use std::net::Ipv4Addr;

use common::*;
use forkvm_mailbox::*;
use proptest::prelude::*;

fn fuzz_cases() -> u32 {
    std::env::var("FVM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip(p in valid_payload(), generation in any::<u64>(), marker in any::<[u8; 16]>()) {
        let marker = MarkerId(marker);
        prop_assume!(marker.is_valid());
        let mut page = vec![0u8; PAGE_SIZE];
        arm(&mut page, marker).unwrap();
        patch(&mut page, &marker, generation, &p).unwrap();
        let (g, got) = decode(&page, &marker).unwrap();
        prop_assert_eq!(g, generation);
        prop_assert_eq!(got, p);
    }

    #[test]
    fn truncated_or_extended_pages_rejected(p in valid_payload(), cut in 0usize..PAGE_SIZE, extra in 1usize..64) {
        let page = patched(1, &p);
        let is_size_err = |r: Result<(u64, Payload), MailboxError>| matches!(r, Err(MailboxError::PageSize { .. }));
        prop_assert!(is_size_err(decode(&page[..cut], &MARKER)));
        let mut longer = page.clone();
        longer.extend(std::iter::repeat_n(0u8, extra));
        prop_assert!(is_size_err(decode(&longer, &MARKER)));
    }

    #[test]
    fn ack_round_trip_and_forgery(key in any::<[u8; 32]>(), other in any::<[u8; 32]>(), generation in any::<u64>(),
                                  mac in any::<[u8; 6]>(), ip in any::<u32>(), bit in 0usize..ACK_LEN * 8) {
        prop_assume!(key != other);
        let (key, mac, ip) = (AckKey(key), MacAddr(mac), Ipv4Addr::from(ip));
        let a = ack_encode(&key, generation, mac, ip);
        prop_assert_eq!(ack_verify(&a, &key, generation, mac, ip).map(|x| x.generation), Ok(generation));
        prop_assert_eq!(ack_verify(&a, &AckKey(other), generation, mac, ip), Err(AckError::BadTag));
        let mut f = a.clone();
        f[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(ack_verify(&f, &key, generation, mac, ip).is_err());
    }
}

proptest! {
    // Each case flips every bit of the header and payload: ~4-6k decodes.
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn every_single_bit_flip_is_rejected_or_harmless(p in valid_payload(), generation in any::<u64>(),
                                                     tail_bits in prop::collection::vec(0usize..PAGE_SIZE * 8, 64)) {
        let page = patched(generation, &p);
        let expected = decode(&page, &MARKER).unwrap();
        let body_end = OFF_PAYLOAD + p.to_json().unwrap().len();
        // All header and payload bits, plus a sample of tail bits.
        let bits = (0..body_end * 8).chain(tail_bits.into_iter().filter(|b| b / 8 >= body_end));
        let (mut rejected, mut harmless) = (0u32, 0u32);
        for bit in bits {
            let byte = bit / 8;
            let mut f = page.clone();
            f[byte] ^= 1 << (bit % 8);
            match decode(&f, &MARKER) {
                Err(_) => {
                    prop_assert!(!(OFF_GUEST_AREA..HEADER_SIZE).contains(&byte), "guest-area flip at {} rejected", byte);
                    rejected += 1;
                }
                Ok(got) => {
                    // Only the guest telemetry area may be flipped without effect.
                    prop_assert!((OFF_GUEST_AREA..HEADER_SIZE).contains(&byte), "flip at byte {} bit {} accepted", byte, bit % 8);
                    prop_assert_eq!(&got, &expected);
                    harmless += 1;
                }
            }
        }
        prop_assert_eq!(harmless, 64 * 8);
        prop_assert!(rejected >= 64 * 8);
    }
}

proptest! {
    // Bounded "fuzzing" on stable Rust: random input must never panic.
    // FVM_FUZZ_CASES raises the budget for longer runs.
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..PAGE_SIZE + 16),
                            key in any::<[u8; 32]>(), mac in any::<[u8; 6]>(), generation in any::<u64>()) {
        let _ = read_header(&bytes);
        let _ = decode(&bytes, &MARKER);
        let _ = locate_at(&bytes, 0, &MARKER);
        let _ = scan(&mut Cursor::new(&bytes), &MARKER);
        let _ = Payload::from_json(&bytes).map(|p| p.validate());
        let r = ack_verify(&bytes, &AckKey(key), generation, MacAddr(mac), Ipv4Addr::LOCALHOST);
        prop_assert!(r.is_err());
    }

    #[test]
    fn structured_garbage_never_panics(guest in prop::collection::vec(any::<u8>(), 64),
                                       len in prop::option::of(any::<u32>()),
                                       body in prop::collection::vec(any::<u8>(), 0..600),
                                       state in 0usize..4) {
        // Valid magic/marker/version/CRCs around random content reaches
        // the deep checks (length, payload CRC, JSON, field validation).
        let mut page = armed();
        raw_write(&mut page, 1, &body);
        page[OFF_GUEST_AREA..HEADER_SIZE].copy_from_slice(&guest);
        if let Some(len) = len {
            page[40..44].copy_from_slice(&len.to_le_bytes());
            reseal(&mut page);
        }
        let word = [b"EMPT", b"WRTN", b"APLD", b"RJCT"][state];
        page[28..32].copy_from_slice(word);
        let _ = decode(&page, &MARKER);
        let _ = read_header(&page);
        let _ = patch(&mut page.clone(), &MARKER, 2, &payload());
    }

    #[test]
    fn random_json_values_never_panic(p in valid_payload(), key in "[a-z_]{1,12}", val in prop_oneof![
        Just("null".to_string()), Just("-1".to_string()), Just("1e400".to_string()),
        Just("\"\"".to_string()), Just("[]".to_string()), Just("{}".to_string()),
        any::<i64>().prop_map(|v| v.to_string()), "\"[ -~]{0,40}\"",
    ]) {
        // Replace one field (or add one) with a hostile value.
        let mut v = serde_json::to_value(&p).unwrap();
        v[key.as_str()] = serde_json::from_str(&val).unwrap_or(serde_json::Value::Null);
        let body = serde_json::to_vec(&v).unwrap();
        prop_assume!(body.len() <= MAX_PAYLOAD);
        let mut page = armed();
        raw_write(&mut page, 1, &body);
        let _ = decode(&page, &MARKER);
    }
}
