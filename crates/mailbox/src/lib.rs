//! # forkvm-mailbox — the host/guest mailbox contract
//!
//! To re-address a forked VM without a host round trip, the host writes the
//! fork's new identity into one page of guest RAM (the *mailbox*) while the
//! fork is paused; the guest agent, which allocated, pinned and *armed* that
//! page at start-up, notices the fork, validates and applies the payload, and
//! acknowledges over its new address with an HMAC-authenticated datagram.
//!
//! This crate is only the contract both sides share: the page layout,
//! [`arm`] / [`patch`] / [`decode`] / [`mark`], locating the page
//! ([`locate_at`], [`scan`], [`scan_file`]) and the ack format
//! ([`ack_encode`], [`ack_verify`]). It does no I/O policy of its own (the
//! scans read what they are handed). `docs/mailbox.md` has the same tables
//! plus the threat model.
//!
//! ## Page layout (4096 bytes, little-endian)
//!
//! | offset | size | field | written by | covered by |
//! |---:|---:|---|---|---|
//! | 0 | 8 | magic `FVMBOX\0\x01` ([`MAGIC`]) | guest (arm) | header CRC |
//! | 8 | 16 | marker id, random per arm ([`MarkerId`]) | guest (arm) | header CRC |
//! | 24 | 4 | layout version u32, = 1 ([`LAYOUT_VERSION`]) | guest (arm) | header CRC |
//! | 28 | 4 | state word u32 ([`MailboxState`]) | both | own encoding (tags ≥ 2 bits apart) |
//! | 32 | 8 | generation u64 (per fork, chosen by host; 0 when armed) | host | header CRC |
//! | 40 | 4 | payload length u32 (0..=3968; ≥ 1 when WRITTEN) | host | header CRC |
//! | 44 | 4 | CRC32C of the payload bytes | host | header CRC |
//! | 48 | 4 | header CRC32C over bytes 0..28, 32..48, 52..64 | host / arm | — |
//! | 52 | 12 | reserved, must be zero | — | header CRC |
//! | 64 | 8 | guest: signal seen, µs (guest CLOCK_MONOTONIC) | guest | none (telemetry) |
//! | 72 | 8 | guest: µs from signal seen to applied/rejected (a duration) | guest | none |
//! | 80 | 8 | guest: generation the outcome refers to | guest | none |
//! | 88 | 4 | guest: reject code ([`MailboxError::code`], 0 = ok) | guest | none |
//! | 92 | 36 | guest: reserved (ignored) | guest | none |
//! | 128 | len | payload: JSON [`Payload`] | host | payload CRC |
//! | 128+len | rest | zero | host | checked zero by [`decode`] |
//!
//! State words are ASCII tags: EMPTY `"EMPT"`, WRITTEN `"WRTN"`,
//! APPLIED `"APLD"`, REJECTED `"RJCT"` (read as u32 LE).
//!
//! ## Write ordering
//!
//! The state word is the publication point. [`patch`] writes generation,
//! length, payload CRC, header CRC, payload and zero tail first, then a
//! `SeqCst` fence, then the state word with volatile byte stores; when
//! re-patching a WRITTEN page it first retracts it to EMPTY. Readers
//! ([`decode`], [`read_header`]) load the state word first (volatile, then an
//! acquire fence) and check the rest afterwards; the CRCs catch anything torn
//! in between. A host writing into a paused guest through process memory
//! should use [`prepare_patch`] and issue [`PreparedPatch::writes`] in order
//! (state word last).
//!
//! ## Bit-flip coverage
//!
//! After a patch, a single flipped bit anywhere in bytes 0..64 or in the
//! payload or tail is rejected by [`decode`] (magic, marker, version, state
//! encoding, header CRC, payload CRC or zero-tail check). Bytes 64..128 are
//! guest-written telemetry that [`decode`] never reads: flips there are
//! harmless to the contract (they only distort the host's timing read-back).

mod ack;
mod error;
mod layout;
mod locate;
mod mac;
mod payload;

pub use ack::{ACK_LEN, ACK_MAGIC, ACK_SIGNED_LEN, Ack, ack_encode, ack_verify};
pub use error::{AckError, FieldError, MailboxError};
pub use layout::{
    Forgery, GuestReport, HEADER_SIZE, Header, LAYOUT_VERSION, MAGIC, MAX_PAYLOAD, MailboxState,
    MarkerId, OFF_APPLIED_US, OFF_GENERATION, OFF_GUEST_AREA, OFF_HEADER_CRC, OFF_MAGIC,
    OFF_MARKER, OFF_OUTCOME_GENERATION, OFF_PAYLOAD, OFF_PAYLOAD_CRC, OFF_PAYLOAD_LEN,
    OFF_REJECT_CODE, OFF_RESERVED, OFF_SIGNAL_SEEN_US, OFF_STATE, OFF_VERSION, PAGE_SIZE,
    PreparedPatch, arm, decode, forge, mark, patch, prepare_patch, read_header, verify_marker,
    write_guest_report,
};
pub use locate::{locate_at, scan, scan_file};
pub use mac::{MacAddr, MacParseError};
pub use payload::{
    AckKey, AckTarget, MAX_DNS_SERVERS, MAX_HOSTNAME_LEN, MAX_IFNAME_LEN, Payload, Seed,
};
