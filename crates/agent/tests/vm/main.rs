//! Boots the static agent as /init in a real QEMU guest (TCG) and drives it
//! over the virtio-serial unix socket with the forkvm-proto client.
//!
//! Needs qemu-system-x86_64, busybox-static, `unshare` (util-linux), mkfs.erofs,
//! mkfs.ext4 and qemu-img (the workload test's disks) and the
//! extracted Debian kernel of the image cache (`FORKVM_TEST_KERNEL_DIR`; all set
//! up by `scripts/setup.sh`). Ignored by default because the agent must be built
//! static: run `crates/agent/scripts/vm-test.sh`, as `scripts/test.sh` does.
//!
//! Networking: QEMU runs in a fresh network namespace (`unshare --net`); the
//! guest NIC's backend sends its frames as UDP datagrams over that
//! namespace's loopback to a closed port (no host interface, no user-mode
//! networking). A `filter-dump` on the NIC records the frames the guest sends,
//! so the gratuitous ARP can be checked.
//!
//! Layout: the tests are here, each a list of phases; [`guest`] boots the VM
//! and runs commands in it, [`switch`] is the other end of the NIC for the
//! mailbox tests, [`qmp`] pauses and resumes the VM and [`mailbox`] plays the
//! host's side of a handoff; [`workload`] boots with an OCI image's disks and
//! drives StartWorkload.

mod guest;
mod mailbox;
mod qmp;
mod switch;
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use forkvm_mailbox::MailboxState;
use forkvm_proto::agent::{HealthRequest, NetworkConfig, SetClockRequest, exec_output};
use forkvm_proto::connect_unix;

use guest::{
    Client, Vm, arp_senders, boot_cfg, default_route_via, eth0, eth0_has_inet, eth0_has_mac, exec,
    frames, out, req, wait_until,
};
use mailbox::{
    Armed, Patch, armed, assert_counts, boot_mailbox_vm, handoff, health, payload, read_page,
    wait_rearm, wake_sources, write_patch,
};
use qmp::Qmp;
use switch::ACK_PORT;

// ---------------------------------------------------------------------------
// The agent service: boot, Exec, reconnects, ReconfigureNetwork, SetClock.

#[tokio::test(flavor = "current_thread")]
#[ignore = "boots a VM; run crates/agent/scripts/vm-test.sh"]
async fn agent_in_vm() {
    let cfg = boot_cfg(
        BTreeMap::from([("FVT_VAR".into(), "from-boot".into())]),
        Some(eth0("10.0.0.2", "10.0.0.1", &["10.0.0.1"])),
    );
    let mut vm = Vm::boot(&cfg, true);
    let mut c = vm.first_health_logged("boot-to-Health").await;
    let boot_id = boot_state_is_served(&vm, &mut c).await;
    exec_runs_commands(&mut c).await;
    measure_round_trips(&mut c).await;
    drop(c);
    reconnects_keep_serving(&vm, &boot_id).await;
    let mut c = overlapping_clients_take_over(&vm).await;
    reconfigure_network_readdresses(&vm, &mut c).await;
    set_clock_steps(&mut c).await;

    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    for m in [
        "Health",
        "Exec",
        "ExecStream",
        "ReconfigureNetwork",
        "SetClock",
    ] {
        assert!(h.rpc_counts.get(m).copied().unwrap_or(0) > 0, "{m}: {h:?}");
    }
}

/// Health after boot, the boot network and lo; returns the boot id.
async fn boot_state_is_served(vm: &Vm, c: &mut Client) -> String {
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.hostname, "fvt-guest");
    assert_eq!(h.boot_id.len(), 32, "{h:?}");
    assert!(h.rpc_counts["Health"] >= 2, "{h:?}");
    assert!(
        vm.console().contains("forkvm-agent: ready"),
        "{}",
        vm.console()
    );

    // Boot network applied by netlink.
    let r = exec(c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(out(&r).contains("inet 10.0.0.2/24"), "{}", out(&r));
    default_route_via(c, "10.0.0.1").await;
    let r = exec(c, &["ip", "link", "show", "lo"]).await;
    assert!(out(&r).contains("UP"), "{}", out(&r));
    h.boot_id
}

/// Entrypoint, env, stdin/stdout/stderr, exit codes, timeouts, NotFound,
/// reaping of orphans, ExecStream.
async fn exec_runs_commands(c: &mut Client) {
    // Entrypoint ran with the boot env; Exec sees boot env and request env.
    let r = exec(c, &["cat", "/run/ep"]).await;
    assert_eq!(out(&r), "entrypoint-ran\n", "{r:?}");
    let mut rq = req(&[
        "sh",
        "-c",
        "echo $FVT_VAR $REQ_VAR; cat; echo oops >&2; exit 4",
    ]);
    rq.env = HashMap::from([("REQ_VAR".into(), "from-req".into())]);
    rq.stdin = b"piped-stdin\n".to_vec();
    let r = c.exec(rq).await.unwrap().into_inner();
    assert_eq!(r.exit_code, 4);
    assert_eq!(out(&r), "from-boot from-req\npiped-stdin\n");
    assert_eq!(r.stderr, b"oops\n");

    // Timeout kills; missing program is NotFound.
    let mut rq = req(&["sleep", "30"]);
    rq.timeout_ms = 300;
    let t0 = Instant::now();
    let r = c.exec(rq).await.unwrap().into_inner();
    assert!(r.timed_out && r.signal == 9 && r.exit_code == -1, "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let e = c.exec(req(&["/nope"])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Orphans get reaped by PID 1 (no zombies remain).
    let r = exec(c, &["sh", "-c", "sleep 0.2 & sleep 0.1 & exit 0"]).await;
    assert_eq!(r.exit_code, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = exec(c, &["sh", "-c", "cat /proc/[0-9]*/stat"]).await;
        let zombies = out(&r).lines().filter(|l| l.contains(") Z ")).count();
        let sleeping = out(&r).lines().filter(|l| l.contains("(sleep)")).count();
        if zombies == 0 && sleeping == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "zombies remain:\n{}", out(&r));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // ExecStream.
    let mut s = c
        .exec_stream(req(&["sh", "-c", "echo a; echo b >&2; exit 7"]))
        .await
        .unwrap()
        .into_inner();
    let (mut so, mut se, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(m) = s.message().await.unwrap() {
        match m.kind {
            Some(exec_output::Kind::Stdout(b)) => so.extend(b),
            Some(exec_output::Kind::Stderr(b)) => se.extend(b),
            Some(exec_output::Kind::Exit(e)) => exit = Some(e),
            None => {}
        }
    }
    assert_eq!((so.as_slice(), se.as_slice()), (&b"a\n"[..], &b"b\n"[..]));
    assert_eq!(exit.map(|e| e.exit_code), Some(7));
    // A live response stream keeps the HTTP/2 connection referenced.
    drop(s);
}

/// Exec and Health round trips, printed.
async fn measure_round_trips(c: &mut Client) {
    let mut rtts = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        let r = exec(c, &["true"]).await;
        rtts.push(t0.elapsed());
        assert_eq!(r.exit_code, 0);
    }
    rtts.sort();
    println!(
        "Exec [true] round trip: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        rtts[0].as_secs_f64() * 1e3,
        rtts[10].as_secs_f64() * 1e3,
        rtts[19].as_secs_f64() * 1e3
    );
    let mut hrtt = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        c.health(HealthRequest {}).await.unwrap();
        hrtt.push(t0.elapsed());
    }
    hrtt.sort();
    println!(
        "Health round trip: median {:.2} ms",
        hrtt[10].as_secs_f64() * 1e3
    );
}

/// Disconnect and reconnect, several times (once with a call in flight);
/// the agent keeps serving, with the same boot id.
async fn reconnects_keep_serving(vm: &Vm, boot_id: &str) {
    for i in 0..3 {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(20);
        let mut c2 = loop {
            assert!(
                Instant::now() < deadline,
                "reconnect {i} failed:\n{}",
                vm.console()
            );
            if let Ok(mut c2) = connect_unix(&vm.sock).await
                && let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(5), c2.health(HealthRequest {})).await
            {
                break c2;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        println!(
            "reconnect {i}: Health after {:.1} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
        let h2 = c2.health(HealthRequest {}).await.unwrap().into_inner();
        assert_eq!(h2.boot_id, boot_id);
        let r = exec(&mut c2, &["echo", "again"]).await;
        assert_eq!(out(&r), "again\n");
        // Abort mid-call: the connection dies with a command running.
        if i == 1 {
            let mut c3 = c2.clone();
            let pending = tokio::spawn(async move { c3.exec(req(&["sleep", "2"])).await });
            // Give the request time to reach the guest; either way the
            // connection then drops with or without a call in flight.
            tokio::time::sleep(Duration::from_millis(100)).await;
            pending.abort();
        }
        drop(c2);
    }
}

/// Overlapping clients (daemon restart): the next client connects while the
/// previous one is still attached; QEMU hands it the port when the old one
/// closes. Hosts retry a failed first call once on a fresh connection.
/// Returns the last client.
async fn overlapping_clients_take_over(vm: &Vm) -> Client {
    let mut old = connect_unix(&vm.sock).await.unwrap();
    old.health(HealthRequest {}).await.unwrap();
    let mut retries = 0;
    for round in 0..3 {
        let t0 = Instant::now();
        let mut next = connect_unix(&vm.sock).await.unwrap();
        drop(old);
        let res =
            tokio::time::timeout(Duration::from_secs(10), next.health(HealthRequest {})).await;
        if !matches!(res, Ok(Ok(_))) {
            retries += 1;
            next = connect_unix(&vm.sock).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), next.health(HealthRequest {}))
                .await
                .expect("retry timed out")
                .expect("retry failed");
        }
        println!(
            "overlapping reconnect {round}: Health after {:.1} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
        old = next;
    }
    println!("overlapping reconnects needing a retry: {retries}/3");
    old
}

/// ReconfigureNetwork: invalid input, then a full re-address, then the same
/// config again (idempotent).
async fn reconfigure_network_readdresses(vm: &Vm, c: &mut Client) {
    let bad = NetworkConfig {
        interface: "eth0".into(),
        mac: "not-a-mac".into(),
        ipv4: "10.1.0.5".into(),
        prefix_len: 16,
        ..Default::default()
    };
    let e = c.reconfigure_network(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = c
        .reconfigure_network(NetworkConfig {
            interface: "eth9".into(),
            ipv4: "10.1.0.5".into(),
            prefix_len: 16,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let fork = NetworkConfig {
        interface: "eth0".into(),
        mac: "02:fc:00:00:00:02".into(),
        ipv4: "10.1.0.5".into(),
        prefix_len: 16,
        gateway: "10.1.0.1".into(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let rr = c
        .reconfigure_network(NetworkConfig {
            dns: vec!["10.1.0.1".into(), "9.9.9.9".into()],
            hostname: "fvt-fork".into(),
            ..fork.clone()
        })
        .await
        .unwrap()
        .into_inner();
    println!(
        "ReconfigureNetwork: {} us in guest, {:.1} ms round trip",
        rr.applied_us,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let ip_addr = eth0_has_inet(c, "10.1.0.5/16").await;
    assert!(!ip_addr.contains("10.0.0.2"), "{ip_addr}");
    let link = eth0_has_mac(c, "02:fc:00:00:00:02").await;
    assert!(link.contains(",UP"), "{link}");
    default_route_via(c, "10.1.0.1").await;
    let r = exec(c, &["cat", "/etc/resolv.conf"]).await;
    assert!(
        out(&r).contains("nameserver 10.1.0.1\nnameserver 9.9.9.9\n"),
        "{}",
        out(&r)
    );
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.hostname, "fvt-fork");
    // The gratuitous ARP with the new identity left the NIC.
    let want = ([0x02, 0xfc, 0, 0, 0, 2], [10, 1, 0, 5]);
    wait_until(
        Duration::from_secs(5),
        || arp_senders(&vm.pcap).contains(&want),
        || {
            format!(
                "no gratuitous ARP; seen {:?}\nframes {:x?}\n{}",
                arp_senders(&vm.pcap),
                frames(&vm.pcap),
                vm.console()
            )
        },
    )
    .await;
    // Applying the same config again is idempotent and cheap.
    let rr2 = c.reconfigure_network(fork).await.unwrap().into_inner();
    println!(
        "ReconfigureNetwork (no change): {} us in guest",
        rr2.applied_us
    );
    let r = exec(c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert_eq!(out(&r).matches("inet ").count(), 1, "{}", out(&r));
}

/// SetClock steps the realtime clock and refuses a negative time.
async fn set_clock_steps(c: &mut Client) {
    let target: i64 = 1_900_000_000;
    let sc = c
        .set_clock(SetClockRequest {
            unix_time_ns: target * 1_000_000_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(sc.stepped_ns, 0);
    let r = exec(c, &["date", "+%s"]).await;
    let now: i64 = out(&r).trim().parse().unwrap();
    assert!((target..target + 60).contains(&now), "{now}");
    let e = c
        .set_clock(SetClockRequest { unix_time_ns: -1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "boots a VM; run crates/agent/scripts/vm-test.sh"]
async fn decline_flag_and_no_network() {
    let cfg = boot_cfg(
        BTreeMap::from([("FORKVM_AGENT_DECLINE_RECONFIGURE".into(), "1".into())]),
        None,
    );
    let mut vm = Vm::boot(&cfg, true);
    let mut c = vm.first_health_logged("boot-to-Health (no network)").await;
    let e = c
        .reconfigure_network(NetworkConfig {
            interface: "eth0".into(),
            ipv4: "10.1.0.5".into(),
            prefix_len: 16,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    // network: None leaves eth0 down and unaddressed.
    let r = exec(&mut c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(!out(&r).contains("inet "), "{}", out(&r));
    let r = exec(&mut c, &["ip", "link", "show", "eth0"]).await;
    assert!(!out(&r).contains(",UP"), "{}", out(&r));
}

// ---------------------------------------------------------------------------
// Mailbox handoff: QMP, the guest memory file, and a tiny L2 "switch".

#[tokio::test(flavor = "current_thread")]
#[ignore = "boots a VM; run crates/agent/scripts/vm-test.sh"]
async fn mailbox_handoff_in_vm() {
    let mut vm = boot_mailbox_vm(BTreeMap::new());
    let mut c = vm.first_health_logged("boot-to-Health (mem file)").await;
    let mut qmp = Qmp::connect(&vm.qmp);

    // Armed at start: Health reports marker + GPA, and the page at that GPA
    // of the RAM file is an EMPTY mailbox with that marker.
    let Armed {
        health: h,
        gpa,
        marker,
    } = armed(&vm, &mut c).await;
    assert!(gpa > 0 && gpa % 4096 == 0 && gpa < 256 << 20, "{gpa:#x}");
    assert_counts(&h, 0, 0, 0);
    let hdr =
        forkvm_mailbox::verify_marker(&read_page(&vm, gpa), &forkvm_mailbox::MarkerId(marker))
            .unwrap();
    assert_eq!(hdr.state, MailboxState::Empty);
    // Exec forks children; the page must not move (MADV_DONTFORK).
    for _ in 0..3 {
        assert_eq!(exec(&mut c, &["true"]).await.exit_code, 0);
    }
    assert_eq!(health(&vm, &mut c).await.mailbox_gpa, gpa);

    let (c, marker2) = valid_payload_is_applied_and_acked(&vm, &mut qmp, c, gpa, marker).await;
    let (c, marker3) = duplicate_generation_is_rejected(&vm, &mut qmp, c, gpa, marker2).await;
    let (c, marker4) = forged_payload_is_rejected(&vm, &mut qmp, c, gpa, marker3).await;
    second_valid_payload_is_applied(&vm, &mut qmp, c, gpa, marker4).await;
}

/// An applied payload: the page is APPLIED, or — the agent re-arms right
/// after its first ack — already EMPTY under a new marker, the guest report
/// kept for the host either way.
fn applied_then_rearmed(vm: &Vm, h: &forkvm_mailbox::Header, old: &[u8; 16]) {
    let rearmed = h.state == MailboxState::Empty && h.marker.0 != *old;
    assert!(
        h.state == MailboxState::Applied || rearmed,
        "{h:?}\n{}",
        vm.console()
    );
}

/// The generation of handoff 1, the one the duplicate repeats.
const GEN1: u64 = 0x1111_2222_3333_4444;

/// Handoff 1, a valid payload: applied, acked from the new address, re-armed.
/// Returns the client and the new marker.
async fn valid_payload_is_applied_and_acked(
    vm: &Vm,
    qmp: &mut Qmp,
    c: Client,
    gpa: u64,
    marker: [u8; 16],
) -> (Client, [u8; 16]) {
    let p1 = payload("02:fc:00:00:00:10", [10, 0, 0, 77], "fvt-mbox-one");
    let r = handoff(vm, qmp, c, gpa, Patch::new(marker, GEN1, &p1)).await;
    let mut c = r.client;
    applied_then_rearmed(vm, &r.header, &marker);
    let g = r.header.guest;
    assert_eq!((g.outcome_generation, g.reject_code), (GEN1, 0), "{g:?}");
    assert!(
        g.signal_seen_us > 0 && g.applied_us > 0 && g.applied_us < 1_000_000,
        "{g:?}"
    );
    println!(
        "handoff 1: cont -> page APPLIED {:.1} ms; guest signal_seen -> applied {} us; wake {:?}",
        r.cont_to_outcome.as_secs_f64() * 1e3,
        g.applied_us,
        wake_sources(&vm.console())
    );
    acks_verify_from_new_address(vm, &p1, r.cont_at).await;
    // The identity really changed.
    let ip_addr = eth0_has_inet(&mut c, "10.0.0.77/24").await;
    assert!(!ip_addr.contains("10.0.0.2/"), "{ip_addr}");
    eth0_has_mac(&mut c, "02:fc:00:00:00:10").await;
    default_route_via(&mut c, "10.0.0.1").await;
    // Clock stepped to the host time carried in the payload.
    let date = exec(&mut c, &["date", "+%s"]).await;
    let guest_s: u64 = out(&date).trim().parse().unwrap();
    let host_s = p1.host_time_unix_ns / 1_000_000_000;
    assert!(
        (host_s..host_s + 60).contains(&guest_s),
        "{guest_s} vs {host_s}"
    );
    let h = health(vm, &mut c).await;
    assert_eq!(h.hostname, "fvt-mbox-one");
    assert_counts(&h, 1, 0, GEN1);
    let t_rearm = Instant::now();
    let marker2 = wait_rearm(vm, &mut c, &marker, gpa).await;
    assert_ne!(marker2, marker);
    println!(
        "re-arm seen {:.0} ms after cont",
        (t_rearm.elapsed() + (t_rearm - r.cont_at)).as_secs_f64() * 1e3
    );
    (c, marker2)
}

/// The authenticated ack of handoff 1 arrives from the new address, all six
/// sends; a forged key does not verify it.
async fn acks_verify_from_new_address(vm: &Vm, p1: &forkvm_mailbox::Payload, cont_at: Instant) {
    let sw = vm.switch.as_ref().unwrap();
    wait_until(
        Duration::from_secs(10),
        || sw.acks().len() >= 6,
        || format!("acks {:?}\n{}", sw.acks(), vm.console()),
    )
    .await;
    let got = sw.acks();
    for d in &got {
        assert_eq!(d.src, p1.ipv4);
        forkvm_mailbox::ack_verify(&d.payload, &p1.ack.key, GEN1, p1.mac, p1.ipv4).unwrap();
    }
    let ack_times: Vec<String> = got
        .iter()
        .map(|d| format!("{:.0}", (d.at - cont_at).as_secs_f64() * 1e3))
        .collect();
    println!(
        "handoff 1: acks received at ms after cont: {}",
        ack_times.join(", ")
    );
    // A forged ack key does not verify.
    assert!(
        forkvm_mailbox::ack_verify(
            &got[0].payload,
            &forkvm_mailbox::AckKey([7; 32]),
            GEN1,
            p1.mac,
            p1.ipv4
        )
        .is_err()
    );
}

/// Handoff 2, the same generation again (new marker, other address): ignored,
/// marked REJECTED (code 100), network unchanged.
async fn duplicate_generation_is_rejected(
    vm: &Vm,
    qmp: &mut Qmp,
    c: Client,
    gpa: u64,
    marker2: [u8; 16],
) -> (Client, [u8; 16]) {
    let p2 = payload("02:fc:00:00:00:20", [10, 0, 0, 88], "fvt-mbox-two");
    let r = handoff(vm, qmp, c, gpa, Patch::new(marker2, GEN1, &p2)).await;
    let mut c = r.client;
    assert_eq!(r.header.state, MailboxState::Rejected, "{:?}", r.header);
    assert_eq!(r.header.guest.reject_code, 100);
    assert_eq!(r.header.guest.outcome_generation, GEN1);
    let ip_addr = eth0_has_inet(&mut c, "10.0.0.77/24").await;
    assert!(!ip_addr.contains("10.0.0.88"), "{ip_addr}");
    assert_counts(&health(vm, &mut c).await, 1, 1, GEN1);
    println!(
        "handoff 2 (duplicate generation): cont -> REJECTED {:.1} ms",
        r.cont_to_outcome.as_secs_f64() * 1e3
    );
    let marker3 = wait_rearm(vm, &mut c, &marker2, gpa).await;
    (c, marker3)
}

/// Handoff 3, a forged payload (one payload byte flipped after patching): REJECTED
/// with PayloadCrc, network unchanged, no ack.
async fn forged_payload_is_rejected(
    vm: &Vm,
    qmp: &mut Qmp,
    c: Client,
    gpa: u64,
    marker3: [u8; 16],
) -> (Client, [u8; 16]) {
    let gen3 = 0x5555;
    let p3 = payload("02:fc:00:00:00:30", [10, 0, 0, 99], "fvt-mbox-three");
    let acks_before = vm.switch.as_ref().unwrap().acks().len();
    let patch = Patch {
        corrupt: true,
        ..Patch::new(marker3, gen3, &p3)
    };
    let r = handoff(vm, qmp, c, gpa, patch).await;
    let mut c = r.client;
    assert_eq!(r.header.state, MailboxState::Rejected, "{:?}", r.header);
    assert_eq!(r.header.guest.reject_code, 11, "PayloadCrc");
    assert_eq!(r.header.guest.outcome_generation, gen3);
    eth0_has_inet(&mut c, "10.0.0.77/24").await;
    eth0_has_mac(&mut c, "02:fc:00:00:00:10").await;
    assert_counts(&health(vm, &mut c).await, 1, 2, GEN1);
    assert_eq!(
        vm.switch.as_ref().unwrap().acks().len(),
        acks_before,
        "ack after a rejection"
    );
    println!(
        "handoff 3 (forged): cont -> REJECTED {:.1} ms",
        r.cont_to_outcome.as_secs_f64() * 1e3
    );
    let marker4 = wait_rearm(vm, &mut c, &marker3, gpa).await;
    (c, marker4)
}

/// Handoff 4, a second valid one on the re-armed page, for a second timing.
async fn second_valid_payload_is_applied(
    vm: &Vm,
    qmp: &mut Qmp,
    c: Client,
    gpa: u64,
    marker4: [u8; 16],
) {
    let gen4 = 0x6666;
    let p4 = payload("02:fc:00:00:00:40", [10, 0, 0, 44], "fvt-mbox-four");
    let r = handoff(vm, qmp, c, gpa, Patch::new(marker4, gen4, &p4)).await;
    let mut c = r.client;
    applied_then_rearmed(vm, &r.header, &marker4);
    assert_eq!(r.header.guest.outcome_generation, gen4, "{:?}", r.header);
    println!(
        "handoff 4: cont -> page APPLIED {:.1} ms; guest signal_seen -> applied {} us",
        r.cont_to_outcome.as_secs_f64() * 1e3,
        r.header.guest.applied_us
    );
    eth0_has_inet(&mut c, "10.0.0.44/24").await;
    assert_counts(&health(vm, &mut c).await, 2, 2, gen4);
    println!("wake sources: {:?}", wake_sources(&vm.console()));
    for l in vm.console().lines().filter(|l| l.contains("mailbox")) {
        println!("  console: {l}");
    }
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "boots a VM; run crates/agent/scripts/vm-test.sh"]
async fn mailbox_disabled_by_boot_env() {
    let mut vm = boot_mailbox_vm(BTreeMap::from([(
        "FORKVM_AGENT_DISABLE_MAILBOX".into(),
        "1".into(),
    )]));
    let (mut c, _) = vm.first_health().await;
    let mut qmp = Qmp::connect(&vm.qmp);
    // Still armed and reported.
    let Armed { gpa, marker, .. } = armed(&vm, &mut c).await;
    qmp.cmd("stop");
    let p = payload("02:fc:00:00:00:10", [10, 0, 0, 77], "fvt-mbox-off");
    write_patch(&vm, gpa, marker, 7, &p);
    drop(c);
    qmp.cmd("cont");
    let mut c = vm.reconnect().await;
    // The watcher saw the payload and said it will not apply it...
    wait_until(
        Duration::from_secs(10),
        || vm.console().contains("apply is disabled; ignoring"),
        || vm.console(),
    )
    .await;
    // ...so the page stays WRITTEN and the network unchanged.
    let hdr = forkvm_mailbox::read_header(&read_page(&vm, gpa)).unwrap();
    assert_eq!(hdr.state, MailboxState::Written);
    eth0_has_inet(&mut c, "10.0.0.2/24").await;
    let h = health(&vm, &mut c).await;
    assert_eq!((h.mailbox_applied, h.mailbox_rejected), (0, 0));
    assert!(
        vm.switch
            .as_ref()
            .unwrap()
            .datagrams()
            .iter()
            .all(|d| d.dport != ACK_PORT),
        "ack sent although disabled"
    );
}
