//! The QEMU command line of a [`VmSpec`]: checked values, one q35 machine
//! layout for every boot and restore (device state only loads into the same
//! layout), and QEMU's option syntax escaped.

use std::ffi::OsString;
use std::path::Path;

use crate::disk::{DISK_IMAGE_DRIVE, DISK_RW_DRIVE};
use crate::error::VmmError;
use crate::launch::SANDBOX;
use crate::process::qemu_name;
use crate::qemu::AGENT_PORT_NAME;
use crate::{Accel, DiskRole, NetBackend, VmSpec};

/// Unix socket paths longer than this don't fit `sockaddr_un.sun_path`.
const MAX_SOCKET_PATH: usize = 107;
// Fixed PCI slots on pcie.0 so a restore with the same device set matches the
// saved one regardless of which optional devices are present.
const NET_PCI_ADDR: &str = "0x2";
/// The fd numbers QEMU finds what the daemon opened for it at
/// (`crate::fds`): it reopens files through `/proc/self/fd/N`, which needs
/// no search permission on the daemon's directories.
pub(crate) const TAP_FD: i32 = 3;
pub(crate) const QMP_FD: i32 = 4;
pub(crate) const AGENT_FD: i32 = 5;
pub(crate) const MEM_FD: i32 = 6;
pub(crate) const CONSOLE_FD: i32 = 7;
pub(crate) const KERNEL_FD: i32 = 8;
pub(crate) const INITRD_FD: i32 = 9;
pub(crate) const IMAGE_DISK_FD: i32 = 10;
pub(crate) const BOOT_CONFIG_FD: i32 = 11;
const SERIAL_PCI_ADDR: &str = "0x3";
const IMAGE_DISK_PCI_ADDR: &str = "0x4";
const RW_DISK_PCI_ADDR: &str = "0x5";

pub(crate) fn invalid(msg: impl Into<String>) -> VmmError {
    VmmError::InvalidSpec(msg.into())
}

/// A path as a QEMU option value: absolute, UTF-8, commas doubled (QEMU's
/// option syntax escapes `,` as `,,`).
fn opt_path(what: &str, p: &Path) -> Result<String, VmmError> {
    if !p.is_absolute() {
        return Err(invalid(format!(
            "{what} must be an absolute path: {}",
            p.display()
        )));
    }
    let s = p
        .to_str()
        .ok_or_else(|| invalid(format!("{what} is not UTF-8: {}", p.display())))?;
    Ok(s.replace(',', ",,"))
}

fn socket_path(what: &str, p: &Path) -> Result<String, VmmError> {
    if p.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(invalid(format!(
            "{what} is longer than {MAX_SOCKET_PATH} bytes: {}",
            p.display()
        )));
    }
    opt_path(what, p)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `/proc/self/fd/<fd>`: how QEMU reopens a file the daemon passed.
fn fd_path(fd: i32) -> String {
    format!("/proc/self/fd/{fd}")
}

/// The spec's paths are absolute and UTF-8, sockets fit `sun_path` (the
/// daemon opens and binds them: QEMU gets fds).
fn check_paths(spec: &VmSpec) -> Result<(), VmmError> {
    opt_path("mem_path", &spec.mem_path)?;
    opt_path("console_log", &spec.console_log)?;
    socket_path("agent_socket", &spec.agent_socket)?;
    socket_path("qmp_socket", &spec.qmp_socket)?;
    opt_path("pidfile", &spec.pidfile)?;
    opt_path("kernel", &spec.kernel)?;
    opt_path("initrd", &spec.initrd)?;
    Ok(())
}

fn validate_spec(spec: &VmSpec) -> Result<(), VmmError> {
    if !valid_id(&spec.id) {
        return Err(invalid(format!(
            "id {:?} must be 1-64 chars of [A-Za-z0-9._-]",
            spec.id
        )));
    }
    if spec.vcpus == 0 || spec.vcpus > 255 {
        return Err(invalid(format!(
            "vcpus {} out of range 1..=255",
            spec.vcpus
        )));
    }
    if spec.memory_mb < 32 {
        return Err(invalid(format!("memory_mb {} below 32", spec.memory_mb)));
    }
    for role in [DiskRole::Image, DiskRole::Rw] {
        if spec.disks.iter().filter(|d| d.role == role).count() > 1 {
            return Err(invalid(format!("more than one {role:?} disk")));
        }
    }
    if let Some(net) = &spec.net {
        let (NetBackend::Tap(tap) | NetBackend::TakeOver { tap, .. }) = &net.backend;
        if tap.is_empty() || tap.len() > 15 || tap.contains([',', '/', ' ']) {
            return Err(invalid(format!("bad tap name {tap:?}")));
        }
        if !valid_mac(&net.mac) {
            return Err(invalid(format!("bad mac {:?}", net.mac)));
        }
    }
    Ok(())
}

/// fw_cfg name of the boot config (forkvm-proto's `boot::FW_CFG_NAME`; this
/// crate stays free of the agent protocol).
const FW_CFG_NAME: &str = "opt/forkvm/boot";

/// The full QEMU argument list for `spec` (without the binary).
pub fn build_qemu_args(spec: &VmSpec) -> Result<Vec<OsString>, VmmError> {
    validate_spec(spec)?;
    check_paths(spec)?;
    let mut a: Vec<String> = Vec::with_capacity(64);
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    machine_args(spec, &mut push);
    device_args(spec, &mut push);
    for d in &spec.disks {
        let path = match d.role {
            DiskRole::Image => fd_path(IMAGE_DISK_FD),
            // By path: QEMU names its top in query-block and opens the
            // backing chain by the paths in the qcow2 headers.
            DiskRole::Rw => opt_path("disk", &d.path)?,
        };
        disk_args(d.role, &path, &mut push);
    }
    // A listening socket the daemon bound (QEMU needs no directory).
    push(&[
        "-chardev",
        &format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off"),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    if let Some(cfg) = &spec.boot_config {
        // Checked here, opened by the daemon and passed as an fd.
        opt_path("boot_config", cfg)?;
        push(&[
            "-fw_cfg",
            &format!("name={FW_CFG_NAME},file={}", fd_path(BOOT_CONFIG_FD)),
        ]);
    }
    if spec.incoming {
        push(&["-S", "-incoming", "defer"]);
    }
    push(&["-sandbox", SANDBOX]);
    // No -daemonize: it is incompatible with the sandbox (crate::launch).
    // No -pidfile: the daemon writes it (QEMU may not write its directory).
    Ok(a.into_iter().map(OsString::from).collect())
}

/// Name, machine, CPU, memory backend and kernel.
fn machine_args(spec: &VmSpec, push: &mut impl FnMut(&[&str])) {
    let name = qemu_name(&spec.id);
    push(&["-name", &format!("{name},process={name}")]);
    push(&["-M", "q35,memory-backend=mem"]);
    match spec.accel {
        // tb-size caps the translation cache per VMM (QEMU's default is
        // 1 GiB here): a fork's working set is ~14 MiB and nothing flushed at
        // 64 MiB, while code churn grew a default-sized cache past 500 MiB
        // (docs/vmm.md has the measurement).
        Accel::Tcg => push(&["-accel", "tcg,thread=multi,tb-size=64", "-cpu", "max"]),
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
    }
    push(&["-m", &format!("{}M", spec.memory_mb)]);
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
            spec.memory_mb,
            fd_path(MEM_FD),
            if spec.mem_share { "on" } else { "off" }
        ),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    // -kernel/-initrd/-append values are taken verbatim (no option parsing).
    push(&[
        "-kernel",
        &fd_path(KERNEL_FD),
        "-initrd",
        &fd_path(INITRD_FD),
        "-append",
        &spec.cmdline,
    ]);
}

/// vmgenid, the serial console, the agent's virtio-serial port and the NIC,
/// at fixed PCI addresses (device state must load into the same layout).
fn device_args(spec: &VmSpec, push: &mut impl FnMut(&[&str])) {
    push(&["-device", "vmgenid,id=vmgenid0,guid=auto"]);
    push(&[
        "-chardev",
        &format!("file,id=con,path={},append=on", fd_path(CONSOLE_FD)),
    ]);
    push(&["-serial", "chardev:con"]);
    push(&[
        "-device",
        &format!("virtio-serial-pci,id=vser0,bus=pcie.0,addr={SERIAL_PCI_ADDR}"),
    ]);
    push(&[
        "-chardev",
        &format!("socket,id=agent,fd={AGENT_FD},server=on,wait=off"),
    ]);
    push(&[
        "-device",
        &format!("virtserialport,id=agent0,bus=vser0.0,nr=1,chardev=agent,name={AGENT_PORT_NAME}"),
    ]);
    if let Some(net) = &spec.net {
        // The daemon opens the TAP (or takes it over from the running
        // QEMU): QEMU needs neither /dev/net/tun nor CAP_NET_ADMIN.
        push(&["-netdev", &format!("tap,id=net0,fd={TAP_FD}")]);
        // romfile= (empty): no PXE ROM; we boot with -kernel and it would
        // only add state to every snapshot.
        push(&[
            "-device",
            &format!(
                "virtio-net-pci,id=nic0,netdev=net0,mac={},bus=pcie.0,addr={NET_PCI_ADDR},romfile=",
                net.mac
            ),
        ]);
    }
}

/// A virtio-blk disk at its role's fixed slot; the guest finds it by serial.
fn disk_args(role: DiskRole, path: &str, push: &mut impl FnMut(&[&str])) {
    let (drive, format, slot) = match role {
        DiskRole::Image => (DISK_IMAGE_DRIVE, "raw,read-only=on", IMAGE_DISK_PCI_ADDR),
        DiskRole::Rw => (DISK_RW_DRIVE, "qcow2", RW_DISK_PCI_ADDR),
    };
    push(&[
        "-drive",
        &format!("if=none,id={drive},file={path},format={format}"),
    ]);
    push(&[
        "-device",
        &format!(
            "virtio-blk-pci,id=blk-{drive},drive={drive},serial={},bus=pcie.0,addr={slot}",
            role.serial()
        ),
    ]);
}

/// A valid spec for unit tests of other modules.
#[cfg(test)]
pub(crate) fn test_spec() -> VmSpec {
    tests::spec()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> VmSpec {
        VmSpec {
            id: "vm-1".into(),
            vcpus: 1,
            memory_mb: 256,
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd".into(),
            cmdline: "console=ttyS0 quiet".into(),
            boot_config: None,
            mem_path: "/dev/shm/a,b/mem".into(),
            mem_share: true,
            net: None,
            disks: vec![],
            agent_socket: "/run/x/agent.sock".into(),
            qmp_socket: "/run/x/qmp.sock".into(),
            console_log: "/run/x/console.log".into(),
            pidfile: "/run/x/pid".into(),
            accel: Accel::Tcg,
            incoming: false,
            user: None,
            jail: None,
        }
    }

    fn joined(s: &VmSpec) -> String {
        build_qemu_args(s)
            .map(|a| {
                a.iter()
                    .map(|x| x.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|e| format!("ERR {e}"))
    }

    #[test]
    fn args_basic() {
        let j = joined(&spec());
        assert!(j.contains("-name forkvm-vm-1,process=forkvm-vm-1"), "{j}");
        assert!(
            j.contains("mem-path=/proc/self/fd/6,share=on"),
            "memory by fd: {j}"
        );
        assert!(
            j.contains("-kernel /proc/self/fd/8 -initrd /proc/self/fd/9"),
            "{j}"
        );
        assert!(j.contains("socket,id=qmp,fd=4,server=on,wait=off"), "{j}");
        assert!(j.contains("socket,id=agent,fd=5,server=on,wait=off"), "{j}");
        assert!(
            j.contains("file,id=con,path=/proc/self/fd/7,append=on"),
            "{j}"
        );
        assert!(
            j.contains("-accel tcg,thread=multi,tb-size=64 -cpu max"),
            "{j}"
        );
        assert!(j.contains("-append console=ttyS0 quiet"), "{j}");
        assert!(j.contains("name=forkvm.agent"), "{j}");
        assert!(
            j.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{j}"
        );
        assert!(!j.contains("-daemonize"), "{j}");
        assert!(!j.contains("-pidfile"), "{j}");
        assert!(!j.contains("-incoming"), "{j}");
        assert!(!j.contains("virtio-net"), "{j}");
        assert!(!j.contains("virtio-blk"), "{j}");
        assert!(!j.contains("-fw_cfg"), "{j}");
    }

    #[test]
    fn the_boot_config_goes_by_fw_cfg_file() {
        let mut s = spec();
        s.boot_config = Some("/run/x,y/boot.json".into());
        let j = joined(&s);
        assert!(
            j.contains("-fw_cfg name=opt/forkvm/boot,file=/proc/self/fd/11"),
            "{j}"
        );
        s.boot_config = Some("relative".into());
        assert!(build_qemu_args(&s).is_err());
    }

    #[test]
    fn args_disks() {
        let mut s = spec();
        s.disks = vec![
            crate::DiskSpec {
                role: DiskRole::Rw,
                path: "/d/top,1.qcow2".into(),
            },
            crate::DiskSpec {
                role: DiskRole::Image,
                path: "/i/rootfs.erofs".into(),
            },
        ];
        let j = joined(&s);
        assert!(
            j.contains("-drive if=none,id=disk-rw,file=/d/top,,1.qcow2,format=qcow2 "),
            "{j}"
        );
        assert!(
            j.contains(
                "virtio-blk-pci,id=blk-disk-rw,drive=disk-rw,serial=forkvm-rw,bus=pcie.0,addr=0x5"
            ),
            "{j}"
        );
        assert!(
            j.contains("file=/proc/self/fd/10,format=raw,read-only=on"),
            "{j}"
        );
        assert!(j.contains("serial=forkvm-image,bus=pcie.0,addr=0x4"), "{j}");
        s.disks.push(s.disks[0].clone());
        assert!(matches!(build_qemu_args(&s), Err(VmmError::InvalidSpec(_))));
        s.disks = vec![crate::DiskSpec {
            role: DiskRole::Rw,
            path: "rel.qcow2".into(),
        }];
        assert!(matches!(build_qemu_args(&s), Err(VmmError::InvalidSpec(_))));
    }

    #[test]
    fn args_variants() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        s.incoming = true;
        s.mem_share = false;
        s.net = Some(crate::NetSpec {
            backend: NetBackend::Tap("fvtap0".into()),
            mac: "02:00:00:aa:bb:cc".into(),
        });
        let j = joined(&s);
        assert!(j.contains("-accel kvm -cpu host"), "{j}");
        assert!(j.contains("-S -incoming defer"), "{j}");
        let mut t = s.clone();
        t.net = Some(crate::NetSpec {
            backend: NetBackend::TakeOver {
                tap: "fvtap0".into(),
                from_pid: 42,
            },
            mac: "02:00:00:aa:bb:cc".into(),
        });
        assert!(
            joined(&t).contains("-netdev tap,id=net0,fd=3 "),
            "{}",
            joined(&t)
        );
        assert!(j.contains("share=off"), "{j}");
        assert!(j.contains("-netdev tap,id=net0,fd=3 "), "{j}");
        assert!(
            j.contains("mac=02:00:00:aa:bb:cc,bus=pcie.0,addr=0x2"),
            "{j}"
        );
    }

    type Mutation = Box<dyn Fn(&mut VmSpec)>;

    #[test]
    fn args_rejects_bad_specs() {
        let bad: Vec<Mutation> = vec![
            Box::new(|s| s.id = "a,b".into()),
            Box::new(|s| s.id = String::new()),
            Box::new(|s| s.vcpus = 0),
            Box::new(|s| s.memory_mb = 1),
            Box::new(|s| s.qmp_socket = "relative.sock".into()),
            Box::new(|s| s.qmp_socket = format!("/{}", "x".repeat(120)).into()),
            Box::new(|s| {
                s.net = Some(crate::NetSpec {
                    backend: NetBackend::Tap("t0".into()),
                    mac: "zz:00:00:00:00:00".into(),
                })
            }),
            Box::new(|s| {
                s.net = Some(crate::NetSpec {
                    backend: NetBackend::Tap("t0,x".into()),
                    mac: "02:00:00:00:00:01".into(),
                })
            }),
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut s = spec();
            f(&mut s);
            assert!(
                matches!(build_qemu_args(&s), Err(VmmError::InvalidSpec(_))),
                "case {i} accepted: {}",
                joined(&s)
            );
        }
    }
}
