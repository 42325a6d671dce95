//! Arbitrary datagrams through the ack parser: never panic, never accept
//! a datagram that ack_encode did not produce for this key.
#![no_main]

use std::net::Ipv4Addr;

use forkvm_mailbox::{AckKey, MacAddr, ack_encode, ack_verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = AckKey([0x17; 32]);
    let (generation, mac, ip) = (
        7u64,
        MacAddr([2, 0, 0, 0, 0, 1]),
        Ipv4Addr::new(10, 0, 0, 2),
    );
    if ack_verify(data, &key, generation, mac, ip).is_ok() {
        assert_eq!(data, &ack_encode(&key, generation, mac, ip)[..]);
    }
});
