//! The guest's mailbox page: one anonymous page, populated, `mlock`ed and
//! excluded from `fork()` children, armed with [`forkvm_mailbox::arm`], whose
//! guest-physical address (GPA) the agent reports in Health so the host can
//! patch it in a paused fork's memory. See `docs/mailbox.md` for the page
//! contract and `docs/agent.md` ("Mailbox handoff") for the agent's side.
//!
//! The page must stay on the same physical frame for the agent's lifetime:
//! `MAP_POPULATE` + `mlock` keep it resident, `MADV_DONTFORK` keeps children
//! from sharing it (a shared COW page would be copied to a *new* frame on the
//! agent's next write), and as PID 1 the agent sets
//! `vm.compact_unevictable_allowed=0` so compaction does not migrate it. The
//! GPA is re-read from `/proc/self/pagemap` after every arm and once a second
//! by the resume watcher; a change is logged and reported.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, PoisonError};

use forkvm_mailbox::{GuestReport, MailboxError, MailboxState, MarkerId, PAGE_SIZE, Payload};
use tracing::{info, warn};

/// Reject code (page guest area) for a payload whose generation this agent
/// already applied. Above the range of [`MailboxError::code`] (1..=19).
pub const REJECT_DUPLICATE_GENERATION: u32 = 100;
/// Reject code for a valid payload whose network change failed to apply.
pub const REJECT_APPLY_FAILED: u32 = 101;

/// How many applied generations are remembered for duplicate detection.
const REMEMBERED_GENERATIONS: usize = 64;

/// Byte offset of the state word inside the page (see the layout table).
const OFF_STATE: usize = forkvm_mailbox::OFF_STATE;

/// Why the mailbox could not be set up (the agent then runs without one).
#[derive(Debug, thiserror::Error)]
pub enum MailboxSetupError {
    #[error("mmap of the mailbox page: {0}")]
    Mmap(std::io::Error),
    #[error("mlock of the mailbox page: {0}")]
    Mlock(std::io::Error),
    #[error("madvise(MADV_DONTFORK) of the mailbox page: {0}")]
    DontFork(std::io::Error),
    #[error("getrandom for the marker: {0}")]
    Random(std::io::Error),
    #[error("reading /proc/self/pagemap: {0}")]
    Pagemap(std::io::Error),
    #[error("pagemap entry {entry:#018x} has no PFN (page not present or PFNs hidden)")]
    NoPfn { entry: u64 },
    #[error("arming the page: {0}")]
    Arm(#[from] MailboxError),
}

/// One anonymous, populated, locked page; unmapped on drop.
struct PinnedPage {
    ptr: NonNull<u8>,
}

// SAFETY: the page is plain memory owned by this struct (no thread-local
// state); moving the owner to another thread moves the only handle to it.
// It is not `Sync`: `Mailbox` keeps it inside its mutex.
unsafe impl Send for PinnedPage {}

/// Where the page's state word is, for lock-free volatile loads while the
/// page itself sits behind the mailbox mutex.
struct StateWord(NonNull<u8>);

// SAFETY: only ever used for volatile 4-byte loads of a page that lives as
// long as the `Mailbox` holding both (the page is unmapped only on drop);
// the host writes that word from outside the process anyway, so a
// concurrent write by the agent's own writer is no different.
unsafe impl Send for StateWord {}
// SAFETY: as above.
unsafe impl Sync for StateWord {}

impl StateWord {
    /// Volatile load of the state word: the host writes it outside this
    /// process, so the compiler must not cache or elide the read.
    fn load(&self) -> u32 {
        // SAFETY: the mapping is page-aligned and PAGE_SIZE long, so offset
        // 28 is in bounds and 4-byte aligned; it outlives `self` (above).
        let w = unsafe {
            std::ptr::read_volatile(self.0.as_ptr().add(OFF_STATE).cast::<u32>().cast_const())
        };
        u32::from_le(w)
    }
}

impl PinnedPage {
    fn new() -> Result<Self, MailboxSetupError> {
        // SAFETY: anonymous private mapping of one page, no address hint; the
        // result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MailboxSetupError::Mmap(std::io::Error::last_os_error()));
        }
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(MailboxSetupError::Mmap(std::io::Error::other(
                "mmap returned NULL",
            )));
        };
        let page = PinnedPage { ptr };
        // SAFETY: `p` is the page-aligned one-page mapping created above.
        if unsafe { libc::mlock(p, PAGE_SIZE) } != 0 {
            return Err(MailboxSetupError::Mlock(std::io::Error::last_os_error()));
        }
        // SAFETY: as above.
        if unsafe { libc::madvise(p, PAGE_SIZE, libc::MADV_DONTFORK) } != 0 {
            return Err(MailboxSetupError::DontFork(std::io::Error::last_os_error()));
        }
        Ok(page)
    }

    fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The page as a slice; callers hold the mailbox mutex.
    fn bytes(&self) -> &[u8] {
        // SAFETY: valid mapping of PAGE_SIZE bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), PAGE_SIZE) }
    }

    /// Mutable view; `&mut self` makes it exclusive within this process.
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: valid mapping of PAGE_SIZE bytes for the lifetime of self,
        // borrowed mutably for as long as the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), PAGE_SIZE) }
    }
}

impl Drop for PinnedPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this struct owns.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), PAGE_SIZE) };
    }
}

/// What Health reports about the mailbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailboxStatus {
    /// Current marker; `None` while the page is used up (between an outcome
    /// and the re-arm) or the mailbox is unusable.
    pub marker: Option<MarkerId>,
    pub gpa: u64,
    pub applied_generation: u64,
    pub applied: u64,
    pub rejected: u64,
}

struct Inner {
    page: PinnedPage,
    /// The marker the page is armed with (kept after use for decode).
    marker: MarkerId,
    /// False once an outcome was marked, until the next arm.
    armed: bool,
    gpa: u64,
    applied_generation: u64,
    applied: u64,
    rejected: u64,
    recent_generations: VecDeque<u64>,
}

/// The agent's mailbox: the pinned page plus its bookkeeping.
pub struct Mailbox {
    inner: Mutex<Inner>,
    state: StateWord,
    /// The page's virtual address (for pagemap lookups).
    addr: usize,
}

impl Mailbox {
    /// Allocates, pins and arms the page and looks up its GPA. `own_guest`
    /// (the agent is PID 1) also stops compaction from migrating locked pages.
    pub fn new(own_guest: bool) -> Result<Mailbox, MailboxSetupError> {
        if own_guest {
            // Compaction may migrate mlocked pages by default, which would
            // silently move the mailbox to another GPA.
            if let Err(e) = std::fs::write("/proc/sys/vm/compact_unevictable_allowed", "0") {
                warn!(error = %e, "cannot set vm.compact_unevictable_allowed=0");
            }
        }
        let mut page = PinnedPage::new()?;
        let marker = random_marker()?;
        forkvm_mailbox::arm(page.bytes_mut(), marker)?;
        let addr = page.addr();
        let gpa = gpa_of(addr)?;
        info!(gpa = format_args!("{gpa:#x}"), marker = %hex(&marker.0), "mailbox armed");
        Ok(Mailbox {
            state: StateWord(page.ptr),
            addr,
            inner: Mutex::new(Inner {
                page,
                marker,
                armed: true,
                gpa,
                applied_generation: 0,
                applied: 0,
                rejected: 0,
                recent_generations: VecDeque::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The raw state word (cheap: one volatile load, no lock).
    pub fn state_word(&self) -> u32 {
        self.state.load()
    }

    /// Snapshot of the bookkeeping for Health.
    pub fn status(&self) -> MailboxStatus {
        let i = self.lock();
        MailboxStatus {
            marker: i.armed.then_some(i.marker),
            gpa: i.gpa,
            applied_generation: i.applied_generation,
            applied: i.applied,
            rejected: i.rejected,
        }
    }

    /// Full validation of the page against the current marker.
    pub fn decode(&self) -> Result<(u64, Payload), MailboxError> {
        let i = self.lock();
        forkvm_mailbox::decode(i.page.bytes(), &i.marker)
    }

    /// The generation field as the host wrote it, read without validation
    /// (for the report of a page that fails to decode).
    pub fn raw_generation(&self) -> u64 {
        let i = self.lock();
        let off = forkvm_mailbox::OFF_GENERATION;
        let mut b = [0u8; 8];
        b.copy_from_slice(&i.page.bytes()[off..off + 8]);
        u64::from_le_bytes(b)
    }

    /// True if `generation` was applied before by this agent (or a VM it was
    /// forked from).
    pub fn already_applied(&self, generation: u64) -> bool {
        self.lock().recent_generations.contains(&generation)
    }

    /// Records a successful apply: report, then APPLIED (the publication point).
    pub fn mark_applied(&self, report: &GuestReport) -> Result<(), MailboxError> {
        let mut i = self.lock();
        forkvm_mailbox::write_guest_report(i.page.bytes_mut(), report)?;
        forkvm_mailbox::mark(i.page.bytes_mut(), MailboxState::Applied)?;
        i.armed = false;
        i.applied += 1;
        i.applied_generation = report.outcome_generation;
        if i.recent_generations.len() == REMEMBERED_GENERATIONS {
            i.recent_generations.pop_front();
        }
        i.recent_generations.push_back(report.outcome_generation);
        Ok(())
    }

    /// Records a rejection: report (with the reason code), then REJECTED.
    pub fn mark_rejected(&self, report: &GuestReport) -> Result<(), MailboxError> {
        let mut i = self.lock();
        forkvm_mailbox::write_guest_report(i.page.bytes_mut(), report)?;
        forkvm_mailbox::mark(i.page.bytes_mut(), MailboxState::Rejected)?;
        i.armed = false;
        i.rejected += 1;
        Ok(())
    }

    /// Re-arms with a fresh random marker (which also zeroes the old payload,
    /// including its secrets) and re-checks the GPA. Returns the new marker
    /// and GPA.
    pub fn rearm(&self) -> Result<(MarkerId, u64), MailboxSetupError> {
        let marker = random_marker()?;
        let mut i = self.lock();
        forkvm_mailbox::arm(i.page.bytes_mut(), marker)?;
        i.marker = marker;
        i.armed = true;
        let gpa = gpa_of(self.addr)?;
        if gpa != i.gpa {
            warn!(
                old = format_args!("{:#x}", i.gpa),
                new = format_args!("{gpa:#x}"),
                "mailbox page moved to another guest-physical address"
            );
            i.gpa = gpa;
        }
        Ok((marker, gpa))
    }

    /// Re-reads the GPA (one pagemap read) and updates it if it moved.
    pub fn check_gpa(&self) -> Result<u64, MailboxSetupError> {
        let gpa = gpa_of(self.addr)?;
        let mut i = self.lock();
        if gpa != i.gpa {
            warn!(
                old = format_args!("{:#x}", i.gpa),
                new = format_args!("{gpa:#x}"),
                "mailbox page moved to another guest-physical address"
            );
            i.gpa = gpa;
        }
        Ok(gpa)
    }
}

/// 128 random bits. Uniqueness, not secrecy, is what matters, so if the
/// kernel RNG is not initialised yet (early boot) the non-blocking
/// `GRND_INSECURE` output is used rather than stalling start-up.
fn random_marker() -> Result<MarkerId, MailboxSetupError> {
    let mut m = [0u8; 16];
    for flags in [libc::GRND_NONBLOCK, libc::GRND_INSECURE] {
        // SAFETY: writes at most m.len() bytes into `m`.
        let n = unsafe { libc::getrandom(m.as_mut_ptr().cast(), m.len(), flags) };
        if n == m.len() as isize && m != [0; 16] {
            return Ok(MarkerId(m));
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) && flags == libc::GRND_INSECURE {
                return Err(MailboxSetupError::Random(e));
            }
        }
    }
    Err(MailboxSetupError::Random(std::io::Error::other(
        "getrandom returned no usable bytes",
    )))
}

/// Physical address of the page at virtual address `vaddr` in this process,
/// from `/proc/self/pagemap` (bit 63 present, bits 0..=54 PFN; root sees PFNs).
fn gpa_of(vaddr: usize) -> Result<u64, MailboxSetupError> {
    let f = File::open("/proc/self/pagemap").map_err(MailboxSetupError::Pagemap)?;
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, (vaddr / PAGE_SIZE) as u64 * 8)
        .map_err(MailboxSetupError::Pagemap)?;
    gpa_from_pagemap_entry(u64::from_le_bytes(e))
}

fn gpa_from_pagemap_entry(entry: u64) -> Result<u64, MailboxSetupError> {
    let present = entry >> 63 & 1 == 1;
    let pfn = entry & ((1u64 << 55) - 1);
    if !present || pfn == 0 {
        return Err(MailboxSetupError::NoPfn { entry });
    }
    Ok(pfn * PAGE_SIZE as u64)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_entry_decoding() {
        assert_eq!(
            gpa_from_pagemap_entry((1 << 63) | 0x1234).unwrap(),
            0x1234000
        );
        // Present bit clear.
        assert!(gpa_from_pagemap_entry(0x1234).is_err());
        // Present, PFN hidden (non-root readers see 0).
        assert!(gpa_from_pagemap_entry(1 << 63).is_err());
        // Soft-dirty / exclusive flag bits (55..=62) are not part of the PFN.
        assert_eq!(
            gpa_from_pagemap_entry((1 << 63) | (1 << 55) | (1 << 56) | 7).unwrap(),
            7 * 4096
        );
    }

    #[test]
    fn markers_are_random() {
        let a = random_marker().unwrap();
        let b = random_marker().unwrap();
        assert!(a.is_valid() && b.is_valid());
        assert_ne!(a, b);
    }

    /// Runs wherever PFNs are readable (root); elsewhere setup must fail with
    /// a typed error, never panic.
    #[test]
    fn arm_decode_mark_rearm_cycle() {
        let mb = match Mailbox::new(false) {
            Ok(mb) => mb,
            Err(e) => {
                eprintln!("mailbox unavailable here (not root?): {e}");
                return;
            }
        };
        let st = mb.status();
        let m0 = st.marker.unwrap();
        assert_eq!(mb.state_word(), MailboxState::EMPTY_WORD);
        assert!(st.gpa > 0 && st.gpa % PAGE_SIZE as u64 == 0);
        // EMPTY does not decode.
        assert!(matches!(mb.decode(), Err(MailboxError::BadState { .. })));
        // Mark rejected: state word flips, marker is withdrawn from status.
        let rep = GuestReport {
            signal_seen_us: 1,
            applied_us: 2,
            outcome_generation: 9,
            reject_code: 11,
        };
        mb.mark_rejected(&rep).unwrap();
        assert_eq!(mb.state_word(), MailboxState::REJECTED_WORD);
        let st = mb.status();
        assert_eq!((st.marker, st.rejected), (None, 1));
        let h = forkvm_mailbox::read_header(mb.lock().page.bytes()).unwrap();
        assert_eq!(h.guest, rep);
        // Re-arm: new marker, same frame.
        let (m1, gpa1) = mb.rearm().unwrap();
        assert_ne!(m0, m1);
        assert_eq!(gpa1, st.gpa);
        assert_eq!(mb.status().marker, Some(m1));
        assert_eq!(mb.state_word(), MailboxState::EMPTY_WORD);
        // A live fork()ed child must not share the page: without
        // MADV_DONTFORK the parent's next write would copy it to a new frame.
        let (rd, wr) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only calls async-signal-safe read(2) and _exit(2).
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let mut b = [0u8; 1];
                // SAFETY: close our copy of the write end (so the parent's
                // close means EOF), read until then, _exit.
                unsafe {
                    libc::close(std::os::fd::AsRawFd::as_raw_fd(&wr));
                    libc::read(
                        std::os::fd::AsRawFd::as_raw_fd(&rd),
                        b.as_mut_ptr().cast(),
                        1,
                    );
                    libc::_exit(0);
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                mb.rearm().unwrap();
                let moved = mb.check_gpa().unwrap();
                drop(wr);
                // The exec tests' reaper (waitpid(-1), same process under
                // `cargo test`) may collect the child first: ECHILD is fine.
                match nix::sys::wait::waitpid(child, None) {
                    Ok(_) | Err(nix::errno::Errno::ECHILD) => {}
                    Err(e) => panic!("waitpid: {e}"),
                }
                assert_eq!(moved, st.gpa, "page moved after fork + write");
            }
        }
    }
}
