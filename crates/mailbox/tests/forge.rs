//! `forge` produces pages that `decode` rejects for exactly the intended reason.

use forkvm_mailbox::*;
use std::net::Ipv4Addr;

fn payload() -> Payload {
    Payload {
        interface: "eth0".into(),
        mac: "02:fc:00:00:00:09".parse().unwrap(),
        ipv4: Ipv4Addr::new(10, 0, 0, 9),
        prefix_len: 24,
        gateway: Ipv4Addr::new(10, 0, 0, 1),
        dns: vec![],
        hostname: "f".into(),
        host_time_unix_ns: 1,
        clock_behind_ns: None,
        rng_seed: Seed([7; 32]),
        ack: AckTarget {
            ip: Ipv4Addr::new(10, 0, 0, 1),
            port: 9,
            key: AckKey([9; 32]),
        },
    }
}

#[test]
fn every_forgery_is_rejected_for_its_reason() {
    let marker = MarkerId([5; 16]);
    for (how, expect) in [
        (Forgery::BadCrc, "crc"),
        (Forgery::WrongVersion, "version"),
        (Forgery::MulticastMac, "unicast"),
        (Forgery::PrefixTooLong, "prefix"),
    ] {
        let mut page = vec![0u8; PAGE_SIZE];
        arm(&mut page, marker).unwrap();
        forge(&mut page, &marker, 42, &payload(), how).unwrap();
        let err = decode(&page, &marker).expect_err("forged page accepted");
        let msg = err.to_string().to_lowercase();
        assert!(msg.contains(expect), "{how:?}: {msg}");
    }
    // Control: the same payload patched honestly decodes.
    let mut page = vec![0u8; PAGE_SIZE];
    arm(&mut page, marker).unwrap();
    patch(&mut page, &marker, 42, &payload()).unwrap();
    assert_eq!(decode(&page, &marker).unwrap().0, 42);
}
