//! The guest under test: the initramfs (the static agent as `/init`,
//! busybox, the virtio modules), QEMU launched in a private network
//! namespace, the agent channel, and small helpers for what the tests run in
//! the guest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkvm_proto::agent::agent_client::AgentClient;
use forkvm_proto::agent::{ExecRequest, ExecResponse, HealthRequest};
use forkvm_proto::{BootConfig, BootNetwork, connect_unix};
use tonic::transport::Channel;

use crate::switch::Switch;

/// The agent channel every test drives.
pub type Client = AgentClient<Channel>;

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
    "sh", "ip", "ls", "cat", "echo", "httpd", "sleep", "date", "true", "ps", "sync",
];

/// The disk modules (`disk_modules` of kernel.json: name and path, in load
/// order) the agent loads on StartWorkload; empty for a kernel extraction
/// made before they were packed.
pub fn disk_modules() -> Vec<String> {
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(kdir().join("kernel.json")).expect("kernel.json in FORKVM_TEST_KERNEL_DIR"),
    )
    .expect("kernel.json");
    meta["disk_modules"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m[1].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

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
    let disk = disk_modules();
    for m in &disk {
        let ko = std::fs::read(kdir().join("modules").join(m)).unwrap();
        w.file(&format!("{mdir}/{m}"), 0o644, &ko).unwrap();
    }
    w.file(
        "etc/forkvm/modules-disk",
        0o644,
        (disk.join("\n") + "\n").as_bytes(),
    )
    .unwrap();
    w.finish().unwrap();
    img
}

/// How the guest NIC is attached.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub enum Nic {
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
pub struct BootOpts {
    pub nic: Nic,
    /// Guest RAM in a shared memory file on /dev/shm, `-device vmgenid` and a
    /// QMP socket: what a forkvm host uses for snapshots and mailbox patches.
    pub mem_file: bool,
    /// More QEMU arguments (disks).
    pub qemu_args: Vec<String>,
}

/// A running guest; killed and reaped on drop.
pub struct Vm {
    child: Child,
    /// The agent's virtio-serial port, as a unix socket.
    pub sock: PathBuf,
    console: PathBuf,
    /// Frames the guest sent ([`Nic::Dump`] only).
    pub pcap: PathBuf,
    /// QMP socket (`mem_file` only).
    pub qmp: PathBuf,
    /// Guest RAM file (`mem_file` only).
    pub mem: Option<PathBuf>,
    /// The other end of the NIC ([`Nic::Switch`] only).
    pub switch: Option<Switch>,
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
    pub fn boot(cfg: &BootConfig, with_nic: bool) -> Vm {
        let nic = if with_nic { Nic::Dump } else { Nic::None };
        Vm::boot_with(
            cfg,
            BootOpts {
                nic,
                ..Default::default()
            },
        )
    }

    pub fn boot_with(cfg: &BootConfig, opts: BootOpts) -> Vm {
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
        cmd.args(&opts.qemu_args);
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

    /// Kills QEMU and waits for it (the guest gets no shutdown: sync first).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Connects and waits for the first successful Health; returns the client
    /// and the time from QEMU launch to that answer.
    pub async fn first_health(&mut self) -> (Client, Duration) {
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

    /// [`Vm::first_health`], printing the boot time as `{label}: N ms`.
    /// A connection the agent has answered on, after the host side went
    /// away and came back (a stop/cont, a new client): short tries on fresh
    /// connections, as the daemon's agent calls make. A connection whose
    /// first bytes the agent read in the old session's last moments is
    /// abandoned instead of waited on for ever.
    pub async fn reconnect(&self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "agent never answered a new connection:\n{}",
                self.console()
            );
            if let Ok(mut c) = connect_unix(&self.sock).await
                && let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(5), c.health(HealthRequest {})).await
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn first_health_logged(&mut self, label: &str) -> Client {
        let (c, boot_to_health) = self.first_health().await;
        println!("{label}: {:.0} ms", boot_to_health.as_secs_f64() * 1e3);
        c
    }
}

pub fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub async fn exec(c: &mut Client, argv: &[&str]) -> ExecResponse {
    c.exec(req(argv)).await.unwrap().into_inner()
}

pub fn out(r: &ExecResponse) -> String {
    String::from_utf8_lossy(&r.stdout).into_owned()
}

/// The frames of a pcap written by QEMU filter-dump (24-byte file header,
/// then a 16-byte record header before each frame).
fn pcap_frames(pcap: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(pcap).unwrap_or_default();
    let mut res = Vec::new();
    let mut off = 24;
    while off + 16 <= b.len() {
        let caplen = u32::from_le_bytes(b[off + 8..off + 12].try_into().unwrap()) as usize;
        res.push(b[off + 16..(off + 16 + caplen).min(b.len())].to_vec());
        off += 16 + caplen;
    }
    res
}

/// MAC/IPv4 sender pairs of ARP frames in a pcap written by QEMU filter-dump.
pub fn arp_senders(pcap: &Path) -> Vec<([u8; 6], [u8; 4])> {
    pcap_frames(pcap)
        .iter()
        .filter(|f| f.len() >= 42 && f[12..14] == [0x08, 0x06])
        .map(|f| (f[22..28].try_into().unwrap(), f[28..32].try_into().unwrap()))
        .collect()
}

/// (ethertype, source MAC) of every frame in the pcap, for diagnostics.
pub fn frames(pcap: &Path) -> Vec<(u16, [u8; 6])> {
    pcap_frames(pcap)
        .iter()
        .filter(|f| f.len() >= 14)
        .map(|f| {
            (
                u16::from_be_bytes([f[12], f[13]]),
                f[6..12].try_into().unwrap(),
            )
        })
        .collect()
}

pub fn boot_cfg(env: BTreeMap<String, String>, network: Option<BootNetwork>) -> BootConfig {
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

/// `eth0` with `ipv4`/24 via `gateway`, keeping the device's MAC.
pub fn eth0(ipv4: &str, gateway: &str, dns: &[&str]) -> BootNetwork {
    BootNetwork {
        interface: "eth0".into(),
        mac: String::new(),
        ipv4: ipv4.into(),
        prefix_len: 24,
        gateway: gateway.into(),
        dns: dns.iter().map(|d| d.to_string()).collect(),
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `why()` once
/// `timeout` has passed.
pub async fn wait_until(
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    why: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{}", why());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// What the tests check in the guest, each the output of one `ip` command
// with the assertion every test makes on it; the output is returned for
// further checks.

/// `ip -4 addr show dev eth0` lists `inet {cidr}`.
pub async fn eth0_has_inet(c: &mut Client, cidr: &str) -> String {
    let r = exec(c, &["ip", "-4", "addr", "show", "dev", "eth0"]).await;
    let o = out(&r);
    assert!(o.contains(&format!("inet {cidr}")), "{o}");
    o
}

/// `ip link show eth0` shows `link/ether {mac}`.
pub async fn eth0_has_mac(c: &mut Client, mac: &str) -> String {
    let r = exec(c, &["ip", "link", "show", "eth0"]).await;
    let o = out(&r);
    assert!(o.contains(&format!("link/ether {mac}")), "{o}");
    o
}

/// `ip route` has `default via {gateway} dev eth0`.
pub async fn default_route_via(c: &mut Client, gateway: &str) {
    let r = exec(c, &["ip", "route"]).await;
    let o = out(&r);
    assert!(
        o.contains(&format!("default via {gateway} dev eth0")),
        "{o}"
    );
}
