//! Shared test helpers: a valid payload, a payload strategy, and a raw
//! page writer built from the *documented* offsets (not the crate's code),
//! so the layout table is checked independently.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use forkvm_mailbox::*;
use proptest::prelude::*;

pub const MARKER: MarkerId = MarkerId([0xA5; 16]);

pub fn payload() -> Payload {
    Payload {
        interface: "eth0".into(),
        mac: MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]),
        ipv4: Ipv4Addr::new(172, 30, 5, 17),
        prefix_len: 24,
        gateway: Ipv4Addr::new(172, 30, 5, 1),
        dns: vec![Ipv4Addr::new(172, 30, 5, 1), Ipv4Addr::new(9, 9, 9, 9)],
        hostname: "fork-17.sandbox".into(),
        host_time_unix_ns: 1_760_000_000_123_456_789,
        clock_behind_ns: Some(86_400_000_000_000),
        rng_seed: Seed([0x42; 32]),
        ack: AckTarget {
            ip: Ipv4Addr::new(172, 30, 5, 1),
            port: 40_000,
            key: AckKey([0x17; 32]),
        },
    }
}

pub fn armed() -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    arm(&mut page, MARKER).unwrap();
    page
}

pub fn patched(generation: u64, p: &Payload) -> Vec<u8> {
    let mut page = armed();
    patch(&mut page, &MARKER, generation, p).unwrap();
    page
}

/// Header CRC per the documented coverage: bytes 0..28, 32..48, 52..64.
pub fn doc_header_crc(page: &[u8]) -> u32 {
    let c = crc32c::crc32c(&page[0..28]);
    let c = crc32c::crc32c_append(c, &page[32..48]);
    crc32c::crc32c_append(c, &page[52..64])
}

pub fn reseal(page: &mut [u8]) {
    let c = doc_header_crc(page);
    page[48..52].copy_from_slice(&c.to_le_bytes());
}

/// Writes an arbitrary body as a WRITTEN payload, from the documented layout.
pub fn raw_write(page: &mut [u8], generation: u64, body: &[u8]) {
    page[32..40].copy_from_slice(&generation.to_le_bytes());
    page[40..44].copy_from_slice(&(body.len() as u32).to_le_bytes());
    page[44..48].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    page[128..128 + body.len()].copy_from_slice(body);
    page[128 + body.len()..].fill(0);
    reseal(page);
    page[28..32].copy_from_slice(b"WRTN");
}

fn arr32() -> impl Strategy<Value = [u8; 32]> {
    prop::array::uniform32(any::<u8>()).prop_filter("non-zero", |a| *a != [0; 32])
}

/// Arbitrary payloads that pass `validate()`.
pub fn valid_payload() -> impl Strategy<Value = Payload> {
    let addr = (
        1u8..=30,
        1u8..=223,
        any::<[u8; 3]>(),
        any::<u32>(),
        any::<u32>(),
        any::<bool>(),
    );
    let mac = prop::array::uniform6(any::<u8>())
        .prop_map(|mut m| {
            m[0] &= 0xfe;
            MacAddr(m)
        })
        .prop_filter("non-zero", |m| !m.is_zero());
    (
        addr,
        mac,
        "[a-z][a-z0-9]{0,14}",
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]{1,10}){0,2}",
        prop::collection::vec(any::<[u8; 4]>(), 0..=3),
        1u64..,
        arr32(),
        arr32(),
        1u16..,
    )
        .prop_map(
            |((prefix, o1, rest, h1, h2, ack_is_gw), mac, iface, host, dns, t, seed, key, port)| {
                let mask = u32::MAX << (32 - u32::from(prefix));
                let net = u32::from_be_bytes([o1, rest[0], rest[1], rest[2]]) & mask;
                let hosts = !mask - 1; // usable hosts: 1..=hosts
                let a = net | (1 + h1 % hosts);
                let mut g = net | (1 + h2 % hosts);
                if g == a {
                    g = net | (1 + (h1 + 1) % hosts);
                }
                let mut dns: Vec<Ipv4Addr> = dns.into_iter().map(Ipv4Addr::from).collect();
                dns.retain(|d| {
                    !(d.is_unspecified() || d.is_loopback() || d.is_multicast() || d.is_broadcast())
                });
                dns.dedup();
                let gw = Ipv4Addr::from(g);
                let other = net | (1 + h2.rotate_left(7) % hosts);
                let ack_ip = if ack_is_gw || other == a {
                    gw
                } else {
                    Ipv4Addr::from(other)
                };
                Payload {
                    interface: iface,
                    mac,
                    ipv4: Ipv4Addr::from(a),
                    prefix_len: prefix,
                    gateway: gw,
                    dns,
                    hostname: host,
                    host_time_unix_ns: t,
                    clock_behind_ns: (t % 3 != 0).then_some(t / 2),
                    rng_seed: Seed(seed),
                    ack: AckTarget {
                        ip: ack_ip,
                        port,
                        key: AckKey(key),
                    },
                }
            },
        )
        .prop_filter("valid", |p| p.validate().is_ok())
}
