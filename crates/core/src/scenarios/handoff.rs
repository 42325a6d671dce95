//! The handoff ladder's choices: which path a fork takes and why, and where
//! the mailbox payload is written.

use super::*;
use crate::model::{HandoffPath, Stage};
use crate::testkit::{Answer, FakeVm, World};
use forkvm_mailbox as mbx;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

const GPA: u64 = 0x5000;
const MARKER: [u8; 16] = [0x5a; 16];

/// Arms a mailbox page in the source's memory and has its agent report it.
async fn armed_source(w: &World) -> Instance {
    let src = w.running("src").await;
    let mut page = vec![0u8; mbx::PAGE_SIZE];
    mbx::arm(&mut page, mbx::MarkerId(MARKER)).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(w.mem_file(&src.id))
        .unwrap();
    f.write_all_at(&page, GPA).unwrap();
    w.agent.report_mailbox(MARKER, GPA);
    src
}

fn page_of(vm: &FakeVm) -> Vec<u8> {
    vm.read(GPA, mbx::PAGE_SIZE).unwrap()
}

/// A guest hook that rewrites the fork's page with `f`, as its agent would.
fn guest_edits(
    w: &World,
    f: impl Fn(&mut Vec<u8>) + Send + Sync + 'static,
) -> crate::testkit::OnResume {
    let hv = Arc::downgrade(&w.hv);
    Arc::new(move |vm: &FakeVm| {
        let mut page = page_of(vm);
        f(&mut page);
        if let Some(hv) = hv.upgrade() {
            hv.poke(&vm.id, GPA, &page);
        }
    })
}

fn fallback(i: &Instance) -> String {
    i.handoff
        .as_ref()
        .and_then(|h| h.fallback_reason.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_requested_rpc_path_skips_the_mailbox() {
    let w = World::new().await;
    armed_source(&w).await;
    let f = fork_one(&w, "src", with_path("f", HandoffPath::Rpc))
        .await
        .unwrap();
    let h = f.handoff.as_ref().unwrap();
    assert_eq!(h.path, Some(HandoffPath::Rpc));
    assert_eq!(fallback(&f), "handoff path rpc requested");
    assert!(
        h.get(Stage::MailboxPrepare).is_none(),
        "the mailbox was not prepared"
    );
}

#[tokio::test]
async fn a_requested_exec_path_never_calls_the_rpc() {
    let w = World::new().await;
    w.running("src").await;
    let f = fork_one(&w, "src", with_path("f", HandoffPath::Exec))
        .await
        .unwrap();
    assert_eq!(f.handoff.as_ref().unwrap().path, Some(HandoffPath::Exec));
    assert_eq!(w.agent.calls("ReconfigureNetwork", &f.id), 0);
    assert_eq!(w.agent.calls("Exec", &f.id), 1);
}

#[tokio::test]
async fn an_agent_without_the_rpc_gets_the_exec_path() {
    let w = World::new().await;
    w.running("src").await;
    w.agent.reconfigure(Answer::Unimplemented);
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    assert_eq!(f.handoff.as_ref().unwrap().path, Some(HandoffPath::Exec));
    let why = fallback(&f);
    assert!(
        why.starts_with("the snapshot has no armed mailbox; "),
        "{why}"
    );
    assert!(
        why.contains("does not implement ReconfigureNetwork"),
        "{why}"
    );
}

#[tokio::test]
async fn a_marker_missing_from_memory_falls_back_to_rpc() {
    let w = World::new().await;
    w.running("src").await;
    // Reported, but never written into guest memory.
    w.agent.report_mailbox(MARKER, GPA);
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    assert_eq!(f.handoff.as_ref().unwrap().path, Some(HandoffPath::Rpc));
    assert_eq!(
        fallback(&f),
        "mailbox marker not found at its reported address"
    );
}

#[tokio::test]
async fn a_moved_page_falls_back_without_searching_guest_memory() {
    let w = World::new().await;
    armed_source(&w).await;
    // The agent reports a stale address; the armed page is elsewhere. The
    // host reads one page, never searches, and writes nothing.
    w.agent.report_mailbox(MARKER, GPA + 0x10000);
    w.hv.on_resume(Arc::new(|vm: &FakeVm| {
        let h = mbx::read_header(&page_of(vm)).unwrap();
        assert_eq!(
            h.state,
            mbx::MailboxState::Empty,
            "the page was not written"
        );
    }));
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    assert_eq!(f.handoff.as_ref().unwrap().path, Some(HandoffPath::Rpc));
    assert_eq!(
        fallback(&f),
        "mailbox marker not found at its reported address"
    );
}

#[tokio::test]
async fn a_page_address_outside_guest_ram_falls_back() {
    let w = World::new().await;
    armed_source(&w).await;
    w.agent.report_mailbox(MARKER, u64::MAX - 0xfff);
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    assert_eq!(f.handoff.as_ref().unwrap().path, Some(HandoffPath::Rpc));
    assert!(
        fallback(&f).contains("outside guest RAM"),
        "{}",
        fallback(&f)
    );
}

#[tokio::test]
async fn the_payload_goes_into_the_fork_never_the_source() {
    let w = World::new().await;
    let src = armed_source(&w).await;
    let seen = Arc::new(std::sync::Mutex::new(None));
    let s2 = seen.clone();
    w.hv.on_resume(Arc::new(move |vm: &FakeVm| {
        let page = page_of(vm);
        let payload = mbx::decode(&page, &mbx::MarkerId(MARKER)).map(|(_, p)| p.ipv4);
        *s2.lock().unwrap() = Some(payload.ok());
    }));
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        Some(f.network.ip),
        "the fork read its own address from its page"
    );
    let src_page = {
        let file = std::fs::File::open(w.mem_file(&src.id)).unwrap();
        let mut p = vec![0u8; mbx::PAGE_SIZE];
        file.read_exact_at(&mut p, GPA).unwrap();
        p
    };
    let h = mbx::read_header(&src_page).unwrap();
    assert_eq!(
        h.state,
        mbx::MailboxState::Empty,
        "the source's page is untouched"
    );
    assert!(
        f.handoff
            .as_ref()
            .unwrap()
            .get(Stage::MailboxPrepare)
            .is_some()
    );
}

#[tokio::test]
async fn a_guest_that_rejects_the_payload_falls_back_at_once() {
    let w = World::new().await;
    armed_source(&w).await;
    w.hv.on_resume(guest_edits(&w, |page| {
        mbx::mark(page, mbx::MailboxState::Rejected).unwrap();
        let report = mbx::GuestReport {
            signal_seen_us: 1,
            applied_us: 2,
            outcome_generation: 0,
            reject_code: 11,
        };
        mbx::write_guest_report(page, &report).unwrap();
    }));
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    assert_eq!(f.handoff.as_ref().unwrap().path, Some(HandoffPath::Rpc));
    assert_eq!(fallback(&f), "guest rejected the mailbox payload (code 11)");
}

#[tokio::test]
async fn a_silent_guest_falls_back_after_the_ack_deadline() {
    let w = World::new().await;
    armed_source(&w).await;
    let t = std::time::Instant::now();
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    assert_eq!(f.handoff.as_ref().unwrap().path, Some(HandoffPath::Rpc));
    assert!(fallback(&f).starts_with("guest did not pick up the mailbox within 300ms"));
    assert!(t.elapsed() >= w.cfg.mailbox_ack_timeout);
}

#[tokio::test]
async fn an_applied_payload_without_an_ack_is_not_trusted() {
    let w = World::new().await;
    armed_source(&w).await;
    // The guest says "applied" in the page but no authenticated datagram
    // arrives from the new address: the page alone proves nothing.
    w.hv.on_resume(guest_edits(&w, |page| {
        mbx::mark(page, mbx::MailboxState::Applied).unwrap();
    }));
    let f = fork_one(&w, "src", from_running("f", None)).await.unwrap();
    assert_eq!(f.handoff.as_ref().unwrap().path, Some(HandoffPath::Rpc));
    assert!(
        fallback(&f).starts_with("no valid mailbox ack within"),
        "{}",
        fallback(&f)
    );
}
