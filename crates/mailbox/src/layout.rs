//! Page layout, arm/patch/mark/decode and the write-ordering rules.

use std::sync::atomic::{Ordering, fence};

use crate::error::MailboxError;
use crate::payload::Payload;

/// One mailbox is exactly one (4 KiB) page.
pub const PAGE_SIZE: usize = 4096;
/// Header bytes before the payload.
pub const HEADER_SIZE: usize = 128;
/// Largest payload that fits after the header.
pub const MAX_PAYLOAD: usize = PAGE_SIZE - HEADER_SIZE;
/// Magic at offset 0: "FVMBOX", NUL, and a format-family byte.
pub const MAGIC: [u8; 8] = *b"FVMBOX\0\x01";
/// The only layout version this build writes and accepts.
pub const LAYOUT_VERSION: u32 = 1;

pub const OFF_MAGIC: usize = 0;
pub const OFF_MARKER: usize = 8;
pub const OFF_VERSION: usize = 24;
pub const OFF_STATE: usize = 28;
pub const OFF_GENERATION: usize = 32;
pub const OFF_PAYLOAD_LEN: usize = 40;
pub const OFF_PAYLOAD_CRC: usize = 44;
pub const OFF_HEADER_CRC: usize = 48;
/// Host-reserved bytes 52..64: must be zero, covered by the header CRC.
pub const OFF_RESERVED: usize = 52;
/// Start of the guest-written area (64..128), never covered by a CRC.
pub const OFF_GUEST_AREA: usize = 64;
pub const OFF_SIGNAL_SEEN_US: usize = 64;
pub const OFF_APPLIED_US: usize = 72;
pub const OFF_OUTCOME_GENERATION: usize = 80;
pub const OFF_REJECT_CODE: usize = 88;
pub const OFF_PAYLOAD: usize = HEADER_SIZE;

/// Byte ranges the header CRC covers: everything the host writes in the
/// header except the state word (it changes on its own) and the CRC itself.
const HEADER_CRC_RANGES: [(usize, usize); 3] = [
    (0, OFF_STATE),
    (OFF_GENERATION, OFF_HEADER_CRC),
    (OFF_RESERVED, OFF_GUEST_AREA),
];

/// A 128-bit marker id, chosen at random by the agent for every arm.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MarkerId(pub [u8; 16]);

impl MarkerId {
    /// All-zero markers are refused: they mean "never initialised".
    pub fn is_valid(&self) -> bool {
        self.0 != [0; 16]
    }
}

/// Lifecycle of a mailbox page. The on-page values are four ASCII tags,
/// pairwise at least two bits apart, so a single flipped bit can never turn
/// one valid state into another.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MailboxState {
    /// Armed by the guest, waiting for a host payload.
    Empty,
    /// The host wrote a payload for the guest to apply.
    Written,
    /// The guest applied the payload.
    Applied,
    /// The guest rejected the payload (reason in `reject_code`).
    Rejected,
}

impl MailboxState {
    pub const EMPTY_WORD: u32 = u32::from_le_bytes(*b"EMPT");
    pub const WRITTEN_WORD: u32 = u32::from_le_bytes(*b"WRTN");
    pub const APPLIED_WORD: u32 = u32::from_le_bytes(*b"APLD");
    pub const REJECTED_WORD: u32 = u32::from_le_bytes(*b"RJCT");

    pub fn to_word(self) -> u32 {
        match self {
            MailboxState::Empty => Self::EMPTY_WORD,
            MailboxState::Written => Self::WRITTEN_WORD,
            MailboxState::Applied => Self::APPLIED_WORD,
            MailboxState::Rejected => Self::REJECTED_WORD,
        }
    }

    pub fn from_word(w: u32) -> Result<Self, MailboxError> {
        match w {
            Self::EMPTY_WORD => Ok(MailboxState::Empty),
            Self::WRITTEN_WORD => Ok(MailboxState::Written),
            Self::APPLIED_WORD => Ok(MailboxState::Applied),
            Self::REJECTED_WORD => Ok(MailboxState::Rejected),
            other => Err(MailboxError::UnknownState(other)),
        }
    }
}

/// What the guest reports back in the guest area (bytes 64..128).
/// Timestamps are guest `CLOCK_MONOTONIC` in µs: only differences between
/// them are meaningful to the host. Zero means "not recorded".
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct GuestReport {
    /// When the agent noticed the resume signal.
    pub signal_seen_us: u64,
    /// Microseconds from `signal_seen_us` until the identity was applied
    /// (or the payload rejected): a duration, not a timestamp.
    pub applied_us: u64,
    /// Generation the outcome refers to, so a stale report is recognisable.
    pub outcome_generation: u64,
    /// [`MailboxError::code`] of the rejection; 0 when applied.
    pub reject_code: u32,
}

/// A parsed, checksum-verified header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    pub version: u32,
    pub marker: MarkerId,
    pub state: MailboxState,
    pub generation: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
    pub guest: GuestReport,
}

fn check_len(page: &[u8]) -> Result<(), MailboxError> {
    if page.len() != PAGE_SIZE {
        return Err(MailboxError::PageSize {
            len: page.len(),
            expected: PAGE_SIZE,
        });
    }
    Ok(())
}

// The length check above makes every fixed-offset read below in bounds;
// the copy into an array is infallible for these constant ranges.
fn rd_u32(page: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&page[off..off + 4]);
    u32::from_le_bytes(b)
}

fn rd_u64(page: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&page[off..off + 8]);
    u64::from_le_bytes(b)
}

fn wr_u32(page: &mut [u8], off: usize, v: u32) {
    page[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn wr_u64(page: &mut [u8], off: usize, v: u64) {
    page[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn header_crc(page: &[u8]) -> u32 {
    HEADER_CRC_RANGES
        .iter()
        .fold(0, |crc, &(a, b)| crc32c::crc32c_append(crc, &page[a..b]))
}

/// Reads the state word with a volatile load followed by an acquire fence,
/// so later reads of the page are not hoisted above it.
fn load_state(page: &[u8]) -> u32 {
    let p = page[OFF_STATE..OFF_STATE + 4].as_ptr();
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        // SAFETY: `p + i` is inside `page` (length checked by the caller);
        // volatile because the other side of the contract (host or guest)
        // writes this memory outside the Rust abstract machine.
        *byte = unsafe { std::ptr::read_volatile(p.add(i)) };
    }
    fence(Ordering::Acquire);
    u32::from_le_bytes(b)
}

/// Publishes the state word: a release fence orders every earlier write to
/// the page before it, then a volatile store (bytewise, since the slice may
/// not be 4-aligned) so the compiler can neither elide nor reorder it.
fn store_state(page: &mut [u8], state: MailboxState) {
    fence(Ordering::SeqCst);
    let p = page[OFF_STATE..OFF_STATE + 4].as_mut_ptr();
    for (i, byte) in state.to_word().to_le_bytes().into_iter().enumerate() {
        // SAFETY: `p + i` is inside `page` (length checked by the caller).
        unsafe { std::ptr::write_volatile(p.add(i), byte) };
    }
    fence(Ordering::SeqCst);
}

/// Guest: arm a fresh mailbox with `marker`. Writes an EMPTY header
/// (generation 0, no payload) with a valid header CRC and zeroes the
/// payload area; the guest report (64..128) is left as it was (the host
/// reads it by generation after an ack; a fresh page is zero anyway).
///
/// The page must be page-aligned guest RAM that stays resident (the agent
/// allocates and `mlock`s it); this function can't check that.
pub fn arm(page: &mut [u8], marker: MarkerId) -> Result<(), MailboxError> {
    check_len(page)?;
    if !marker.is_valid() {
        return Err(MailboxError::InvalidMarker);
    }
    // Build the header aside: the CRC covers the magic, which is written last.
    let mut hdr = [0u8; HEADER_SIZE];
    hdr[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
    hdr[OFF_MARKER..OFF_MARKER + 16].copy_from_slice(&marker.0);
    wr_u32(&mut hdr, OFF_VERSION, LAYOUT_VERSION);
    wr_u32(&mut hdr, OFF_PAYLOAD_CRC, crc32c::crc32c(&[]));
    let hcrc = header_crc(&hdr);
    wr_u32(&mut hdr, OFF_HEADER_CRC, hcrc);
    // Invalidate first so a reader never sees the old magic over new bytes.
    page[OFF_MAGIC..OFF_MAGIC + 8].fill(0);
    fence(Ordering::SeqCst);
    page[OFF_MARKER..OFF_STATE].copy_from_slice(&hdr[OFF_MARKER..OFF_STATE]);
    // The guest report (64..128) stays: the host matches it by generation,
    // and a re-arm right after an ack must not erase what the host reads
    // next. The payload, with its secrets, goes.
    page[OFF_GENERATION..OFF_GUEST_AREA].copy_from_slice(&hdr[OFF_GENERATION..OFF_GUEST_AREA]);
    page[OFF_PAYLOAD..].fill(0);
    store_state(page, MailboxState::Empty);
    // Magic last: a page without magic is never mistaken for a mailbox.
    page[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
    fence(Ordering::SeqCst);
    Ok(())
}

/// Parses and checks the header: size, magic, version, state word, header
/// CRC, reserved bytes, payload length bound. Does not check the marker.
pub fn read_header(page: &[u8]) -> Result<Header, MailboxError> {
    check_len(page)?;
    let state_word = load_state(page);
    if page[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
        return Err(MailboxError::BadMagic);
    }
    let version = rd_u32(page, OFF_VERSION);
    if version != LAYOUT_VERSION {
        return Err(MailboxError::UnsupportedVersion(version));
    }
    let state = MailboxState::from_word(state_word)?;
    let stored = rd_u32(page, OFF_HEADER_CRC);
    let computed = header_crc(page);
    if stored != computed {
        return Err(MailboxError::HeaderCrc { stored, computed });
    }
    if let Some(i) = page[OFF_RESERVED..OFF_GUEST_AREA]
        .iter()
        .position(|&b| b != 0)
    {
        return Err(MailboxError::ReservedNotZero {
            offset: OFF_RESERVED + i,
        });
    }
    let payload_len = rd_u32(page, OFF_PAYLOAD_LEN);
    if payload_len as usize > MAX_PAYLOAD {
        return Err(MailboxError::LengthOutOfRange {
            len: payload_len,
            max: MAX_PAYLOAD,
        });
    }
    let mut marker = [0u8; 16];
    marker.copy_from_slice(&page[OFF_MARKER..OFF_MARKER + 16]);
    Ok(Header {
        version,
        marker: MarkerId(marker),
        state,
        generation: rd_u64(page, OFF_GENERATION),
        payload_len,
        payload_crc: rd_u32(page, OFF_PAYLOAD_CRC),
        guest: GuestReport {
            signal_seen_us: rd_u64(page, OFF_SIGNAL_SEEN_US),
            applied_us: rd_u64(page, OFF_APPLIED_US),
            outcome_generation: rd_u64(page, OFF_OUTCOME_GENERATION),
            reject_code: rd_u32(page, OFF_REJECT_CODE),
        },
    })
}

/// Header check plus marker comparison.
pub fn verify_marker(page: &[u8], marker: &MarkerId) -> Result<Header, MailboxError> {
    let h = read_header(page)?;
    if h.marker != *marker {
        return Err(MailboxError::MarkerMismatch);
    }
    Ok(h)
}

/// Host: a patched page image plus the order in which to write it into a
/// paused guest's memory (e.g. with `process_vm_writev` / `/proc/<pid>/mem`).
#[derive(Clone)]
pub struct PreparedPatch {
    page: Box<[u8; PAGE_SIZE]>,
}

impl PreparedPatch {
    /// The complete page as it must end up in guest memory.
    pub fn page(&self) -> &[u8; PAGE_SIZE] {
        &self.page
    }

    /// `(offset within the page, bytes)` in the order they must be written:
    /// everything except the state word first, the 4-byte state word last.
    /// Each element must be fully written before the next one starts.
    pub fn writes(&self) -> [(usize, &[u8]); 3] {
        [
            (OFF_GENERATION, &self.page[OFF_GENERATION..]),
            (0, &self.page[..OFF_STATE]),
            (OFF_STATE, &self.page[OFF_STATE..OFF_GENERATION]),
        ]
    }
}

/// Host: checks `current` (the page as read from guest memory) and builds the
/// patched page without touching guest memory. Same checks as [`patch`].
pub fn prepare_patch(
    current: &[u8],
    marker: &MarkerId,
    generation: u64,
    payload: &Payload,
) -> Result<PreparedPatch, MailboxError> {
    let mut page = Box::new([0u8; PAGE_SIZE]);
    check_len(current)?;
    page.copy_from_slice(current);
    patch(&mut page[..], marker, generation, payload)?;
    Ok(PreparedPatch { page })
}

/// Host: write `payload` for `generation` into an armed page.
///
/// Verifies first that the page is a valid mailbox armed with `marker` and in
/// state EMPTY or WRITTEN (re-patching a paused fork is allowed; APPLIED or
/// REJECTED means that arm is used up and the marker is stale). Validates the
/// payload. Then writes, in this order: state := EMPTY (only when re-patching),
/// generation, length, payload CRC, header CRC, zeroed reserved and guest
/// areas, payload, zeroed tail; a fence; the state word WRITTEN last.
pub fn patch(
    page: &mut [u8],
    marker: &MarkerId,
    generation: u64,
    payload: &Payload,
) -> Result<(), MailboxError> {
    let h = verify_marker(page, marker)?;
    match h.state {
        MailboxState::Empty | MailboxState::Written => {}
        found => {
            return Err(MailboxError::BadState {
                found,
                expected: "Empty or Written",
            });
        }
    }
    payload.validate()?;
    let body = payload.to_json()?;
    if body.len() > MAX_PAYLOAD {
        return Err(MailboxError::PayloadTooLarge {
            len: body.len(),
            max: MAX_PAYLOAD,
        });
    }
    if h.state == MailboxState::Written {
        // Retract the old payload before overwriting it.
        store_state(page, MailboxState::Empty);
    }
    // MAX_PAYLOAD < u32::MAX, so the cast is lossless.
    let len = body.len() as u32;
    wr_u64(page, OFF_GENERATION, generation);
    wr_u32(page, OFF_PAYLOAD_LEN, len);
    wr_u32(page, OFF_PAYLOAD_CRC, crc32c::crc32c(&body));
    page[OFF_RESERVED..HEADER_SIZE].fill(0);
    let hcrc = header_crc(page);
    wr_u32(page, OFF_HEADER_CRC, hcrc);
    page[OFF_PAYLOAD..OFF_PAYLOAD + body.len()].copy_from_slice(&body);
    page[OFF_PAYLOAD + body.len()..].fill(0);
    store_state(page, MailboxState::Written);
    Ok(())
}

/// Guest: full validation of a WRITTEN page armed with `expected_marker`;
/// returns the generation and the validated payload.
///
/// Reads the state word first (volatile + acquire), then copies the page
/// and checks the copy, so CRCs and JSON parse see the same bytes even if
/// the page changed meanwhile. Bytes 64..128 (guest area) are not read.
pub fn decode(page: &[u8], expected_marker: &MarkerId) -> Result<(u64, Payload), MailboxError> {
    check_len(page)?;
    let state_word = load_state(page);
    let mut local = [0u8; PAGE_SIZE];
    local.copy_from_slice(page);
    // Use the state observed *before* the copy: that is the one the
    // acquire fence orders the payload reads after.
    local[OFF_STATE..OFF_STATE + 4].copy_from_slice(&state_word.to_le_bytes());
    let h = verify_marker(&local, expected_marker)?;
    if h.state != MailboxState::Written {
        return Err(MailboxError::BadState {
            found: h.state,
            expected: "Written",
        });
    }
    let len = h.payload_len as usize;
    if len == 0 {
        return Err(MailboxError::LengthOutOfRange {
            len: h.payload_len,
            max: MAX_PAYLOAD,
        });
    }
    let body = &local[OFF_PAYLOAD..OFF_PAYLOAD + len];
    let computed = crc32c::crc32c(body);
    if computed != h.payload_crc {
        return Err(MailboxError::PayloadCrc {
            stored: h.payload_crc,
            computed,
        });
    }
    if let Some(i) = local[OFF_PAYLOAD + len..].iter().position(|&b| b != 0) {
        return Err(MailboxError::TrailingGarbage {
            offset: OFF_PAYLOAD + len + i,
        });
    }
    let payload = Payload::from_json(body)?;
    payload.validate()?;
    Ok((h.generation, payload))
}

/// Guest: record the outcome. Only APPLIED and REJECTED are accepted (EMPTY
/// is [`arm`]'s job, WRITTEN the host's). Write the [`GuestReport`] first
/// with [`write_guest_report`]; the state word is published last.
pub fn mark(page: &mut [u8], state: MailboxState) -> Result<(), MailboxError> {
    check_len(page)?;
    match state {
        MailboxState::Applied | MailboxState::Rejected => {
            store_state(page, state);
            Ok(())
        }
        found => Err(MailboxError::BadState {
            found,
            expected: "Applied or Rejected",
        }),
    }
}

/// Guest: write timings/outcome into the guest area (bytes 64..96).
pub fn write_guest_report(page: &mut [u8], report: &GuestReport) -> Result<(), MailboxError> {
    check_len(page)?;
    wr_u64(page, OFF_SIGNAL_SEEN_US, report.signal_seen_us);
    wr_u64(page, OFF_APPLIED_US, report.applied_us);
    wr_u64(page, OFF_OUTCOME_GENERATION, report.outcome_generation);
    wr_u32(page, OFF_REJECT_CODE, report.reject_code);
    Ok(())
}

/// Ways [`forge`] breaks a page, for tests of the guest's rejection path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forgery {
    /// A payload byte flipped after the CRC was computed.
    BadCrc,
    /// A layout version the guest does not know (with valid CRCs).
    WrongVersion,
    /// A multicast MAC in an otherwise well-formed payload.
    MulticastMac,
    /// A prefix length of 40 in an otherwise well-formed payload.
    PrefixTooLong,
}

/// Host-side test tool: write a WRITTEN page that a correct guest must
/// reject, bypassing the validation [`patch`] performs. Checksums are
/// recomputed so only the intended defect remains.
pub fn forge(
    page: &mut [u8],
    marker: &MarkerId,
    generation: u64,
    payload: &Payload,
    how: Forgery,
) -> Result<(), MailboxError> {
    patch(page, marker, generation, payload)?;
    let len = rd_u32(page, OFF_PAYLOAD_LEN) as usize;
    let mut body = page[OFF_PAYLOAD..OFF_PAYLOAD + len].to_vec();
    let mut version = LAYOUT_VERSION;
    match how {
        Forgery::BadCrc => {}
        Forgery::WrongVersion => version = LAYOUT_VERSION + 98,
        Forgery::MulticastMac | Forgery::PrefixTooLong => {
            let mut v: serde_json::Value = serde_json::from_slice(&body)?;
            if how == Forgery::MulticastMac {
                v["mac"] = serde_json::Value::String("01:00:5e:00:00:01".into());
            } else {
                v["prefix_len"] = serde_json::Value::from(40);
            }
            body = serde_json::to_vec(&v)?;
        }
    }
    store_state(page, MailboxState::Empty);
    wr_u32(page, OFF_VERSION, version);
    wr_u32(page, OFF_PAYLOAD_LEN, body.len() as u32);
    wr_u32(page, OFF_PAYLOAD_CRC, crc32c::crc32c(&body));
    let hcrc = header_crc(page);
    wr_u32(page, OFF_HEADER_CRC, hcrc);
    page[OFF_PAYLOAD..].fill(0);
    page[OFF_PAYLOAD..OFF_PAYLOAD + body.len()].copy_from_slice(&body);
    if how == Forgery::BadCrc {
        page[OFF_PAYLOAD + 2] ^= 0x20;
    }
    store_state(page, MailboxState::Written);
    Ok(())
}
