//! Arbitrary bytes through every page parser: must never panic.
#![no_main]

use forkvm_mailbox::{MarkerId, Payload, decode, locate_at, read_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let marker = MarkerId([0xA5; 16]);
    let _ = read_header(data);
    let _ = decode(data, &marker);
    let _ = locate_at(data, 0, &marker);
    if let Ok(p) = Payload::from_json(data) {
        let _ = p.validate();
    }
    // Also try the input as a page whose first 16 bytes name the marker.
    if data.len() >= 16 {
        let mut m = [0u8; 16];
        m.copy_from_slice(&data[..16]);
        let _ = decode(&data[16..], &MarkerId(m));
    }
});
