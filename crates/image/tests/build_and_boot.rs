//! Builds the real image from Debian's kernel package (apt-get download, the product
//! path) and boots it once under QEMU TCG with a test `/init` script that loads the
//! modules listed in `/etc/forkvm/modules` and then those in `/etc/forkvm/modules-disk`
//! (which the agent loads when a workload starts). Skip with `FORKVM_TEST_IMAGE=0`.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use forkvm_image::{
    DISK_MODULES_LIST, ImageInputs, MODULES_LIST, NoProgress, build_default_image, list_images,
    load_image,
};

/// Stand-in for the agent: busybox sh script as /init (the real agent is another crate).
const TEST_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo FVT-INIT-START
v=$(cat /etc/forkvm/kernel-version)
for list in /etc/forkvm/modules /etc/forkvm/modules-disk; do
  while read -r m; do
    if insmod "/lib/modules/$v/$m"; then echo "FVT-LOADED $m"; else echo "FVT-FAILED $m"; fi
  done < $list
done
echo "FVT-NET $(ls /sys/class/net | tr '\n' ' ')"
echo "FVT-FS $(grep -oE 'erofs|ext4|overlay' /proc/filesystems | tr '\n' ' ')"
echo "FVT-DRIVERS $(ls /sys/bus/virtio/drivers | tr '\n' ' ')"
echo "FVT-APPLETS $(ls /bin | wc -l)"
echo FVT-DONE
poweroff -f
"#;

fn write_init(path: &Path, extra: &str) {
    std::fs::write(path, format!("{TEST_INIT}# {extra}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn builds_real_image_caches_it_and_boots_it() {
    if std::env::var("FORKVM_TEST_IMAGE").as_deref() == Ok("0") {
        eprintln!("skipped: FORKVM_TEST_IMAGE=0");
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("forkvm_image=info")
        .try_init();
    let data = tempfile::tempdir().unwrap();
    let agent = data.path().join("test-init.sh");
    write_init(&agent, "v1");
    let inputs = ImageInputs::new(data.path().join("data"), &agent);

    // A leftover from a "crashed" build must be swept, not listed or kept.
    std::fs::create_dir_all(inputs.data_dir.join("images/.build-default-crashed")).unwrap();
    let progress = Recorder::default();
    let t = Instant::now();
    let img = build_default_image(&inputs, &progress).expect("first build");
    let first_build = t.elapsed();
    eprintln!("first build (download + extract + initramfs): {first_build:?}");
    let stages = progress.stages.borrow().clone();
    eprintln!("stages: {stages:?}");
    assert!(
        stages
            .iter()
            .any(|s| s.starts_with("downloading linux-image-")),
        "{stages:?}"
    );
    assert!(
        stages.iter().any(|s| s == "extracting vmlinux"),
        "{stages:?}"
    );
    assert!(progress.finished.get());
    // Byte progress reached its total at least once (download or decompression).
    assert!(
        progress
            .bytes
            .borrow()
            .iter()
            .any(|&(d, t)| Some(d) == t && d > 0)
    );

    // Kernel: an uncompressed ELF of plausible size.
    let head = std::fs::read(&img.kernel).unwrap();
    assert!(head.starts_with(b"\x7fELF"), "vmlinux is not ELF");
    assert!(head.len() > 20 << 20, "vmlinux only {} bytes", head.len());
    assert!(
        img.kernel_version.starts_with("6."),
        "{}",
        img.kernel_version
    );
    assert!(img.kernel_package.starts_with("linux-image-"));
    // Modules: the virtio stack in dependency order (6.1 has them as modules; 6.12 only net).
    let names: Vec<String> = img
        .modules
        .iter()
        .map(|m| {
            m.rsplit('/')
                .next()
                .unwrap()
                .trim_end_matches(".ko")
                .to_string()
        })
        .collect();
    eprintln!("modules: {names:?}");
    assert!(names.iter().any(|n| n == "virtio_net"), "{names:?}");
    let pos = |n: &str| names.iter().position(|x| x == n);
    assert!(pos("failover") < pos("net_failover"));
    assert!(pos("net_failover") < pos("virtio_net"));
    if let (Some(r), Some(v), Some(p)) = (pos("virtio_ring"), pos("virtio"), pos("virtio_pci")) {
        assert!(r < v && v < p, "{names:?}");
    }

    // initramfs content, checked with Debian's cpio (scripts/setup.sh installs it).
    {
        let out = Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::fs::File::open(&img.initrd).unwrap())
            .output()
            .unwrap_or_else(|e| panic!("cannot run cpio ({e}): scripts/setup.sh installs it"));
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let entries: std::collections::BTreeSet<&str> = listing.lines().collect();
        for must in [
            "init",
            "bin/busybox",
            "bin/sh",
            "bin/[",
            "bin/ip",
            "dev/console",
            "proc",
            "sys",
            "tmp",
            "var/www",
            "etc/passwd",
            "etc/group",
            "etc/hostname",
            MODULES_LIST,
            DISK_MODULES_LIST,
        ] {
            assert!(entries.contains(must), "initramfs lacks {must}");
        }
        for m in &img.modules {
            let p = format!("lib/modules/{}/{m}", img.kernel_version);
            assert!(entries.contains(p.as_str()), "initramfs lacks {p}");
        }
    }

    // Cache hit: same inputs → same manifest, fast, from a fresh read of the manifest.
    let t = Instant::now();
    let again = build_default_image(&inputs, &NoProgress).unwrap();
    let hit = t.elapsed();
    eprintln!("cache hit: {hit:?}");
    assert_eq!(again, img);
    assert!(hit < Duration::from_secs(1), "cache hit took {hit:?}");
    assert_eq!(load_image(&inputs.data_dir, "default").unwrap(), img);
    assert_eq!(list_images(&inputs.data_dir).unwrap(), vec![img.clone()]);

    // Changed agent → new digest, rebuilt from the kernel cache (no second download).
    write_init(&agent, "v2");
    let t = Instant::now();
    let rebuilt = build_default_image(&inputs, &NoProgress).unwrap();
    eprintln!("rebuild with new agent: {:?}", t.elapsed());
    assert_ne!(rebuilt.inputs_digest, img.inputs_digest);
    assert_eq!(rebuilt.modules, img.modules);
    let debs: Vec<_> = walk(&inputs.data_dir.join("cache/kernel"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    let leftovers: Vec<_> = std::fs::read_dir(inputs.data_dir.join("images"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".build-"))
        .collect();
    assert!(leftovers.is_empty(), "temp dirs left: {leftovers:?}");

    boot(&rebuilt);
}

#[derive(Default)]
struct Recorder {
    stages: std::cell::RefCell<Vec<String>>,
    bytes: std::cell::RefCell<Vec<(u64, Option<u64>)>>,
    finished: std::cell::Cell<bool>,
}

impl forkvm_image::Progress for Recorder {
    fn stage(&self, name: &str) {
        self.stages.borrow_mut().push(name.to_string());
    }
    fn bytes(&self, done: u64, total: Option<u64>) {
        self.bytes.borrow_mut().push((done, total));
    }
    fn finish(&self) {
        self.finished.set(true);
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn boot(img: &forkvm_image::GuestImage) {
    let mut child = Command::new("qemu-system-x86_64")
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
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            // Devices for the drivers to bind to; the NIC has no backend, so nothing
            // touches host networking.
            "-device",
            "virtio-net-pci",
            "-device",
            "virtio-serial-pci",
            "-append",
            "console=ttyS0 loglevel=4 panic=-1",
        ])
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    let mut console = Vec::new();
    let mut done = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let end = line.contains("FVT-DONE");
                console.push(line);
                if end {
                    done = true;
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let boot_time = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    let text = console.join("\n");
    assert!(done, "guest did not finish within 90 s; console:\n{text}");
    eprintln!("guest ran its init to the end in {boot_time:?}");
    assert!(text.contains("FVT-INIT-START"), "{text}");
    assert!(
        !text.contains("FVT-FAILED"),
        "a module failed to load:\n{text}"
    );
    for m in &img.modules {
        assert!(
            text.contains(&format!("FVT-LOADED {m}")),
            "{m} not loaded:\n{text}"
        );
    }
    let line = |p: &str| {
        console
            .iter()
            .find(|l| l.starts_with(p))
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        line("FVT-NET").contains("eth0"),
        "no virtio NIC bound:\n{text}"
    );
    let drivers = line("FVT-DRIVERS");
    // virtio bus drivers register whether modular or builtin (6.1 and 6.12 alike).
    for d in ["virtio_net", "virtio_console", "virtio_blk"] {
        assert!(drivers.contains(d), "{d} driver missing: {drivers}");
    }
    // The disk modules register their filesystems (crc32c was found by
    // libcrc32c and ext4 without modprobe).
    let fs = line("FVT-FS");
    for f in ["erofs", "ext4", "overlay"] {
        assert!(fs.contains(f), "{f} filesystem missing: {fs}");
    }
    eprintln!("{}", line("FVT-APPLETS"));
}
