//! The host side of a mailbox handoff, as the tests play it: the guest RAM
//! file, payloads, patching the page of a paused VM and waiting for the
//! agent's outcome and re-arm.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use forkvm_proto::agent::{HealthRequest, HealthResponse};

use crate::guest::{BootOpts, Client, Nic, Vm, boot_cfg, eth0};
use crate::qmp::Qmp;
use crate::switch::{ACK_PORT, GW};

/// Boots a guest as a forkvm host runs one for snapshots: RAM in a shared
/// file, vmgenid, QMP, the NIC on the in-test switch, and `eth0` at
/// 10.0.0.2/24 via [`GW`] from the boot config.
pub fn boot_mailbox_vm(env: BTreeMap<String, String>) -> Vm {
    let cfg = boot_cfg(env, Some(eth0("10.0.0.2", &GW.to_string(), &[])));
    Vm::boot_with(
        &cfg,
        BootOpts {
            nic: Nic::Switch,
            mem_file: true,
            ..Default::default()
        },
    )
}

/// The mailbox as Health reports it after arming.
pub struct Armed {
    pub health: HealthResponse,
    pub gpa: u64,
    pub marker: [u8; 16],
}

/// Health must report an armed mailbox: a 16-byte marker and its GPA.
pub async fn armed(vm: &Vm, c: &mut Client) -> Armed {
    let h = health(vm, c).await;
    assert_eq!(h.mailbox_marker.len(), 16, "{h:?}");
    let gpa = h.mailbox_gpa;
    let marker: [u8; 16] = h.mailbox_marker.as_slice().try_into().unwrap();
    Armed {
        health: h,
        gpa,
        marker,
    }
}

/// The mailbox counters of a Health answer: (applied, rejected, last
/// applied generation).
#[track_caller]
pub fn assert_counts(h: &HealthResponse, applied: u64, rejected: u64, generation: u64) {
    assert_eq!(
        (
            h.mailbox_applied,
            h.mailbox_rejected,
            h.mailbox_applied_generation
        ),
        (applied, rejected, generation)
    );
}

fn mem_file(vm: &Vm) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(vm.mem.as_ref().unwrap())
        .unwrap()
}

/// The mailbox page as it is in guest RAM (file offset == GPA on q35/256M).
pub fn read_page(vm: &Vm, gpa: u64) -> Vec<u8> {
    let mut p = vec![0u8; forkvm_mailbox::PAGE_SIZE];
    mem_file(vm).read_exact_at(&mut p, gpa).unwrap();
    p
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    std::io::Read::read_exact(&mut File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b
}

pub fn payload(mac: &str, ip: [u8; 4], hostname: &str) -> forkvm_mailbox::Payload {
    forkvm_mailbox::Payload {
        interface: "eth0".into(),
        mac: mac.parse().unwrap(),
        ipv4: ip.into(),
        prefix_len: 24,
        gateway: GW,
        dns: vec![GW],
        hostname: hostname.into(),
        host_time_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        // The absolute form (older hosts); e2e `uniqueness` covers the step.
        clock_behind_ns: None,
        rng_seed: forkvm_mailbox::Seed(random32()),
        ack: forkvm_mailbox::AckTarget {
            ip: GW,
            port: ACK_PORT,
            key: forkvm_mailbox::AckKey(random32()),
        },
    }
}

/// What [`handoff`] writes into the page.
pub struct Patch<'a> {
    pub marker: [u8; 16],
    pub generation: u64,
    pub payload: &'a forkvm_mailbox::Payload,
    /// Flip one payload byte after patching (a forged/corrupt payload).
    pub corrupt: bool,
}

impl<'a> Patch<'a> {
    /// A patch written as the host writes it (not corrupted).
    pub fn new(marker: [u8; 16], generation: u64, payload: &'a forkvm_mailbox::Payload) -> Self {
        Patch {
            marker,
            generation,
            payload,
            corrupt: false,
        }
    }
}

pub struct HandoffResult {
    /// `cont` → the page left WRITTEN (APPLIED or REJECTED), polled in the file.
    pub cont_to_outcome: Duration,
    pub cont_at: Instant,
    pub header: forkvm_mailbox::Header,
    pub client: Client,
}

/// Writes `p` into the page at `gpa` of the (paused) guest's RAM file the
/// way a host does ([`forkvm_mailbox::prepare_patch`], writes in order, state
/// word last); returns the open file.
pub fn write_patch(
    vm: &Vm,
    gpa: u64,
    marker: [u8; 16],
    generation: u64,
    p: &forkvm_mailbox::Payload,
) -> File {
    let current = read_page(vm, gpa);
    let prepared =
        forkvm_mailbox::prepare_patch(&current, &forkvm_mailbox::MarkerId(marker), generation, p)
            .unwrap();
    let f = mem_file(vm);
    for (off, bytes) in prepared.writes() {
        f.write_all_at(bytes, gpa + off as u64).unwrap();
    }
    f
}

/// One simulated fork handoff on the running VM: `stop`, patch the page in
/// the memory file (optionally corrupting one payload byte afterwards),
/// `cont`, then reconnect the agent channel as a host does after a restore
/// (the guest sees that as SIGIO), and wait until the page shows an outcome.
pub async fn handoff(
    vm: &Vm,
    qmp: &mut Qmp,
    client: Client,
    gpa: u64,
    patch: Patch<'_>,
) -> HandoffResult {
    let Patch {
        marker,
        generation,
        payload: p,
        corrupt,
    } = patch;
    qmp.cmd("stop");
    let f = write_patch(vm, gpa, marker, generation, p);
    if corrupt {
        let at = gpa + forkvm_mailbox::OFF_PAYLOAD as u64 + 3;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    }
    drop(client);
    qmp.cmd("cont");
    let cont_at = Instant::now();
    let poller = poll_outcome(vm, gpa, cont_at);
    let client = vm.reconnect().await;
    let cont_to_outcome = tokio::task::spawn_blocking(move || poller.join().unwrap())
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("page still WRITTEN 10 s after cont:\n{}", vm.console()));
    let header = forkvm_mailbox::read_header(&read_page(vm, gpa)).unwrap();
    HandoffResult {
        cont_to_outcome,
        cont_at,
        header,
        client,
    }
}

/// Polls the page's state word on its own thread, for sub-ms resolution,
/// until it leaves WRITTEN: the time since `cont_at`, or `None` after 10 s.
fn poll_outcome(vm: &Vm, gpa: u64, cont_at: Instant) -> std::thread::JoinHandle<Option<Duration>> {
    let mem = vm.mem.clone().unwrap();
    std::thread::spawn(move || {
        let f = File::open(mem).unwrap();
        let deadline = cont_at + Duration::from_secs(10);
        let mut w = [0u8; 4];
        loop {
            f.read_exact_at(&mut w, gpa + forkvm_mailbox::OFF_STATE as u64)
                .unwrap();
            if u32::from_le_bytes(w) != forkvm_mailbox::MailboxState::WRITTEN_WORD {
                return Some(cont_at.elapsed());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    })
}

/// Health, retrying once on a fresh connection (see docs/agent.md).
pub async fn health(vm: &Vm, c: &mut Client) -> HealthResponse {
    match c.health(HealthRequest {}).await {
        Ok(h) => h.into_inner(),
        Err(_) => {
            *c = vm.reconnect().await;
            c.health(HealthRequest {}).await.unwrap().into_inner()
        }
    }
}

/// Waits for the agent to re-arm: Health reports a marker other than `old`;
/// checks the page in guest RAM carries it, EMPTY, at the same GPA.
pub async fn wait_rearm(vm: &Vm, c: &mut Client, old: &[u8], gpa: u64) -> [u8; 16] {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = health(vm, c).await;
        if !h.mailbox_marker.is_empty() && h.mailbox_marker != old {
            assert_eq!(h.mailbox_gpa, gpa, "mailbox moved");
            let m: [u8; 16] = h.mailbox_marker.as_slice().try_into().unwrap();
            let hdr =
                forkvm_mailbox::verify_marker(&read_page(vm, gpa), &forkvm_mailbox::MarkerId(m))
                    .unwrap();
            assert_eq!(hdr.state, forkvm_mailbox::MailboxState::Empty);
            return m;
        }
        assert!(Instant::now() < deadline, "no re-arm:\n{}", vm.console());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `wake=` of each "mailbox payload seen" line the agent logged.
pub fn wake_sources(console: &str) -> Vec<String> {
    console
        .lines()
        .filter(|l| l.contains("mailbox payload seen"))
        .filter_map(|l| l.split("wake=").nth(1))
        .map(|w| w.split_whitespace().next().unwrap_or("").to_owned())
        .collect()
}
