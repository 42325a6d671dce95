//! Typed errors for every way a mailbox page, payload or ack can be rejected.

use std::net::Ipv4Addr;

use crate::layout::MailboxState;

/// Why a mailbox page or payload was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// The slice handed in is not exactly one page.
    #[error("mailbox page must be exactly {expected} bytes, got {len}")]
    PageSize { len: usize, expected: usize },
    /// The first 8 bytes are not [`crate::MAGIC`]: not a mailbox (or not armed).
    #[error("bad mailbox magic")]
    BadMagic,
    /// The layout version is not one this build understands.
    #[error("unsupported mailbox layout version {0}")]
    UnsupportedVersion(u32),
    /// The page carries another arm's marker (stale copy or wrong page).
    #[error("mailbox marker mismatch")]
    MarkerMismatch,
    /// An all-zero marker id was supplied; markers must be random.
    #[error("marker id must not be all zero")]
    InvalidMarker,
    /// The state word holds none of the four defined values.
    #[error("unknown mailbox state word {0:#010x}")]
    UnknownState(u32),
    /// The state word is valid but not one the operation accepts.
    #[error("mailbox state is {found:?}, expected {expected}")]
    BadState {
        found: MailboxState,
        expected: &'static str,
    },
    /// The header checksum does not match the header fields.
    #[error("header CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    /// A reserved header byte the host must leave zero is not zero.
    #[error("reserved header byte at offset {offset} is not zero")]
    ReservedNotZero { offset: usize },
    /// The payload length field is zero (in WRITTEN state) or larger than the page allows.
    #[error("payload length {len} out of range (1..={max})")]
    LengthOutOfRange { len: u32, max: usize },
    /// The payload checksum does not match the payload bytes.
    #[error("payload CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    PayloadCrc { stored: u32, computed: u32 },
    /// Bytes after the payload are not zero (leftover or injected data).
    #[error("non-zero byte after the payload at page offset {offset}")]
    TrailingGarbage { offset: usize },
    /// The encoded payload does not fit in one page.
    #[error("encoded payload is {len} bytes, at most {max} fit")]
    PayloadTooLarge { len: usize, max: usize },
    /// The payload is not valid JSON for [`crate::Payload`].
    #[error("payload JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The payload parsed but a field is semantically invalid.
    #[error("invalid payload field: {0}")]
    InvalidField(#[from] FieldError),
    /// `locate_at` was given an offset that is not page-aligned.
    #[error("offset {offset:#x} is not page-aligned")]
    Misaligned { offset: u64 },
    /// `locate_at` was given an offset past the end of the memory.
    #[error("offset {offset:#x} + one page is past the end of memory ({len:#x} bytes)")]
    OutOfRange { offset: u64, len: u64 },
    /// A scan found the marker at more than one page: refuse to guess.
    #[error("marker found at two offsets ({first:#x} and {second:#x})")]
    AmbiguousMarker { first: u64, second: u64 },
    /// Reading the memory file failed during a scan.
    #[error("reading memory: {0}")]
    Io(#[from] std::io::Error),
}

impl MailboxError {
    /// A stable numeric reason code the guest can write into the page's
    /// guest area (`reject_code`) so the host can read back why a payload
    /// was rejected without a side channel. 0 means "no error".
    pub fn code(&self) -> u32 {
        match self {
            MailboxError::PageSize { .. } => 1,
            MailboxError::BadMagic => 2,
            MailboxError::UnsupportedVersion(_) => 3,
            MailboxError::MarkerMismatch => 4,
            MailboxError::InvalidMarker => 5,
            MailboxError::UnknownState(_) => 6,
            MailboxError::BadState { .. } => 7,
            MailboxError::HeaderCrc { .. } => 8,
            MailboxError::ReservedNotZero { .. } => 9,
            MailboxError::LengthOutOfRange { .. } => 10,
            MailboxError::PayloadCrc { .. } => 11,
            MailboxError::TrailingGarbage { .. } => 12,
            MailboxError::PayloadTooLarge { .. } => 13,
            MailboxError::Json(_) => 14,
            MailboxError::InvalidField(_) => 15,
            MailboxError::Misaligned { .. } => 16,
            MailboxError::OutOfRange { .. } => 17,
            MailboxError::AmbiguousMarker { .. } => 18,
            MailboxError::Io(_) => 19,
        }
    }
}

/// A payload field that parsed but must not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FieldError {
    #[error("interface name is empty")]
    InterfaceEmpty,
    #[error("interface name is {len} bytes, at most 15 allowed")]
    InterfaceTooLong { len: usize },
    #[error("interface name contains a forbidden character or is '.'/'..'")]
    InterfaceInvalid,
    #[error("MAC address is all zero")]
    MacZero,
    #[error("MAC address is multicast/broadcast, not unicast")]
    MacNotUnicast,
    #[error("prefix length {0} out of range (1..=32)")]
    PrefixOutOfRange(u8),
    #[error("{field} {addr} is not a usable host address")]
    AddressUnusable { field: &'static str, addr: Ipv4Addr },
    #[error("{field} {addr} is the network address of its prefix")]
    AddressIsNetwork { field: &'static str, addr: Ipv4Addr },
    #[error("{field} {addr} is the broadcast address of its prefix")]
    AddressIsBroadcast { field: &'static str, addr: Ipv4Addr },
    #[error("{field} {addr} is not inside the interface's prefix")]
    NotInPrefix { field: &'static str, addr: Ipv4Addr },
    #[error("{field} equals the interface's own address")]
    SameAsSelf { field: &'static str },
    #[error("{count} DNS servers, at most {max} allowed")]
    TooManyDns { count: usize, max: usize },
    #[error("DNS server {0} listed twice")]
    DuplicateDns(Ipv4Addr),
    #[error("hostname invalid: {0}")]
    HostnameInvalid(&'static str),
    #[error("host wall-clock time is zero")]
    HostTimeZero,
    #[error("clock_behind_ns exceeds host_time_unix_ns (a clock stopped before 1970)")]
    ClockBehindBeforeEpoch,
    #[error("RNG seed is all zero")]
    SeedZero,
    #[error("ack UDP port is zero")]
    AckPortZero,
    #[error("ack key is all zero")]
    AckKeyZero,
}

/// Why an ack datagram was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    #[error("ack is {len} bytes, shorter than {expected}")]
    Truncated { len: usize, expected: usize },
    #[error("ack is {len} bytes, longer than {expected}")]
    TrailingBytes { len: usize, expected: usize },
    #[error("bad ack magic")]
    BadMagic,
    /// HMAC mismatch: wrong key or tampered datagram.
    #[error("ack authentication tag mismatch")]
    BadTag,
    #[error("ack for generation {got}, expected {expected}")]
    WrongGeneration { got: u64, expected: u64 },
    #[error("ack carries a different MAC than expected")]
    WrongMac,
    #[error("ack carries IPv4 {got}, expected {expected}")]
    WrongIp { got: Ipv4Addr, expected: Ipv4Addr },
}
