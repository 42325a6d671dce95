//! Contract tests: lifecycle, one test per typed error, layout checked
//! against the documented offsets, write ordering.

mod common;

use std::io::{self, Cursor, Read, Seek, SeekFrom};

use common::*;
use forkvm_mailbox::*;

#[test]
fn arm_writes_documented_empty_header() {
    let page = armed();
    assert_eq!(&page[0..8], b"FVMBOX\0\x01");
    assert_eq!(&page[8..24], &[0xA5; 16]);
    assert_eq!(&page[24..28], &1u32.to_le_bytes());
    assert_eq!(&page[28..32], b"EMPT");
    assert_eq!(&page[32..48], &[0u8; 16]); // generation, len, crc32c("") == 0
    assert_eq!(&page[48..52], &doc_header_crc(&page).to_le_bytes());
    assert!(page[52..].iter().all(|&b| b == 0));
    let h = read_header(&page).unwrap();
    assert_eq!(h.state, MailboxState::Empty);
    assert_eq!((h.generation, h.payload_len, h.marker), (0, 0, MARKER));
}

/// A re-arm right after an ack leaves the guest report (64..128) for the
/// host and removes the payload with its secrets.
#[test]
fn rearm_keeps_the_guest_report_and_clears_the_payload() {
    let mut page = patched(42, &payload());
    let report = GuestReport {
        signal_seen_us: 7,
        applied_us: 1234,
        outcome_generation: 42,
        reject_code: 0,
    };
    write_guest_report(&mut page, &report).unwrap();
    mark(&mut page, MailboxState::Applied).unwrap();
    let next = MarkerId([0x5C; 16]);
    arm(&mut page, next).unwrap();
    let h = read_header(&page).unwrap();
    assert_eq!(
        (h.state, h.marker, h.generation),
        (MailboxState::Empty, next, 0)
    );
    assert_eq!(h.guest, report);
    assert!(
        page[128..].iter().all(|&b| b == 0),
        "payload left after re-arm"
    );
}

#[test]
fn patch_decode_round_trip_and_documented_layout() {
    let p = payload();
    let page = patched(0xDEAD_BEEF_0000_0001, &p);
    let body = p.to_json().unwrap();
    assert_eq!(&page[28..32], b"WRTN");
    assert_eq!(&page[32..40], &0xDEAD_BEEF_0000_0001u64.to_le_bytes());
    assert_eq!(&page[40..44], &(body.len() as u32).to_le_bytes());
    assert_eq!(&page[44..48], &crc32c::crc32c(&body).to_le_bytes());
    assert_eq!(&page[48..52], &doc_header_crc(&page).to_le_bytes());
    assert_eq!(&page[128..128 + body.len()], &body[..]);
    let (generation, got) = decode(&page, &MARKER).unwrap();
    assert_eq!(generation, 0xDEAD_BEEF_0000_0001);
    assert_eq!(got, p);
    // A page built independently from the documented layout decodes too.
    let mut raw = armed();
    raw_write(&mut raw, 9, &body);
    assert_eq!(decode(&raw, &MARKER).unwrap(), (9, p));
}

#[test]
fn full_lifecycle_and_guest_report() {
    let mut page = patched(5, &payload());
    let report = GuestReport {
        signal_seen_us: 1_000,
        applied_us: 3_500,
        outcome_generation: 5,
        reject_code: 0,
    };
    write_guest_report(&mut page, &report).unwrap();
    mark(&mut page, MailboxState::Applied).unwrap();
    let h = read_header(&page).unwrap();
    assert_eq!(h.state, MailboxState::Applied);
    assert_eq!(h.guest, report);
    // An applied arm is used up: the host must not patch it again.
    assert!(matches!(
        patch(&mut page, &MARKER, 6, &payload()),
        Err(MailboxError::BadState {
            found: MailboxState::Applied,
            ..
        })
    ));
    // Re-arm with a new marker: the old marker is now stale.
    let m2 = MarkerId([0x3C; 16]);
    arm(&mut page, m2).unwrap();
    assert!(matches!(
        patch(&mut page, &MARKER, 6, &payload()),
        Err(MailboxError::MarkerMismatch)
    ));
    patch(&mut page, &m2, 6, &payload()).unwrap();
    assert_eq!(decode(&page, &m2).unwrap().0, 6);
}

#[test]
fn repatch_written_page_replaces_payload_cleanly() {
    let mut p2 = payload();
    p2.hostname = "x".into(); // shorter body: the old tail must be zeroed
    let mut page = patched(1, &payload());
    patch(&mut page, &MARKER, 2, &p2).unwrap();
    assert_eq!(decode(&page, &MARKER).unwrap(), (2, p2));
}

#[test]
fn prepared_patch_writes_state_last_and_matches_patch() {
    let current = armed();
    let prep = prepare_patch(&current, &MARKER, 77, &payload()).unwrap();
    let direct = patched(77, &payload());
    assert_eq!(&prep.page()[..], &direct[..]);
    let writes = prep.writes();
    assert_eq!(writes[2], (OFF_STATE, &b"WRTN"[..]));
    // Apply in order, checking that no intermediate page decodes.
    let mut guest = current.clone();
    let mut covered = 0;
    for (i, (off, bytes)) in writes.iter().enumerate() {
        guest[*off..*off + bytes.len()].copy_from_slice(bytes);
        covered += bytes.len();
        if i < 2 {
            assert!(
                decode(&guest, &MARKER).is_err(),
                "decodable after write {i}"
            );
        }
    }
    assert_eq!(covered, PAGE_SIZE);
    assert_eq!(decode(&guest, &MARKER).unwrap().0, 77);
    // prepare_patch never touches its input.
    assert_eq!(current, armed());
}

#[test]
fn state_words_are_two_bits_apart() {
    let w = [
        MailboxState::EMPTY_WORD,
        MailboxState::WRITTEN_WORD,
        MailboxState::APPLIED_WORD,
        MailboxState::REJECTED_WORD,
        0, // an unarmed page
    ];
    for (i, a) in w.iter().enumerate() {
        for b in &w[i + 1..] {
            assert!((a ^ b).count_ones() >= 2, "{a:#x} vs {b:#x}");
        }
    }
}

// ---- one test per MailboxError variant ----

#[test]
fn err_page_size() {
    for len in [0, 1, 127, 128, PAGE_SIZE - 1, PAGE_SIZE + 1] {
        let page = vec![0u8; len];
        assert!(
            matches!(read_header(&page), Err(MailboxError::PageSize { len: l, .. }) if l == len)
        );
        assert!(matches!(
            decode(&page, &MARKER),
            Err(MailboxError::PageSize { .. })
        ));
        let mut page = page;
        assert!(matches!(
            arm(&mut page, MARKER),
            Err(MailboxError::PageSize { .. })
        ));
        assert!(matches!(
            mark(&mut page, MailboxState::Applied),
            Err(MailboxError::PageSize { .. })
        ));
    }
}

#[test]
fn err_bad_magic_and_unarmed_page() {
    assert!(matches!(
        read_header(&[0u8; PAGE_SIZE]),
        Err(MailboxError::BadMagic)
    ));
    let mut page = patched(1, &payload());
    page[3] ^= 0x20;
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::BadMagic)
    ));
}

#[test]
fn err_unsupported_version() {
    let mut page = patched(1, &payload());
    page[24..28].copy_from_slice(&2u32.to_le_bytes());
    reseal(&mut page);
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::UnsupportedVersion(2))
    ));
}

#[test]
fn err_marker_mismatch_and_invalid_marker() {
    let page = patched(1, &payload());
    assert!(matches!(
        decode(&page, &MarkerId([0xA4; 16])),
        Err(MailboxError::MarkerMismatch)
    ));
    let mut page = vec![0u8; PAGE_SIZE];
    assert!(matches!(
        arm(&mut page, MarkerId([0; 16])),
        Err(MailboxError::InvalidMarker)
    ));
    assert!(matches!(
        scan(&mut Cursor::new(page), &MarkerId([0; 16])),
        Err(MailboxError::InvalidMarker)
    ));
}

#[test]
fn err_unknown_state() {
    let mut page = patched(1, &payload());
    page[28..32].copy_from_slice(b"WRTM");
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::UnknownState(_))
    ));
}

#[test]
fn err_bad_state() {
    let page = armed();
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::BadState {
            found: MailboxState::Empty,
            ..
        })
    ));
    let mut page = patched(1, &payload());
    assert!(matches!(
        mark(&mut page, MailboxState::Written),
        Err(MailboxError::BadState { .. })
    ));
    mark(&mut page, MailboxState::Rejected).unwrap();
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::BadState {
            found: MailboxState::Rejected,
            ..
        })
    ));
}

#[test]
fn err_header_crc() {
    let mut page = patched(1, &payload());
    page[32] ^= 1; // generation
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::HeaderCrc { .. })
    ));
}

#[test]
fn err_reserved_not_zero() {
    let mut page = patched(1, &payload());
    page[60] = 1;
    reseal(&mut page);
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::ReservedNotZero { offset: 60 })
    ));
}

#[test]
fn err_length_out_of_range() {
    let mut page = patched(1, &payload());
    page[40..44].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    reseal(&mut page);
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::LengthOutOfRange { len, .. }) if len as usize == MAX_PAYLOAD + 1
    ));
    let mut page = armed();
    raw_write(&mut page, 1, b"");
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::LengthOutOfRange { len: 0, .. })
    ));
}

#[test]
fn err_payload_crc() {
    let mut page = patched(1, &payload());
    page[130] ^= 0x04;
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::PayloadCrc { .. })
    ));
}

#[test]
fn err_trailing_garbage() {
    let mut page = patched(1, &payload());
    page[PAGE_SIZE - 1] = 0x7f;
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::TrailingGarbage { offset }) if offset == PAGE_SIZE - 1
    ));
}

#[test]
fn err_json() {
    for body in [&b"{"[..], b"[]", b"{\"interface\":\"eth0\"}", b"\xff\xfe"] {
        let mut page = armed();
        raw_write(&mut page, 1, body);
        assert!(
            matches!(decode(&page, &MARKER), Err(MailboxError::Json(_))),
            "{body:?}"
        );
    }
    // Unknown field appended to an otherwise valid payload.
    let j = String::from_utf8(payload().to_json().unwrap()).unwrap();
    let j = j.replacen('{', "{\"evil\":true,", 1);
    let mut page = armed();
    raw_write(&mut page, 1, j.as_bytes());
    assert!(matches!(decode(&page, &MARKER), Err(MailboxError::Json(_))));
}

#[test]
fn err_invalid_field_on_both_sides() {
    let mut bad = payload();
    bad.mac = MacAddr([0x03, 0, 0, 0, 0, 1]);
    // Host refuses to write it...
    let mut page = armed();
    assert!(matches!(
        patch(&mut page, &MARKER, 1, &bad),
        Err(MailboxError::InvalidField(FieldError::MacNotUnicast))
    ));
    assert_eq!(page, armed(), "failed patch must not modify the page");
    // ...and the guest refuses it if a forged host wrote it anyway.
    raw_write(&mut page, 1, &bad.to_json().unwrap());
    assert!(matches!(
        decode(&page, &MARKER),
        Err(MailboxError::InvalidField(FieldError::MacNotUnicast))
    ));
}

#[test]
fn err_codes_are_distinct() {
    let errs = [
        MailboxError::BadMagic,
        MailboxError::MarkerMismatch,
        MailboxError::InvalidMarker,
        MailboxError::UnknownState(0),
        MailboxError::HeaderCrc {
            stored: 0,
            computed: 1,
        },
        MailboxError::PayloadCrc {
            stored: 0,
            computed: 1,
        },
        MailboxError::InvalidField(FieldError::MacZero),
    ];
    let mut codes: Vec<u32> = errs.iter().map(MailboxError::code).collect();
    assert!(codes.iter().all(|&c| c != 0));
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), errs.len());
}

// ---- locating ----

fn memory_with_mailbox_at(size: usize, at: usize) -> Vec<u8> {
    let mut mem = vec![0u8; size];
    // Decoys: a valid page armed with another marker; right marker, unaligned.
    let mut decoy = vec![0u8; PAGE_SIZE];
    arm(&mut decoy, MarkerId([0xA4; 16])).unwrap();
    mem[PAGE_SIZE..2 * PAGE_SIZE].copy_from_slice(&decoy);
    let real = patched(3, &payload());
    mem[3 * PAGE_SIZE + 100..3 * PAGE_SIZE + 100 + 24].copy_from_slice(&real[..24]);
    mem[at..at + PAGE_SIZE].copy_from_slice(&real);
    mem
}

#[test]
fn locate_at_checks_alignment_bounds_and_marker() {
    let mem = memory_with_mailbox_at(16 * PAGE_SIZE, 9 * PAGE_SIZE);
    let h = locate_at(&mem, 9 * PAGE_SIZE as u64, &MARKER).unwrap();
    assert_eq!((h.state, h.generation), (MailboxState::Written, 3));
    assert!(matches!(
        locate_at(&mem, 9 * PAGE_SIZE as u64 + 8, &MARKER),
        Err(MailboxError::Misaligned { .. })
    ));
    assert!(matches!(
        locate_at(&mem, 16 * PAGE_SIZE as u64, &MARKER),
        Err(MailboxError::OutOfRange { .. })
    ));
    assert!(matches!(
        locate_at(&mem, u64::MAX - 4095, &MARKER),
        Err(MailboxError::OutOfRange { .. })
    ));
    assert!(matches!(
        locate_at(&mem, PAGE_SIZE as u64, &MARKER),
        Err(MailboxError::MarkerMismatch)
    ));
    assert!(matches!(
        locate_at(&mem, 0, &MARKER),
        Err(MailboxError::BadMagic)
    ));
}

#[test]
fn scan_finds_single_page_ignores_decoys_and_rejects_duplicates() {
    // Spans several scan chunks (1 MiB each) with the hit in a later one.
    let size = 3 * 1024 * 1024 + 5 * PAGE_SIZE + 123; // partial trailing page
    let at = 2 * 1024 * 1024 + 7 * PAGE_SIZE;
    let mut mem = memory_with_mailbox_at(size, at);
    assert_eq!(
        scan(&mut Cursor::new(&mem), &MARKER).unwrap(),
        Some(at as u64)
    );
    assert_eq!(
        scan(&mut Cursor::new(&mem), &MarkerId([0x11; 16])).unwrap(),
        None
    );
    // A corrupted copy carrying the marker is not a hit.
    let mut corrupt = patched(4, &payload());
    corrupt[33] ^= 1;
    mem[20 * PAGE_SIZE..21 * PAGE_SIZE].copy_from_slice(&corrupt);
    assert_eq!(
        scan(&mut Cursor::new(&mem), &MARKER).unwrap(),
        Some(at as u64)
    );
    // A second valid copy is ambiguous.
    let copy = mem[at..at + PAGE_SIZE].to_vec();
    mem[30 * PAGE_SIZE..31 * PAGE_SIZE].copy_from_slice(&copy);
    assert!(matches!(
        scan(&mut Cursor::new(&mem), &MARKER),
        Err(MailboxError::AmbiguousMarker { first, second }) if first == 30 * PAGE_SIZE as u64 && second == at as u64
    ));
}

struct FailingReader;
impl Read for FailingReader {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::other("boom"))
    }
}
impl Seek for FailingReader {
    fn seek(&mut self, _: SeekFrom) -> io::Result<u64> {
        Ok(0)
    }
}

#[test]
fn err_io_from_scan() {
    assert!(matches!(
        scan(&mut FailingReader, &MARKER),
        Err(MailboxError::Io(_))
    ));
}

/// Removes the temp file even when an assertion fails.
struct TempFile(std::path::PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_file(tag: &str) -> TempFile {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    TempFile(dir.join(format!(
        "fvm-mailbox-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    )))
}

#[test]
fn scan_file_skips_holes_and_finds_page() {
    use std::os::unix::fs::FileExt;
    let tmp = temp_file("scan");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp.0)
        .unwrap();
    // A sparse 256 MiB "guest RAM" file with a few data islands.
    let size: u64 = 256 << 20;
    file.set_len(size).unwrap();
    file.write_all_at(&[0x5a; 3 * PAGE_SIZE], 1 << 20).unwrap();
    let mut decoy = armed();
    decoy[20] ^= 1;
    file.write_all_at(&decoy, 100 << 20).unwrap();
    let at: u64 = (200 << 20) + 12 * PAGE_SIZE as u64;
    file.write_all_at(&patched(8, &payload()), at).unwrap();
    // Last page of the file.
    file.write_all_at(&[1; PAGE_SIZE], size - PAGE_SIZE as u64)
        .unwrap();

    let t = std::time::Instant::now();
    let found = scan_file(&file, &MARKER).unwrap();
    let sparse_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(found, Some(at));
    assert_eq!(scan_file(&file, &MarkerId([0x77; 16])).unwrap(), None);

    // Same file through the plain read() scan, for comparison.
    let mut f2 = &file;
    let t = std::time::Instant::now();
    assert_eq!(scan(&mut f2, &MARKER).unwrap(), Some(at));
    let full_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "scan 256 MiB sparse file: scan_file {sparse_ms:.2} ms, scan (read all) {full_ms:.2} ms"
    );

    // The scan must not have allocated the holes.
    let blocks = std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap());
    assert!(
        blocks * 512 < 1 << 20,
        "file grew to {} bytes",
        blocks * 512
    );

    // Duplicate in a separate island: ambiguous.
    file.write_all_at(&patched(8, &payload()), 50 << 20)
        .unwrap();
    assert!(matches!(
        scan_file(&file, &MARKER),
        Err(MailboxError::AmbiguousMarker { first, second }) if first == 50 << 20 && second == at
    ));
}
