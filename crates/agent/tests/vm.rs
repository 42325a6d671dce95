//! Boots the static agent as /init in a real QEMU guest (TCG) and drives it
//! over the virtio-serial unix socket with the forkvm-proto client.
//!
//! Needs qemu-system-x86_64, busybox-static, `unshare` (util-linux) and the
//! extracted Debian kernel of the image cache (`FORKVM_TEST_KERNEL_DIR`; all set
//! up by `scripts/setup.sh`). Ignored by default because the agent must be built
//! static: run `crates/agent/scripts/vm-test.sh`, as `scripts/test.sh` does.
//!
//! Networking: QEMU runs in a fresh network namespace (`unshare --net`); the
//! guest NIC's backend sends its frames as UDP datagrams over that
//! namespace's loopback to a closed port (no host interface, no user-mode
//! networking). A `filter-dump` on the NIC records the frames the guest sends,
//! so the gratuitous ARP can be checked.

use std::collections::{BTreeMap, HashMap};
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

/// The agent as `/init`, busybox, `dev/console` and the virtio modules, written
/// with forkvm's own newc writer (no external `cpio`, no root needed for mknod).
fn build_initramfs(dir: &Path) -> PathBuf {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_forkvm-agent"));
    assert_static(&agent);
    // Debug info makes the binary ~90 MB; the guest has 256 MiB for both the
    // compressed archive and the unpacked files. `strip` is binutils, which the
    // Rust toolchain's linker needs anyway.
    let stripped = dir.join("init");
    let st = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&agent)
        .status()
        .expect("running strip (binutils)");
    assert!(st.success());
    let img = dir.join("initrd.cpio");
    let file = std::io::BufWriter::new(std::fs::File::create(&img).unwrap());
    let mut w = forkvm_cpio::CpioWriter::new(file);
    for d in ["bin", "dev", "etc/forkvm", "proc", "sys", "tmp", "run"] {
        w.dir(d, 0o755).unwrap();
    }
    w.file("init", 0o755, &std::fs::read(&stripped).unwrap())
        .unwrap();
    w.file(
        "bin/busybox",
        0o755,
        &std::fs::read("/bin/busybox").unwrap(),
    )
    .unwrap();
    for a in APPLETS {
        w.symlink(&format!("bin/{a}"), "busybox").unwrap();
    }
    w.char_dev("dev/console", 0o600, 5, 1).unwrap();
    let mdir = format!("lib/modules/{}", kver());
    for m in MODULES {
        let ko = std::fs::read(kdir().join("modules").join(m)).unwrap();
        w.file(&format!("{mdir}/{m}"), 0o644, &ko).unwrap();
    }
    w.file(
        "etc/forkvm/modules",
        0o644,
        (MODULES.join("\n") + "\n").as_bytes(),
    )
    .unwrap();
    w.finish().unwrap();
    img
}

/// How the guest NIC is attached.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum Nic {
    #[default]
    None,
    /// UDP datagrams to nowhere on the private namespace's loopback, with a
    /// `filter-dump` pcap.
    Dump,
    /// Unix datagram socket to an in-test [`Switch`] that answers ARP and
    /// records UDP datagrams (no IP networking on the host at all).
    Switch,
}

#[derive(Default)]
struct BootOpts {
    nic: Nic,
    /// Guest RAM in a shared memory file on /dev/shm, `-device vmgenid` and a
    /// QMP socket: what a forkvm host uses for snapshots and mailbox patches.
    mem_file: bool,
}

/// A running guest; killed and reaped on drop.
struct Vm {
    child: Child,
    sock: PathBuf,
    console: PathBuf,
    pcap: PathBuf,
    qmp: PathBuf,
    mem: Option<PathBuf>,
    switch: Option<Switch>,
    launched: Instant,
    _dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(m) = &self.mem {
            let _ = std::fs::remove_file(m);
        }
    }
}

impl Vm {
    fn boot(cfg: &BootConfig, with_nic: bool) -> Vm {
        let nic = if with_nic { Nic::Dump } else { Nic::None };
        Vm::boot_with(
            cfg,
            BootOpts {
                nic,
                mem_file: false,
            },
        )
    }

    fn boot_with(cfg: &BootConfig, opts: BootOpts) -> Vm {
        let dir = tempfile::Builder::new()
            .prefix("fvt-agent-")
            .tempdir()
            .unwrap();
        let initrd = build_initramfs(dir.path());
        let qmp = dir.path().join("qmp.sock");
        let mem = opts.mem_file.then(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            PathBuf::from(format!(
                "/dev/shm/fvt-agent-mem-{}-{nanos}",
                std::process::id()
            ))
        });
        let switch = (opts.nic == Nic::Switch).then(|| Switch::start(dir.path()));
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
        .arg("-M")
        .arg(if mem.is_some() {
            "q35,memory-backend=mem"
        } else {
            "q35"
        })
        .args([
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
        if let Some(m) = &mem {
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-file,id=mem,size=256M,mem-path={},share=on",
                    m.display()
                ))
                .args(["-device", "vmgenid,guid=auto"])
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        if let Some(sw) = &switch {
            cmd.arg("-netdev")
                .arg(format!(
                    "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    sw.qemu_path.display(),
                    sw.own_path.display()
                ))
                .args(["-device", "virtio-net-pci,netdev=n0,mac=02:fc:00:00:00:01"]);
        }
        if opts.nic == Nic::Dump {
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
            qmp,
            mem,
            switch,
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

// ---------------------------------------------------------------------------
// Mailbox handoff: QMP, the guest memory file, and a tiny L2 "switch".

/// MAC the in-test switch answers ARP with.
const SWITCH_MAC: [u8; 6] = [0x02, 0xfc, 0, 0, 0, 0xfe];
/// The guest's gateway and ack target; the switch answers ARP for it.
const GW: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 0, 1);
const ACK_PORT: u16 = 40000;

/// A UDP datagram the guest sent, as seen by the switch.
#[derive(Clone, Debug)]
struct Datagram {
    at: Instant,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    dport: u16,
    payload: Vec<u8>,
}

/// The other end of the guest NIC: a unix datagram socket that QEMU's
/// `-netdev dgram` exchanges raw Ethernet frames with. Answers ARP requests
/// for [`GW`] and records UDP datagrams, so the guest's ack really leaves the
/// guest and is checked by the test; no host network is involved.
struct Switch {
    own_path: PathBuf,
    qemu_path: PathBuf,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Datagram>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Switch {
    fn start(dir: &Path) -> Switch {
        let own_path = dir.join("switch.nic");
        let qemu_path = dir.join("qemu.nic");
        let sock = std::os::unix::net::UnixDatagram::bind(&own_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen2, stop2, to) = (seen.clone(), stop.clone(), qemu_path.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                let f = &buf[..n];
                if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] {
                    // ARP request for the gateway (not a gratuitous one).
                    if f[38..42] == GW.octets() && f[28..32] != f[38..42] {
                        let mut r = [0u8; 60];
                        r[0..6].copy_from_slice(&f[6..12]);
                        r[6..12].copy_from_slice(&SWITCH_MAC);
                        r[12..22].copy_from_slice(&f[12..22]);
                        r[21] = 2; // reply
                        r[22..28].copy_from_slice(&SWITCH_MAC);
                        r[28..32].copy_from_slice(&f[38..42]);
                        r[32..38].copy_from_slice(&f[22..28]);
                        r[38..42].copy_from_slice(&f[28..32]);
                        let _ = sock.send_to(&r, &to);
                    }
                } else if f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[23] == 17 {
                    let ihl = usize::from(f[14] & 0x0f) * 4;
                    let u = 14 + ihl;
                    if f.len() >= u + 8 {
                        let ulen = usize::from(u16::from_be_bytes([f[u + 4], f[u + 5]]));
                        let end = (u + ulen).min(f.len());
                        seen2.lock().unwrap().push(Datagram {
                            at: Instant::now(),
                            src: std::net::Ipv4Addr::new(f[26], f[27], f[28], f[29]),
                            dst: std::net::Ipv4Addr::new(f[30], f[31], f[32], f[33]),
                            dport: u16::from_be_bytes([f[u + 2], f[u + 3]]),
                            payload: f[u + 8..end].to_vec(),
                        });
                    }
                }
            }
        });
        Switch {
            own_path,
            qemu_path,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn datagrams(&self) -> Vec<Datagram> {
        self.seen.lock().unwrap().clone()
    }
}

/// Minimal blocking QMP client (one JSON object per line).
struct Qmp {
    rd: std::io::BufReader<std::os::unix::net::UnixStream>,
    wr: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        use std::io::BufRead;
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP connect: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut q = Qmp {
            rd: std::io::BufReader::new(s.try_clone().unwrap()),
            wr: s,
        };
        let mut greeting = String::new();
        q.rd.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "{greeting}");
        q.cmd("qmp_capabilities");
        q
    }

    fn cmd(&mut self, execute: &str) -> serde_json::Value {
        use std::io::{BufRead, Write};
        let req = serde_json::json!({ "execute": execute });
        writeln!(self.wr, "{req}").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.rd.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "QMP {execute}: {v}");
        }
    }
}

fn mem_file(vm: &Vm) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(vm.mem.as_ref().unwrap())
        .unwrap()
}

/// The mailbox page as it is in guest RAM (file offset == GPA on q35/256M).
fn read_page(vm: &Vm, gpa: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut p = vec![0u8; forkvm_mailbox::PAGE_SIZE];
    mem_file(vm).read_exact_at(&mut p, gpa).unwrap();
    p
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b
}

fn payload(mac: &str, ip: [u8; 4], hostname: &str) -> forkvm_mailbox::Payload {
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
        rng_seed: forkvm_mailbox::Seed(random32()),
        ack: forkvm_mailbox::AckTarget {
            ip: GW,
            port: ACK_PORT,
            key: forkvm_mailbox::AckKey(random32()),
        },
    }
}

/// What [`handoff`] writes into the page.
struct Patch<'a> {
    marker: [u8; 16],
    generation: u64,
    payload: &'a forkvm_mailbox::Payload,
    /// Flip one payload byte after patching (a forged/corrupt payload).
    corrupt: bool,
}

struct HandoffResult {
    /// `cont` → the page left WRITTEN (APPLIED or REJECTED), polled in the file.
    cont_to_outcome: Duration,
    cont_at: Instant,
    header: forkvm_mailbox::Header,
    client: AgentClient<Channel>,
}

/// One simulated fork handoff on the running VM: `stop`, patch the page in
/// the memory file (optionally corrupting one payload byte afterwards),
/// `cont`, then reconnect the agent channel as a host does after a restore
/// (the guest sees that as SIGIO), and wait until the page shows an outcome.
async fn handoff(
    vm: &Vm,
    qmp: &mut Qmp,
    client: AgentClient<Channel>,
    gpa: u64,
    patch: Patch<'_>,
) -> HandoffResult {
    use std::os::unix::fs::FileExt;
    let Patch {
        marker,
        generation,
        payload: p,
        corrupt,
    } = patch;
    qmp.cmd("stop");
    let current = read_page(vm, gpa);
    let prepared =
        forkvm_mailbox::prepare_patch(&current, &forkvm_mailbox::MarkerId(marker), generation, p)
            .unwrap();
    let f = mem_file(vm);
    for (off, bytes) in prepared.writes() {
        f.write_all_at(bytes, gpa + off as u64).unwrap();
    }
    if corrupt {
        let at = gpa + forkvm_mailbox::OFF_PAYLOAD as u64 + 3;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    }
    drop(client);
    qmp.cmd("cont");
    let cont_at = Instant::now();
    // Poll the state word on its own thread for sub-ms resolution.
    let mem = vm.mem.clone().unwrap();
    let poller = std::thread::spawn(move || {
        let f = std::fs::File::open(mem).unwrap();
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
    });
    let client = connect_unix(&vm.sock).await.unwrap();
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

/// Health, retrying once on a fresh connection (see docs/agent.md).
async fn health(vm: &Vm, c: &mut AgentClient<Channel>) -> forkvm_proto::agent::HealthResponse {
    match c.health(HealthRequest {}).await {
        Ok(h) => h.into_inner(),
        Err(_) => {
            *c = connect_unix(&vm.sock).await.unwrap();
            c.health(HealthRequest {}).await.unwrap().into_inner()
        }
    }
}

/// Waits for the agent to re-arm: Health reports a marker other than `old`;
/// checks the page in guest RAM carries it, EMPTY, at the same GPA.
async fn wait_rearm(vm: &Vm, c: &mut AgentClient<Channel>, old: &[u8], gpa: u64) -> [u8; 16] {
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

fn wake_sources(console: &str) -> Vec<String> {
    console
        .lines()
        .filter(|l| l.contains("mailbox payload seen"))
        .filter_map(|l| l.split("wake=").nth(1))
        .map(|w| w.split_whitespace().next().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "boots a VM; run crates/agent/scripts/vm-test.sh"]
async fn mailbox_handoff_in_vm() {
    use forkvm_mailbox::MailboxState;
    let cfg = boot_cfg(
        BTreeMap::new(),
        Some(BootNetwork {
            interface: "eth0".into(),
            mac: String::new(),
            ipv4: "10.0.0.2".into(),
            prefix_len: 24,
            gateway: GW.to_string(),
            dns: vec![],
        }),
    );
    let mut vm = Vm::boot_with(
        &cfg,
        BootOpts {
            nic: Nic::Switch,
            mem_file: true,
        },
    );
    let (mut c, boot_to_health) = vm.first_health().await;
    println!(
        "boot-to-Health (mem file): {:.0} ms",
        boot_to_health.as_secs_f64() * 1e3
    );
    let mut qmp = Qmp::connect(&vm.qmp);

    // Armed at start: Health reports marker + GPA, and the page at that GPA
    // of the RAM file is an EMPTY mailbox with that marker.
    let h = health(&vm, &mut c).await;
    assert_eq!(h.mailbox_marker.len(), 16, "{h:?}");
    let gpa = h.mailbox_gpa;
    assert!(gpa > 0 && gpa % 4096 == 0 && gpa < 256 << 20, "{gpa:#x}");
    assert_eq!(
        (
            h.mailbox_applied,
            h.mailbox_rejected,
            h.mailbox_applied_generation
        ),
        (0, 0, 0)
    );
    let marker: [u8; 16] = h.mailbox_marker.as_slice().try_into().unwrap();
    let hdr =
        forkvm_mailbox::verify_marker(&read_page(&vm, gpa), &forkvm_mailbox::MarkerId(marker))
            .unwrap();
    assert_eq!(hdr.state, MailboxState::Empty);
    // Exec forks children; the page must not move (MADV_DONTFORK).
    for _ in 0..3 {
        assert_eq!(exec(&mut c, &["true"]).await.exit_code, 0);
    }
    assert_eq!(health(&vm, &mut c).await.mailbox_gpa, gpa);

    // 1. A valid payload: applied, acked from the new address, re-armed.
    let gen1 = 0x1111_2222_3333_4444;
    let p1 = payload("02:fc:00:00:00:10", [10, 0, 0, 77], "fvt-mbox-one");
    let r = handoff(
        &vm,
        &mut qmp,
        c,
        gpa,
        Patch {
            marker,
            generation: gen1,
            payload: &p1,
            corrupt: false,
        },
    )
    .await;
    let mut c = r.client;
    assert_eq!(
        r.header.state,
        MailboxState::Applied,
        "{:?}\n{}",
        r.header,
        vm.console()
    );
    let g = r.header.guest;
    assert_eq!((g.outcome_generation, g.reject_code), (gen1, 0), "{g:?}");
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
    // The authenticated ack arrives from the new address, all six sends.
    let sw = vm.switch.as_ref().unwrap();
    let acks = |sw: &Switch| -> Vec<Datagram> {
        sw.datagrams()
            .into_iter()
            .filter(|d| d.dport == ACK_PORT && d.dst == GW)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while acks(sw).len() < 6 {
        assert!(
            Instant::now() < deadline,
            "acks {:?}\n{}",
            acks(sw),
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = acks(sw);
    for d in &got {
        assert_eq!(d.src, p1.ipv4);
        forkvm_mailbox::ack_verify(&d.payload, &p1.ack.key, gen1, p1.mac, p1.ipv4).unwrap();
    }
    let ack_times: Vec<String> = got
        .iter()
        .map(|d| format!("{:.0}", (d.at - r.cont_at).as_secs_f64() * 1e3))
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
            gen1,
            p1.mac,
            p1.ipv4
        )
        .is_err()
    );
    // The identity really changed.
    let ip_addr = exec(&mut c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert!(
        out(&ip_addr).contains("inet 10.0.0.77/24"),
        "{}",
        out(&ip_addr)
    );
    assert!(!out(&ip_addr).contains("10.0.0.2/"), "{}", out(&ip_addr));
    let link = exec(&mut c, &["ip", "link", "show", "eth0"]).await;
    assert!(
        out(&link).contains("link/ether 02:fc:00:00:00:10"),
        "{}",
        out(&link)
    );
    let route = exec(&mut c, &["ip", "route"]).await;
    assert!(
        out(&route).contains("default via 10.0.0.1 dev eth0"),
        "{}",
        out(&route)
    );
    // Clock stepped to the host time carried in the payload.
    let date = exec(&mut c, &["date", "+%s"]).await;
    let guest_s: u64 = out(&date).trim().parse().unwrap();
    let host_s = p1.host_time_unix_ns / 1_000_000_000;
    assert!(
        (host_s..host_s + 60).contains(&guest_s),
        "{guest_s} vs {host_s}"
    );
    let h = health(&vm, &mut c).await;
    assert_eq!(h.hostname, "fvt-mbox-one");
    assert_eq!(
        (
            h.mailbox_applied,
            h.mailbox_rejected,
            h.mailbox_applied_generation
        ),
        (1, 0, gen1)
    );
    let t_rearm = Instant::now();
    let marker2 = wait_rearm(&vm, &mut c, &marker, gpa).await;
    assert_ne!(marker2, marker);
    println!(
        "re-arm seen {:.0} ms after cont",
        (t_rearm.elapsed() + (t_rearm - r.cont_at)).as_secs_f64() * 1e3
    );

    // 2. The same generation again (new marker, other address): ignored,
    // marked REJECTED (code 100), network unchanged.
    let p2 = payload("02:fc:00:00:00:20", [10, 0, 0, 88], "fvt-mbox-two");
    let r = handoff(
        &vm,
        &mut qmp,
        c,
        gpa,
        Patch {
            marker: marker2,
            generation: gen1,
            payload: &p2,
            corrupt: false,
        },
    )
    .await;
    let mut c = r.client;
    assert_eq!(r.header.state, MailboxState::Rejected, "{:?}", r.header);
    assert_eq!(r.header.guest.reject_code, 100);
    assert_eq!(r.header.guest.outcome_generation, gen1);
    let ip_addr = exec(&mut c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert!(
        out(&ip_addr).contains("inet 10.0.0.77/24"),
        "{}",
        out(&ip_addr)
    );
    assert!(!out(&ip_addr).contains("10.0.0.88"), "{}", out(&ip_addr));
    let h = health(&vm, &mut c).await;
    assert_eq!(
        (
            h.mailbox_applied,
            h.mailbox_rejected,
            h.mailbox_applied_generation
        ),
        (1, 1, gen1)
    );
    println!(
        "handoff 2 (duplicate generation): cont -> REJECTED {:.1} ms",
        r.cont_to_outcome.as_secs_f64() * 1e3
    );
    let marker3 = wait_rearm(&vm, &mut c, &marker2, gpa).await;

    // 3. A forged payload (one payload byte flipped after patching): REJECTED
    // with PayloadCrc, network unchanged, no ack.
    let gen3 = 0x5555;
    let p3 = payload("02:fc:00:00:00:30", [10, 0, 0, 99], "fvt-mbox-three");
    let acks_before = acks(vm.switch.as_ref().unwrap()).len();
    let r = handoff(
        &vm,
        &mut qmp,
        c,
        gpa,
        Patch {
            marker: marker3,
            generation: gen3,
            payload: &p3,
            corrupt: true,
        },
    )
    .await;
    let mut c = r.client;
    assert_eq!(r.header.state, MailboxState::Rejected, "{:?}", r.header);
    assert_eq!(r.header.guest.reject_code, 11, "PayloadCrc");
    assert_eq!(r.header.guest.outcome_generation, gen3);
    let ip_addr = exec(&mut c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert!(
        out(&ip_addr).contains("inet 10.0.0.77/24"),
        "{}",
        out(&ip_addr)
    );
    let link = exec(&mut c, &["ip", "link", "show", "eth0"]).await;
    assert!(
        out(&link).contains("link/ether 02:fc:00:00:00:10"),
        "{}",
        out(&link)
    );
    let h = health(&vm, &mut c).await;
    assert_eq!(
        (
            h.mailbox_applied,
            h.mailbox_rejected,
            h.mailbox_applied_generation
        ),
        (1, 2, gen1)
    );
    assert_eq!(
        acks(vm.switch.as_ref().unwrap()).len(),
        acks_before,
        "ack after a rejection"
    );
    println!(
        "handoff 3 (forged): cont -> REJECTED {:.1} ms",
        r.cont_to_outcome.as_secs_f64() * 1e3
    );
    let marker4 = wait_rearm(&vm, &mut c, &marker3, gpa).await;

    // 4. A second valid handoff on the re-armed page, for a second timing.
    let gen4 = 0x6666;
    let p4 = payload("02:fc:00:00:00:40", [10, 0, 0, 44], "fvt-mbox-four");
    let r = handoff(
        &vm,
        &mut qmp,
        c,
        gpa,
        Patch {
            marker: marker4,
            generation: gen4,
            payload: &p4,
            corrupt: false,
        },
    )
    .await;
    let mut c = r.client;
    assert_eq!(r.header.state, MailboxState::Applied, "{:?}", r.header);
    println!(
        "handoff 4: cont -> page APPLIED {:.1} ms; guest signal_seen -> applied {} us",
        r.cont_to_outcome.as_secs_f64() * 1e3,
        r.header.guest.applied_us
    );
    let ip_addr = exec(&mut c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert!(
        out(&ip_addr).contains("inet 10.0.0.44/24"),
        "{}",
        out(&ip_addr)
    );
    let h = health(&vm, &mut c).await;
    assert_eq!(
        (
            h.mailbox_applied,
            h.mailbox_rejected,
            h.mailbox_applied_generation
        ),
        (2, 2, gen4)
    );
    println!("wake sources: {:?}", wake_sources(&vm.console()));
    for l in vm.console().lines().filter(|l| l.contains("mailbox")) {
        println!("  console: {l}");
    }
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "boots a VM; run crates/agent/scripts/vm-test.sh"]
async fn mailbox_disabled_by_boot_env() {
    use forkvm_mailbox::MailboxState;
    let cfg = boot_cfg(
        BTreeMap::from([("FORKVM_AGENT_DISABLE_MAILBOX".into(), "1".into())]),
        Some(BootNetwork {
            interface: "eth0".into(),
            mac: String::new(),
            ipv4: "10.0.0.2".into(),
            prefix_len: 24,
            gateway: GW.to_string(),
            dns: vec![],
        }),
    );
    let mut vm = Vm::boot_with(
        &cfg,
        BootOpts {
            nic: Nic::Switch,
            mem_file: true,
        },
    );
    let (mut c, _) = vm.first_health().await;
    let mut qmp = Qmp::connect(&vm.qmp);
    // Still armed and reported.
    let h = health(&vm, &mut c).await;
    assert_eq!(h.mailbox_marker.len(), 16, "{h:?}");
    let gpa = h.mailbox_gpa;
    let marker: [u8; 16] = h.mailbox_marker.as_slice().try_into().unwrap();
    use std::os::unix::fs::FileExt;
    qmp.cmd("stop");
    let p = payload("02:fc:00:00:00:10", [10, 0, 0, 77], "fvt-mbox-off");
    let prepared = forkvm_mailbox::prepare_patch(
        &read_page(&vm, gpa),
        &forkvm_mailbox::MarkerId(marker),
        7,
        &p,
    )
    .unwrap();
    let f = mem_file(&vm);
    for (off, bytes) in prepared.writes() {
        f.write_all_at(bytes, gpa + off as u64).unwrap();
    }
    drop(c);
    qmp.cmd("cont");
    let mut c = connect_unix(&vm.sock).await.unwrap();
    // The watcher saw the payload and said it will not apply it...
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vm.console().contains("apply is disabled; ignoring") {
        assert!(Instant::now() < deadline, "{}", vm.console());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...so the page stays WRITTEN and the network unchanged.
    let hdr = forkvm_mailbox::read_header(&read_page(&vm, gpa)).unwrap();
    assert_eq!(hdr.state, MailboxState::Written);
    let ip_addr = exec(&mut c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    assert!(
        out(&ip_addr).contains("inet 10.0.0.2/24"),
        "{}",
        out(&ip_addr)
    );
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
