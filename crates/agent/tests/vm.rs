//! Boots the static agent as /init in a real QEMU guest (TCG) and drives it
//! over the virtio-serial unix socket with the forkvm-proto client.
//!
//! Needs root (mknod for dev/console), qemu-system-x86_64, busybox-static,
//! cpio and the Debian kernel at /var/tmp/kdev. Ignored by default; run with
//! `crates/agent/scripts/vm-test.sh`, which builds everything static.
//!
//! Networking: QEMU runs in a fresh network namespace (`unshare --net`); the
//! guest NIC's backend sends its frames as UDP datagrams over that
//! namespace's loopback to a closed port (no host interface, no user-mode
//! networking). A `filter-dump` on the NIC records the frames the guest sends,
//! so the gratuitous ARP can be checked.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkvm_proto::agent::agent_client::AgentClient;
use forkvm_proto::agent::{
    ExecRequest, ExecResponse, HealthRequest, NetworkConfig, SetClockRequest, exec_output,
};
use forkvm_proto::{BootConfig, BootNetwork, connect_unix};
use tonic::transport::Channel;

/// The guest kernel, as forkvm-image extracts it: `vmlinux`, `kernel.json`
/// and `modules/<path>` (scripts/test.sh points this at the image cache).
fn kdir() -> std::path::PathBuf {
    std::env::var_os("FORKVM_TEST_KERNEL_DIR")
        .map(Into::into)
        .expect("FORKVM_TEST_KERNEL_DIR: the extracted kernel directory (see scripts/test.sh)")
}

fn kver() -> String {
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(kdir().join("kernel.json")).expect("kernel.json in FORKVM_TEST_KERNEL_DIR"),
    )
    .expect("kernel.json");
    meta["kernel_version"]
        .as_str()
        .expect("kernel_version")
        .to_string()
}
const MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/char/virtio_console.ko",
];
const APPLETS: &[&str] = &[
    "sh", "ip", "ls", "cat", "echo", "httpd", "sleep", "date", "true", "ps",
];

/// Fails unless the agent binary has no ELF interpreter (i.e. is static).
fn assert_static(bin: &Path) {
    let b = std::fs::read(bin).unwrap();
    assert_eq!(&b[..4], b"\x7fELF");
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes([b[0x36], b[0x37]]) as usize;
    let phnum = u16::from_le_bytes([b[0x38], b[0x39]]) as usize;
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(b[off..off + 4].try_into().unwrap());
        assert_ne!(
            p_type,
            3,
            "{} is dynamically linked; build with crates/agent/scripts/vm-test.sh",
            bin.display()
        );
    }
}

fn build_initramfs(dir: &Path) -> PathBuf {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_forkvm-agent"));
    assert_static(&agent);
    let root = dir.join("root");
    for d in ["bin", "dev", "etc/forkvm", "proc", "sys", "tmp", "run"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // Debug info makes the binary ~90 MB; the guest has 256 MiB for both the
    // compressed archive and the unpacked files.
    let st = Command::new("strip")
        .arg("-o")
        .arg(root.join("init"))
        .arg(&agent)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    nix::sys::stat::mknod(
        &root.join("dev/console"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(5, 1),
    )
    .unwrap();
    let mdir = root.join("lib/modules").join(kver());
    for m in MODULES {
        let dst = mdir.join(m);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(kdir().join("modules").join(m), dst).unwrap();
    }
    std::fs::write(root.join("etc/forkvm/modules"), MODULES.join("\n") + "\n").unwrap();
    let img = dir.join("initrd.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet > {}",
            img.display()
        ))
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(st.success());
    img
}

/// A running guest; killed and reaped on drop.
struct Vm {
    child: Child,
    sock: PathBuf,
    console: PathBuf,
    pcap: PathBuf,
    launched: Instant,
    _dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    fn boot(cfg: &BootConfig, with_nic: bool) -> Vm {
        let dir = tempfile::Builder::new()
            .prefix("fvt-agent-")
            .tempdir()
            .unwrap();
        let initrd = build_initramfs(dir.path());
        let sock = dir.path().join("agent.sock");
        let console = dir.path().join("console.log");
        let pcap = dir.path().join("net.pcap");
        let append = format!(
            "console=ttyS0 loglevel=4 panic=-1 {}",
            cfg.to_cmdline_arg().unwrap()
        );
        // QEMU runs in a private network namespace (gone when it exits) whose
        // loopback carries the NIC's frames as UDP datagrams to nowhere; the
        // host's own namespace is never touched.
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--net",
            "--",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ])
        .arg("qemu-system-x86_64")
        .args([
            "-M",
            "q35",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-m",
            "256",
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kdir().join("vmlinux"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-device", "virtio-serial-pci"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["-device", "virtserialport,chardev=agent,name=forkvm.agent"]);
        if with_nic {
            // A hub port would be simpler but stalls TX: with no other port
            // it never accepts a frame after the first.
            cmd.args(["-netdev", "dgram,id=n0,remote.type=inet,remote.host=127.0.0.1,remote.port=9,local.type=inet,local.host=127.0.0.1,local.port=4555"])
                .args(["-device", "virtio-net-pci,netdev=n0,mac=02:fc:00:00:00:01"])
                .arg("-object")
                .arg(format!("filter-dump,id=dump0,netdev=n0,file={}", pcap.display()));
        }
        let launched = Instant::now();
        let child = cmd.stdin(Stdio::null()).spawn().unwrap();
        Vm {
            child,
            sock,
            console,
            pcap,
            launched,
            _dir: dir,
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Connects and waits for the first successful Health; returns the client
    /// and the time from QEMU launch to that answer.
    async fn first_health(&mut self) -> (AgentClient<Channel>, Duration) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "qemu exited:\n{}",
                self.console()
            );
            assert!(
                Instant::now() < deadline,
                "agent never answered:\n{}",
                self.console()
            );
            if let Ok(mut c) = connect_unix(&self.sock).await {
                // QEMU holds our bytes until the guest opens the port, so one
                // long-lived attempt covers the whole boot.
                let left = deadline.saturating_duration_since(Instant::now());
                if let Ok(Ok(_)) = tokio::time::timeout(left, c.health(HealthRequest {})).await {
                    return (c, self.launched.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn exec(c: &mut AgentClient<Channel>, argv: &[&str]) -> ExecResponse {
    c.exec(req(argv)).await.unwrap().into_inner()
}

fn out(r: &ExecResponse) -> String {
    String::from_utf8_lossy(&r.stdout).into_owned()
}

/// MAC/IPv4 sender pairs of ARP frames in a pcap written by QEMU filter-dump.
fn arp_senders(pcap: &Path) -> Vec<([u8; 6], [u8; 4])> {
    let b = std::fs::read(pcap).unwrap_or_default();
    let mut res = Vec::new();
    let mut off = 24;
    while off + 16 <= b.len() {
        let caplen = u32::from_le_bytes(b[off + 8..off + 12].try_into().unwrap()) as usize;
        let f = &b[off + 16..(off + 16 + caplen).min(b.len())];
        if f.len() >= 42 && f[12..14] == [0x08, 0x06] {
            res.push((f[22..28].try_into().unwrap(), f[28..32].try_into().unwrap()));
        }
        off += 16 + caplen;
    }
    res
}

/// (ethertype, source MAC) of every frame in the pcap, for diagnostics.
fn frames(pcap: &Path) -> Vec<(u16, [u8; 6])> {
    let b = std::fs::read(pcap).unwrap_or_default();
    let mut res = Vec::new();
    let mut off = 24;
    while off + 16 <= b.len() {
        let caplen = u32::from_le_bytes(b[off + 8..off + 12].try_into().unwrap()) as usize;
        let f = &b[off + 16..(off + 16 + caplen).min(b.len())];
        if f.len() >= 14 {
            res.push((
                u16::from_be_bytes([f[12], f[13]]),
                f[6..12].try_into().unwrap(),
            ));
        }
        off += 16 + caplen;
    }
    res
}

fn boot_cfg(env: BTreeMap<String, String>, network: Option<BootNetwork>) -> BootConfig {
    BootConfig {
        hostname: "fvt-guest".into(),
        network,
        env,
        entrypoint: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo entrypoint-ran > /run/ep".into(),
        ],
        ..Default::default()
    }
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "boots a VM; run crates/agent/scripts/vm-test.sh"]
async fn agent_in_vm() {
    let cfg = boot_cfg(
        BTreeMap::from([("FVT_VAR".into(), "from-boot".into())]),
        Some(BootNetwork {
            interface: "eth0".into(),
            mac: String::new(),
            ipv4: "10.0.0.2".into(),
            prefix_len: 24,
            gateway: "10.0.0.1".into(),
            dns: vec!["10.0.0.1".into()],
        }),
    );
    let mut vm = Vm::boot(&cfg, true);
    let (mut c, boot_to_health) = vm.first_health().await;
    println!(
        "boot-to-Health: {:.0} ms",
        boot_to_health.as_secs_f64() * 1e3
    );

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
    let r = exec(&mut c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(out(&r).contains("inet 10.0.0.2/24"), "{}", out(&r));
    let r = exec(&mut c, &["ip", "route"]).await;
    assert!(
        out(&r).contains("default via 10.0.0.1 dev eth0"),
        "{}",
        out(&r)
    );
    let r = exec(&mut c, &["ip", "link", "show", "lo"]).await;
    assert!(out(&r).contains("UP"), "{}", out(&r));

    // Entrypoint ran with the boot env; Exec sees boot env and request env.
    let r = exec(&mut c, &["cat", "/run/ep"]).await;
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
    let r = exec(&mut c, &["sh", "-c", "sleep 0.2 & sleep 0.1 & exit 0"]).await;
    assert_eq!(r.exit_code, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = exec(&mut c, &["sh", "-c", "cat /proc/[0-9]*/stat"]).await;
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

    // Exec round trip.
    let mut rtts = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        let r = exec(&mut c, &["true"]).await;
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

    // Disconnect and reconnect, several times; the agent keeps serving.
    let boot_id = h.boot_id.clone();
    drop(c);
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

    // Overlapping clients (daemon restart): the next client connects while the
    // previous one is still attached; QEMU hands it the port when the old one
    // closes. Hosts retry a failed first call once on a fresh connection.
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
    let mut c = old;

    // ReconfigureNetwork: invalid input, then a full re-address.
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
    let t0 = Instant::now();
    let rr = c
        .reconfigure_network(NetworkConfig {
            interface: "eth0".into(),
            mac: "02:fc:00:00:00:02".into(),
            ipv4: "10.1.0.5".into(),
            prefix_len: 16,
            gateway: "10.1.0.1".into(),
            dns: vec!["10.1.0.1".into(), "9.9.9.9".into()],
            hostname: "fvt-fork".into(),
        })
        .await
        .unwrap()
        .into_inner();
    println!(
        "ReconfigureNetwork: {} us in guest, {:.1} ms round trip",
        rr.applied_us,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let r = exec(&mut c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert!(out(&r).contains("inet 10.1.0.5/16"), "{}", out(&r));
    assert!(!out(&r).contains("10.0.0.2"), "{}", out(&r));
    let r = exec(&mut c, &["ip", "link", "show", "eth0"]).await;
    assert!(
        out(&r).contains("link/ether 02:fc:00:00:00:02"),
        "{}",
        out(&r)
    );
    assert!(out(&r).contains(",UP"), "{}", out(&r));
    let r = exec(&mut c, &["ip", "route"]).await;
    assert!(
        out(&r).contains("default via 10.1.0.1 dev eth0"),
        "{}",
        out(&r)
    );
    let r = exec(&mut c, &["cat", "/etc/resolv.conf"]).await;
    assert!(
        out(&r).contains("nameserver 10.1.0.1\nnameserver 9.9.9.9\n"),
        "{}",
        out(&r)
    );
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.hostname, "fvt-fork");
    // The gratuitous ARP with the new identity left the NIC.
    let deadline = Instant::now() + Duration::from_secs(5);
    let want = ([0x02, 0xfc, 0, 0, 0, 2], [10, 1, 0, 5]);
    while !arp_senders(&vm.pcap).contains(&want) {
        assert!(
            Instant::now() < deadline,
            "no gratuitous ARP; seen {:?}\nframes {:x?}\n{}",
            arp_senders(&vm.pcap),
            frames(&vm.pcap),
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Applying the same config again is idempotent and cheap.
    let rr2 = c
        .reconfigure_network(NetworkConfig {
            interface: "eth0".into(),
            mac: "02:fc:00:00:00:02".into(),
            ipv4: "10.1.0.5".into(),
            prefix_len: 16,
            gateway: "10.1.0.1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    println!(
        "ReconfigureNetwork (no change): {} us in guest",
        rr2.applied_us
    );
    let r = exec(&mut c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert_eq!(out(&r).matches("inet ").count(), 1, "{}", out(&r));

    // SetClock steps the realtime clock.
    let target: i64 = 1_900_000_000;
    let sc = c
        .set_clock(SetClockRequest {
            unix_time_ns: target * 1_000_000_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(sc.stepped_ns, 0);
    let r = exec(&mut c, &["date", "+%s"]).await;
    let now: i64 = out(&r).trim().parse().unwrap();
    assert!((target..target + 60).contains(&now), "{now}");
    let e = c
        .set_clock(SetClockRequest { unix_time_ns: -1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

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

#[tokio::test(flavor = "current_thread")]
#[ignore = "boots a VM; run crates/agent/scripts/vm-test.sh"]
async fn decline_flag_and_no_network() {
    let cfg = boot_cfg(
        BTreeMap::from([("FORKVM_AGENT_DECLINE_RECONFIGURE".into(), "1".into())]),
        None,
    );
    let mut vm = Vm::boot(&cfg, true);
    let (mut c, boot_to_health) = vm.first_health().await;
    println!(
        "boot-to-Health (no network): {:.0} ms",
        boot_to_health.as_secs_f64() * 1e3
    );
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
