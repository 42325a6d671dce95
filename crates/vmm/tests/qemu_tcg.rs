//! Boots real QEMU (TCG) guests: start/pause/resume/stop, adoption, start
//! errors, save/restore (including copy-on-write forks), and the accel probe.
//!
//! Needs qemu-system-x86_64, busybox-static and a PVH vmlinux
//! (FORKVM_TEST_KERNEL; scripts/test.sh points it at the image cache). No network device
//! is attached, so nothing here touches networking.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkvm_vmm::{
    Accel, DiskRole, DiskSpec, Hypervisor, QemuHypervisor, RunState, VmHandle, VmSpec, VmUser,
    VmmError, detect_accel_with, probe_boot,
};

const MARKER: &str = "FORKVM-TEST-READY";
const BOOT_DEADLINE: Duration = Duration::from_secs(60);
/// The group of the test VMs' users.
const TEST_VM_GID: u32 = 899_000;

/// The unprivileged user this test process's VMs run as.
fn test_user() -> VmUser {
    VmUser {
        uid: TEST_VM_GID + 1 + std::process::id() % 60_000,
        gid: TEST_VM_GID,
    }
}

fn kernel() -> PathBuf {
    let k = std::env::var_os("FORKVM_TEST_KERNEL")
        .map(PathBuf::from)
        .expect("FORKVM_TEST_KERNEL: a PVH vmlinux (scripts/test.sh sets it)");
    assert!(k.exists(), "test kernel {} missing", k.display());
    k
}

/// An initramfs whose /init prints MARKER, then "tick N" every 200 ms forever.
fn build_initrd(dir: &Path) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let init = format!(
        "#!/bin/busybox sh\necho {MARKER}\ni=0\nwhile true; do i=$((i+1)); echo \"tick $i\"; /bin/busybox sleep 0.2; done\n"
    );
    let mut c = forkvm_cpio::CpioWriter::new(Vec::new());
    c.char_dev("dev/console", 0o600, 5, 1).unwrap();
    c.file("bin/busybox", 0o755, &busybox).unwrap();
    c.file("init", 0o755, init.as_bytes()).unwrap();
    let p = dir.join("initrd.cpio");
    std::fs::write(&p, c.finish().unwrap().0).expect("write initrd");
    p
}

struct Env {
    dir: tempfile::TempDir,
    initrd: PathBuf,
}

impl Env {
    fn new() -> Self {
        // /dev/shm: the RAM file belongs on tmpfs, and short socket paths.
        let dir = tempfile::Builder::new()
            .prefix("fvmt")
            .tempdir_in("/dev/shm")
            .expect("tempdir");
        // Traversable (not listable): QEMU, unprivileged, opens a qcow2
        // chain by path; everything else it gets as fds.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
        let initrd = build_initrd(dir.path());
        Env { dir, initrd }
    }

    fn spec(&self, id: &str, mem_file: &str, tag: &str) -> VmSpec {
        let d = self.dir.path();
        VmSpec {
            id: id.to_string(),
            vcpus: 1,
            memory_mb: 256,
            kernel: kernel(),
            initrd: self.initrd.clone(),
            cmdline: "console=ttyS0 quiet panic=-1".into(),
            boot_config: None,
            mem_path: d.join(mem_file),
            mem_share: true,
            net: None,
            disks: vec![],
            agent_socket: d.join(format!("{tag}.agent.sock")),
            qmp_socket: d.join(format!("{tag}.qmp.sock")),
            console_log: d.join(format!("{tag}.console.log")),
            pidfile: d.join(format!("{tag}.pid")),
            accel: Accel::Tcg,
            incoming: false,
            user: Some(test_user()),
            jail: None,
        }
    }
}

fn console(spec: &VmSpec) -> String {
    std::fs::read(&spec.console_log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn last_tick(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("tick ")
                .and_then(|n| n.trim().parse().ok())
        })
        .next_back()
}

/// Polls the console log until `pred` holds; returns the elapsed time.
async fn wait_console(spec: &VmSpec, what: &str, pred: impl Fn(&str) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if pred(&console(spec)) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < BOOT_DEADLINE,
            "timed out waiting for {what}; console:\n{}",
            console(spec)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The state letter of a `/proc/…/stat` file (`R`, `S`, `T`, `Z`, …).
fn proc_state(stat: impl AsRef<std::path::Path>) -> Option<char> {
    let s = std::fs::read_to_string(stat).ok()?;
    s.rsplit_once(')')
        .and_then(|(_, r)| r.trim_start().chars().next())
}

fn assert_gone(hv: &QemuHypervisor, h: &VmHandle) {
    assert!(!hv.is_alive(&h.id, h.pid));
    // Gone, or a zombie not yet reaped (by tokio while the starter runs,
    // else by init); either way nothing runs any more.
    let state = proc_state(format!("/proc/{}/stat", h.pid));
    assert!(
        matches!(state, None | Some('Z')),
        "process {} left over (state {state:?})",
        h.pid
    );
    assert!(!h.qmp_socket.exists(), "qmp socket left over");
    assert!(!h.agent_socket.exists(), "agent socket left over");
    assert!(!h.pidfile.exists(), "pidfile left over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_pause_resume_stop() {
    let env = Env::new();
    let hv = QemuHypervisor::new("qemu-system-x86_64");
    let spec = env.spec("lifecycle", "mem", "a");

    let t0 = Instant::now();
    let h = hv.start(&spec).await.expect("start");
    let t_start = t0.elapsed();
    assert!(hv.is_alive("lifecycle", h.pid));
    assert!(!hv.is_alive("lifecycl", h.pid), "id prefix must not match");
    assert_eq!(hv.status(&h).await.expect("status"), RunState::Running);
    let t_marker = wait_console(&spec, "marker", |c| c.contains(MARKER)).await;
    wait_console(&spec, "first tick", |c| last_tick(c).is_some()).await;
    eprintln!(
        "TIMING start(spawn->QMP up)={:.1} ms, marker after start={:.1} ms",
        ms(t_start),
        ms(t_marker)
    );
    // QEMU inherits nothing of the caller's environment.
    let environ = std::fs::read(format!("/proc/{}/environ", h.pid)).expect("environ");
    assert_eq!(
        environ,
        format!("PATH={}\0", forkvm_vmm::QEMU_PATH).into_bytes(),
        "QEMU's environment"
    );
    // QEMU runs under its seccomp filter (-sandbox), in a session of its own.
    let status = std::fs::read_to_string(format!("/proc/{}/status", h.pid)).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
        "QEMU is not in seccomp filter mode:\n{status}"
    );
    // ... as the unprivileged VM user, every id of it, no other group
    // than the VM group, and no way to gain privileges.
    let u = test_user();
    let ids = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let uid = u.uid.to_string();
    let gid = u.gid.to_string();
    assert_eq!(ids("Uid:"), [uid.as_str(); 4].join(" "), "{status}");
    assert_eq!(ids("Gid:"), [gid.as_str(); 4].join(" "), "{status}");
    assert_eq!(ids("Groups:"), gid, "{status}");
    assert_eq!(ids("NoNewPrivs:"), "1", "{status}");
    assert_eq!(ids("CapEff:"), "0000000000000000", "{status}");
    // What it writes is its own, 0600.
    for p in [&spec.mem_path, &spec.console_log] {
        let m = std::fs::metadata(p).expect("stat");
        assert_eq!(
            (
                std::os::unix::fs::MetadataExt::uid(&m),
                std::os::unix::fs::MetadataExt::mode(&m) & 0o777
            ),
            (u.uid, 0o600),
            "{}",
            p.display()
        );
    }
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(h.pid as i32))).expect("getsid");
    assert_eq!(sid.as_raw(), h.pid as i32, "QEMU leads its own session");
    // Its resource limits: files up to the memory size plus an allowance,
    // a bounded fd table, no core dumps.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", h.pid)).expect("limits");
    let limit = |name: &str| -> Vec<String> {
        let l = limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{limits}"));
        l[name.len()..]
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let fsize = (256u64 << 20) + (32 << 20) + (64 << 20);
    assert_eq!(
        limit("Max file size")[..2],
        [fsize.to_string(), fsize.to_string()]
    );
    let nofile = forkvm_vmm::QEMU_NOFILE.to_string();
    assert_eq!(limit("Max open files")[..2], [nofile.clone(), nofile]);
    assert_eq!(limit("Max core file size")[..2], ["0", "0"]);
    // The RAM file is created by QEMU at the requested size.
    let mem_len = std::fs::metadata(&spec.mem_path).expect("mem file").len();
    assert_eq!(mem_len, 256 << 20);

    // Re-finding after a "daemon restart", and refusing a double start.
    assert_eq!(hv.adopt(&spec), Some(h.clone()));
    match hv.start(&spec).await {
        Err(VmmError::AlreadyRunning { pid, .. }) => assert_eq!(pid, h.pid),
        other => panic!("second start must fail with AlreadyRunning, got {other:?}"),
    }

    hv.pause(&h).await.expect("pause");
    assert_eq!(hv.status(&h).await.expect("status"), RunState::Paused);
    let before = last_tick(&console(&spec));
    // Paused vCPUs must not make progress; there's no event for "nothing
    // happened", so watch for a fixed window (5+ tick periods).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        last_tick(&console(&spec)),
        before,
        "guest ticked while paused"
    );

    hv.resume(&h).await.expect("resume");
    assert_eq!(hv.status(&h).await.expect("status"), RunState::Running);
    wait_console(&spec, "tick after resume", |c| last_tick(c) > before).await;

    // A saved source can carry on running (fork from a running VM).
    let state = env.dir.path().join("live.state");
    hv.save_state(&h, &state).await.expect("save");
    assert_eq!(hv.status(&h).await.expect("status"), RunState::PostMigrate);
    let before = last_tick(&console(&spec));
    hv.resume(&h).await.expect("resume after save");
    assert_eq!(hv.status(&h).await.expect("status"), RunState::Running);
    wait_console(&spec, "tick after save+resume", |c| last_tick(c) > before).await;

    // The trait is object-safe: the daemon can hold `Arc<dyn Hypervisor>`.
    let dyn_hv: std::sync::Arc<dyn Hypervisor> = std::sync::Arc::new(hv.clone());
    assert_eq!(dyn_hv.status(&h).await.expect("status"), RunState::Running);

    // Held: every thread of the process stopped (it runs no code, so it
    // writes no memory); released, it runs and answers again.
    hv.hold(&h, true).await.expect("hold");
    let states: Vec<Option<char>> = std::fs::read_dir(format!("/proc/{}/task", h.pid))
        .expect("tasks")
        .flatten()
        .map(|t| proc_state(t.path().join("stat")))
        .collect();
    assert!(
        states.len() > 1 && states.iter().all(|s| *s == Some('T')),
        "{states:?}"
    );
    hv.hold(&h, false).await.expect("release");
    assert_eq!(hv.status(&h).await.expect("status"), RunState::Running);

    let t0 = Instant::now();
    hv.stop(&h, Duration::from_secs(5)).await.expect("stop");
    eprintln!("TIMING stop={:.1} ms", ms(t0.elapsed()));
    assert_gone(&hv, &h);
    assert_eq!(hv.adopt(&spec), None);
    // Stopping a gone VM is fine; controlling it is not.
    hv.stop(&h, Duration::from_secs(1))
        .await
        .expect("second stop");
    assert!(matches!(
        hv.status(&h).await,
        Err(VmmError::NotRunning { .. })
    ));

    // Same paths again: sockets and pidfile are reusable. Without a VM
    // user (`--vm-user off`) QEMU runs as the caller, on the same fds.
    let spec = VmSpec { user: None, ..spec };
    let h2 = hv.start(&spec).await.expect("restart with same paths");
    assert_ne!(h2.pid, h.pid);
    assert_eq!(hv.status(&h2).await.expect("status"), RunState::Running);
    let status = std::fs::read_to_string(format!("/proc/{}/status", h2.pid)).expect("status");
    let uid = nix::unistd::getuid().as_raw().to_string();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["Uid:", uid.as_str()])),
        "{status}"
    );
    hv.stop(&h2, Duration::from_secs(5)).await.expect("stop 2");
    assert_gone(&hv, &h2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_errors_are_reported() {
    let env = Env::new();
    let hv = QemuHypervisor::new("qemu-system-x86_64");

    let mut spec = env.spec("bad1", "mem-bad1", "bad1");
    spec.kernel = env.dir.path().join("no-such-kernel");
    assert!(matches!(
        hv.start(&spec).await,
        Err(VmmError::InvalidSpec(_))
    ));

    // A kernel file QEMU can't load: QEMU itself fails and its stderr is quoted.
    let mut spec = env.spec("bad2", "mem-bad2", "bad2");
    spec.kernel = env.dir.path().join("garbage-kernel");
    std::fs::write(&spec.kernel, b"not a kernel").expect("write");
    match hv.start(&spec).await {
        Err(VmmError::QemuExited { stderr_tail, .. }) => {
            assert!(
                stderr_tail.contains("kernel"),
                "qemu's reason missing: {stderr_tail}"
            );
            eprintln!("qemu error as reported: {stderr_tail}");
        }
        other => panic!("expected QemuExited, got {other:?}"),
    }
    assert!(!spec.pidfile.exists());

    let hv = QemuHypervisor::new("/nonexistent/qemu");
    let spec = env.spec("bad3", "mem-bad3", "bad3");
    assert!(matches!(hv.start(&spec).await, Err(VmmError::Spawn { .. })));
}

fn file_digest(p: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let data = std::fs::read(p).expect("read");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_restore_and_cow_forks() {
    let env = Env::new();
    let hv = QemuHypervisor::new("qemu-system-x86_64");
    let src = env.spec("src", "base.mem", "src");
    let state = env.dir.path().join("state.bin");

    let h = hv.start(&src).await.expect("start");
    wait_console(&src, "ticks", |c| last_tick(c).is_some_and(|n| n >= 2)).await;

    let t0 = Instant::now();
    hv.save_state(&h, &state).await.expect("save");
    let t_save = t0.elapsed();
    let state_len = std::fs::metadata(&state).expect("state").len();
    assert!(state_len > 1024, "state file only {state_len} bytes");
    assert_eq!(hv.status(&h).await.expect("status"), RunState::PostMigrate);
    let saved_tick = last_tick(&console(&src)).expect("tick");
    hv.stop(&h, Duration::from_secs(5)).await.expect("stop src");
    assert_gone(&hv, &h);
    eprintln!(
        "TIMING save={:.1} ms state={} KiB (last tick before save: {saved_tick})",
        ms(t_save),
        state_len / 1024
    );

    // Two copy-on-write forks of the immutable base, running side by side.
    let base_digest = file_digest(&src.mem_path);
    let mut forks = Vec::new();
    for i in 0..2 {
        let mut spec = env.spec(&format!("fork{i}"), "base.mem", &format!("f{i}"));
        spec.mem_share = false;
        spec.incoming = true;
        let (h, t) = restore(&hv, &spec, &state).await;
        forks.push((spec, h, t));
    }
    for (spec, h, _) in &forks {
        assert_eq!(hv.status(h).await.expect("status"), RunState::Running);
        wait_console(spec, "fork ticks", |c| {
            last_tick(c).is_some_and(|n| n > saved_tick)
        })
        .await;
        let text = console(spec);
        assert!(
            !text.contains(MARKER),
            "fork rebooted instead of resuming:\n{text}"
        );
    }
    for (_, h, _) in &forks {
        hv.stop(h, Duration::from_secs(5)).await.expect("stop fork");
        assert_gone(&hv, h);
    }
    assert_eq!(
        file_digest(&src.mem_path),
        base_digest,
        "a share=off fork wrote into the base"
    );

    // Restore in place (share=on on the same RAM file), as after standby.
    let mut spec = env.spec("src", "base.mem", "r");
    spec.incoming = true;
    let (h, t) = restore(&hv, &spec, &state).await;
    wait_console(&spec, "restored ticks", |c| {
        last_tick(c).is_some_and(|n| n > saved_tick)
    })
    .await;
    assert!(!console(&spec).contains(MARKER));
    hv.stop(&h, Duration::from_secs(5))
        .await
        .expect("stop restored");
    assert_gone(&hv, &h);

    for (i, (_, _, t)) in forks.iter().enumerate() {
        eprintln!("TIMING fork{i} (share=off): {t}");
    }
    eprintln!("TIMING in-place restore (share=on): {t}");
}

struct RestoreTimes {
    start: Duration,
    load: Duration,
    resume: Duration,
    first_tick: Duration,
}

impl std::fmt::Display for RestoreTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "start(-incoming, QMP up)={:.1} ms load={:.1} ms resume={:.1} ms total={:.1} ms; first new console tick {:.0} ms after resume",
            ms(self.start),
            ms(self.load),
            ms(self.resume),
            ms(self.start + self.load + self.resume),
            ms(self.first_tick)
        )
    }
}

async fn restore(hv: &QemuHypervisor, spec: &VmSpec, state: &Path) -> (VmHandle, RestoreTimes) {
    let t0 = Instant::now();
    let h = hv.start(spec).await.expect("start incoming");
    let start = t0.elapsed();
    assert_eq!(hv.status(&h).await.expect("status"), RunState::InMigrate);
    let t1 = Instant::now();
    hv.load_state(&h, state).await.expect("load");
    let load = t1.elapsed();
    assert_eq!(hv.status(&h).await.expect("status"), RunState::Paused);
    let t2 = Instant::now();
    hv.resume(&h).await.expect("resume");
    let resume = t2.elapsed();
    let first_tick = wait_console(spec, "tick after restore", |c| last_tick(c).is_some()).await;
    (
        h,
        RestoreTimes {
            start,
            load,
            resume,
            first_tick,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_into_a_running_vm_is_refused() {
    let env = Env::new();
    let hv = QemuHypervisor::new("qemu-system-x86_64");
    let spec = env.spec("noinc", "mem", "n");
    let h = hv.start(&spec).await.expect("start");
    let state = env.dir.path().join("none.bin");
    std::fs::write(&state, b"x").expect("write");
    assert!(matches!(
        hv.load_state(&h, &state).await,
        Err(VmmError::Migration(_))
    ));
    assert!(
        hv.is_alive(&h.id, h.pid),
        "refused load must not kill the vm"
    );
    hv.stop(&h, Duration::from_secs(5)).await.expect("stop");
    assert_gone(&hv, &h);
}

#[test]
fn accel_probe_and_cache() {
    let env = Env::new();
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    let k = kernel();
    // The probe logic itself, under TCG where it must succeed.
    let t0 = Instant::now();
    assert!(
        probe_boot(qemu, &k, &env.initrd, Accel::Tcg, Duration::from_secs(60)),
        "tcg probe boot did not reach userspace"
    );
    eprintln!("TIMING tcg probe boot={:.0} ms", ms(t0.elapsed()));

    // Real detection on this host, then served from the cache.
    let cache = env.dir.path().join("accel.json");
    let t0 = Instant::now();
    let first = detect_accel_with(
        None,
        Path::new("/dev/kvm"),
        qemu,
        &k,
        &env.initrd,
        Some(&cache),
        Duration::from_secs(10),
    );
    let t_first = t0.elapsed();
    assert!(
        cache.exists() || !Path::new("/dev/kvm").exists(),
        "probe result not cached"
    );
    let t0 = Instant::now();
    let second = detect_accel_with(
        None,
        Path::new("/dev/kvm"),
        qemu,
        &k,
        &env.initrd,
        Some(&cache),
        Duration::from_secs(10),
    );
    assert_eq!(first, second);
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "cached answer took {:?}",
        t0.elapsed()
    );
    eprintln!(
        "accel on this host: {first:?} (probe {:.0} ms, cached {:.1} ms)",
        ms(t_first),
        ms(t0.elapsed())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_fails_with_qemu_reason() {
    let env = Env::new();
    let hv = QemuHypervisor::new("qemu-system-x86_64");
    let mut spec = env.spec("corrupt", "mem", "c");
    spec.incoming = true;
    let state = env.dir.path().join("garbage.bin");
    std::fs::write(&state, vec![0x5a; 4096]).expect("write");
    let h = hv.start(&spec).await.expect("start incoming");
    match hv.load_state(&h, &state).await {
        Err(VmmError::Migration(msg)) => {
            assert!(
                msg.contains("Not a migration stream"),
                "reason missing: {msg}"
            );
        }
        other => panic!("expected Migration error, got {other:?}"),
    }
    // QEMU 7.2 exits when a load fails; stop still cleans up.
    hv.stop(&h, Duration::from_secs(2)).await.expect("stop");
    assert_gone(&hv, &h);
}

/// The backing chain of a qcow2 file, top first (`qemu-img info -U`: the
/// files may be in use).
fn backing_chain(top: &Path) -> Vec<PathBuf> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(top)
        .output()
        .expect("qemu-img info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|i| PathBuf::from(i["filename"].as_str().expect("filename")))
        .collect()
}

fn with_rw_disk(mut spec: VmSpec, top: &Path) -> VmSpec {
    spec.disks = vec![DiskSpec {
        role: DiskRole::Rw,
        path: top.to_path_buf(),
    }];
    spec
}

/// The writable disk's layers: frozen while paused and at a live
/// migration's switchover, a second VM opening a frozen layer while the
/// first runs on, and flattening the chain back onto its base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_layers_freeze_migrate_flatten() {
    let env = Env::new();
    let d = env.dir.path();
    let hv = QemuHypervisor::new("qemu-system-x86_64");
    let raw = d.join("template.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(64 << 20))
        .expect("template");
    let top = |n: &str| d.join(format!("{n}.qcow2"));
    hv.create_overlay(&top("l0"), &raw, "raw", 64 << 20)
        .await
        .expect("overlay");
    assert!(
        hv.create_overlay(&top("l0"), &raw, "raw", 64 << 20)
            .await
            .is_err(),
        "an existing overlay is never overwritten"
    );
    let src = with_rw_disk(env.spec("dsrc", "dsrc.mem", "dsrc"), &top("l0"));
    let h = hv.start(&src).await.expect("start");
    assert_eq!(hv.disk_top(&h).await.expect("top"), Some(top("l0")));

    hv.pause(&h).await.expect("pause");
    hv.freeze_disk(&h, &top("l1")).await.expect("freeze");
    hv.resume(&h).await.expect("resume");
    assert_eq!(hv.disk_top(&h).await.expect("top"), Some(top("l1")));

    // A live migration that freezes the disk at its switchover.
    hv.create_overlay(&top("scratch"), &raw, "raw", 64 << 20)
        .await
        .expect("overlay");
    let mut helper = with_rw_disk(env.spec("dhelp", "dhelp.mem", "dhelp"), &top("scratch"));
    helper.incoming = true;
    let hh = hv.start(&helper).await.expect("helper");
    hv.migrate(&h, &hh, Some(&top("l2")))
        .await
        .expect("migrate with freeze");
    hv.resume(&h).await.expect("resume after migration");
    assert_eq!(hv.status(&h).await.expect("status"), RunState::Running);
    assert_eq!(
        backing_chain(&top("l2")),
        vec![top("l2"), top("l1"), top("l0"), raw.clone()]
    );
    hv.stop(&hh, Duration::from_secs(2))
        .await
        .expect("stop helper");

    // Another VM on a frozen layer while the source runs on.
    hv.create_overlay(&top("fork"), &top("l1"), "qcow2", 64 << 20)
        .await
        .expect("fork overlay");
    let fork = with_rw_disk(env.spec("dfork", "dfork.mem", "dfork"), &top("fork"));
    let hf = hv
        .start(&fork)
        .await
        .expect("a frozen layer opens beside its source");

    hv.flatten_disk(&h, &raw).await.expect("flatten");
    assert_eq!(backing_chain(&top("l2")), vec![top("l2"), raw.clone()]);
    assert_eq!(
        backing_chain(&top("fork")),
        vec![top("fork"), top("l1"), top("l0"), raw.clone()],
        "flattening one VM's chain leaves the layers others use alone"
    );
    for x in [&h, &hf] {
        hv.stop(x, Duration::from_secs(5)).await.expect("stop");
    }
}

/// The cgroup directory of `pid` in the hierarchy whose controllers
/// include `ctrl` (v1) or the v2 one (`ctrl` empty).
fn cgroup_of(pid: u32, ctrl: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
            let hit = if ctrl.is_empty() {
                ctrls.is_empty()
            } else {
                ctrls.split(',').any(|c| c == ctrl)
            };
            hit.then(|| path.to_string())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_vm_runs_in_a_cgroup_of_its_own_with_limits() {
    let env = Env::new();
    let root = forkvm_vmm::CgroupRoot::detect().expect("cgroups of this process");
    let hv = QemuHypervisor::new("qemu-system-x86_64").with_cgroups(root.clone());
    let spec = env.spec("cgvm", "mem", "g");
    let h = hv.start(&spec).await.expect("start");
    let limits = forkvm_vmm::limits_for(&spec);
    let dirs: Vec<PathBuf> = match root.layout() {
        forkvm_vmm::CgroupLayout::V1 { dirs } => {
            let mine = std::process::id();
            let mut out = vec![];
            // The layout's dirs are in this order (forkvm_cgroup::CONTROLLERS).
            for (i, (ctrl, file, want)) in [
                ("memory", "memory.limit_in_bytes", limits.memory_bytes),
                ("cpu", "cpu.cfs_quota_us", limits.cpu_quota_us),
                ("pids", "pids.max", limits.pids_max),
            ]
            .into_iter()
            .enumerate()
            {
                let ours = cgroup_of(mine, ctrl).expect("our cgroup");
                let its = cgroup_of(h.pid, ctrl).expect("its cgroup");
                // Beneath ours, named after the VM and its pidfile.
                assert_eq!(
                    its,
                    format!("{}/forkvm-cgvm-g", ours.trim_end_matches('/')),
                    "{ctrl}"
                );
                let d = dirs[i].join("forkvm-cgvm-g");
                let v = std::fs::read_to_string(d.join(file)).expect("limit");
                assert_eq!(v.trim(), want.to_string(), "{file}");
                out.push(d);
            }
            out
        }
        forkvm_vmm::CgroupLayout::V2 { dir } => {
            let d = dir.join("forkvm-cgvm-g");
            let v = std::fs::read_to_string(d.join("pids.max")).expect("pids.max");
            assert_eq!(v.trim(), limits.pids_max.to_string());
            vec![d]
        }
    };
    assert_eq!(
        limits.memory_bytes,
        (256 << 20) + forkvm_vmm::QEMU_MEMORY_OVERHEAD
    );
    assert_eq!(limits.cpu_quota_us, 200_000);
    hv.stop(&h, Duration::from_secs(5)).await.expect("stop");
    assert_gone(&hv, &h);
    for d in &dirs {
        assert!(!d.exists(), "{} left over", d.display());
    }
    // A start that fails leaves no cgroup either.
    let mut bad = env.spec("cgbad", "mem-bad", "b");
    bad.kernel = env.dir.path().join("garbage");
    std::fs::write(&bad.kernel, b"no kernel").expect("write");
    assert!(hv.start(&bad).await.is_err());
    for d in &dirs {
        let leftover = d.with_file_name("forkvm-cgbad-b");
        assert!(!leftover.exists(), "{} left over", leftover.display());
    }
}

/// A jailed QEMU boots, freezes its disk, and sees only the system files,
/// a few devices and its layer directory: not `/etc`, `/root`, nor the
/// files beside its layers (another VM's), whatever their modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_vm_sees_only_what_it_needs() {
    let env = Env::new();
    let d = env.dir.path();
    let hv = QemuHypervisor::new("qemu-system-x86_64");
    let (jail, layers) = (d.join("jail"), d.join("layers"));
    std::fs::create_dir(&jail).expect("jail dir");
    std::fs::create_dir(&layers).expect("layers");
    std::fs::set_permissions(&layers, std::os::unix::fs::PermissionsExt::from_mode(0o711))
        .expect("chmod");
    let raw = layers.join("template.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(64 << 20))
        .expect("template");
    std::fs::set_permissions(&raw, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let l0 = layers.join("l0.qcow2");
    hv.create_overlay(&l0, &raw, "raw", 64 << 20)
        .await
        .expect("overlay");
    let mut spec = with_rw_disk(env.spec("jailed", "jailed.mem", "jailed"), &l0);
    spec.jail = Some(jail.clone());
    // The daemon's umask: the jail's directories must not inherit it.
    // SAFETY: umask only changes this test process's mask.
    unsafe { libc::umask(0o077) };
    let h = hv.start(&spec).await.expect("start in its jail");
    wait_console(&spec, "marker", |c| c.contains(MARKER)).await;
    hv.pause(&h).await.expect("pause");
    hv.freeze_disk(&h, &layers.join("l1.qcow2"))
        .await
        .expect("freeze inside the jail");
    hv.resume(&h).await.expect("resume");

    let root = PathBuf::from(format!("/proc/{}/root", h.pid));
    let seen = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p)).exists();
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .expect("its root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    eprintln!("jailed QEMU's /: {top:?}");
    for name in &top {
        assert!(
            [
                "bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "sys",
                "usr"
            ]
            .contains(&name.as_str()),
            "unexpected /{name} in the jail: {top:?}"
        );
    }
    assert!(seen(Path::new("/usr/bin")) && seen(&l0) && seen(&layers.join("l1.qcow2")));
    assert!(seen(Path::new("/etc/ld.so.cache")) && seen(Path::new("/dev/null")));
    for hidden in [
        Path::new("/etc/passwd"),
        Path::new("/root"),
        Path::new("/tmp"),
        Path::new("/dev/shm/"),
        &env.initrd,
        &spec.console_log,
        &d.join("jailed.mem"),
    ] {
        let inside = root.join(hidden.strip_prefix("/").unwrap_or(hidden));
        assert!(
            !inside.exists() || inside == root.join("dev/shm/"),
            "{} is visible to the jailed QEMU",
            hidden.display()
        );
    }
    assert!(!seen(&env.initrd), "a file beside the layers");
    hv.stop(&h, Duration::from_secs(2)).await.expect("stop");
    // The jail's mounts lived in QEMU's namespace only.
    assert_eq!(std::fs::read_dir(&jail).expect("jail dir").count(), 0);
}
