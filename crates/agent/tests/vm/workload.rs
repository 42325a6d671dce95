//! StartWorkload in a real guest: the host's two disks as forkvm attaches
//! them (an erofs image of a tiny rootfs, serial `forkvm-image`, read-only;
//! a qcow2 over a sparse ext4 template, serial `forkvm-rw`), the workload
//! writing into the writable layer as the image's user, and the data still
//! there when a second boot of the same qcow2 starts a workload reading it.
//! Exec with `image_root` runs in the image's root once it is mounted, and
//! is refused before.
//!
//! Needs mkfs.erofs (erofs-utils), mkfs.ext4 (e2fsprogs), qemu-img
//! (qemu-utils), and a kernel extraction with the disk modules.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use forkvm_proto::agent::workload_status::State;
use forkvm_proto::agent::{ExecResponse, HealthRequest, WorkloadSpec, WorkloadStatus, exec_output};

use crate::guest::{BootOpts, Client, Vm, boot_cfg, disk_modules, exec, out, req, wait_until};

/// The rootfs in the image: busybox, an `app` user (1000:1001) owning /srv.
fn build_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "srv", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for a in ["sh", "echo", "cat", "id", "pwd", "ls"] {
        symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/srv:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1001:\n").unwrap();
    std::os::unix::fs::chown(root.join("srv"), Some(1000), Some(1001)).unwrap();
    std::fs::set_permissions(root.join("srv"), std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The two disk files: (erofs image, qcow2 over an ext4 template).
fn build_disks(dir: &Path) -> (PathBuf, PathBuf) {
    let rootfs = build_rootfs(dir);
    let image = dir.join("image.erofs");
    run(Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(&rootfs));
    let template = dir.join("rw-template.ext4");
    std::fs::File::create(&template)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&template));
    let rw = dir.join("rw.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&template)
        .arg(&rw));
    (image, rw)
}

fn disk_args(image: &Path, rw: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!(
            "if=none,id=disk-image,file={},format=raw,read-only=on",
            image.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=disk-image,serial=forkvm-image".into(),
        "-drive".into(),
        format!("if=none,id=disk-rw,file={},format=qcow2", rw.display()),
        "-device".into(),
        "virtio-blk-pci,drive=disk-rw,serial=forkvm-rw".into(),
    ]
}

fn boot(image: &Path, rw: &Path) -> Vm {
    let cfg = boot_cfg(Default::default(), None);
    Vm::boot_with(
        &cfg,
        BootOpts {
            qemu_args: disk_args(image, rw),
            ..Default::default()
        },
    )
}

fn sh(script: &str, user: &str, working_dir: &str) -> WorkloadSpec {
    WorkloadSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["FVT=from-spec".into()],
        working_dir: working_dir.into(),
        user: user.into(),
        host_root: false,
    }
}

async fn workload(c: &mut Client) -> WorkloadStatus {
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    h.workload.unwrap_or_default()
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "boots a VM; run crates/agent/scripts/vm-test.sh"]
async fn workload_in_vm() {
    assert!(
        !disk_modules().is_empty(),
        "the kernel extraction in FORKVM_TEST_KERNEL_DIR has no disk modules; \
         rebuild it (scripts/setup.sh)"
    );
    let dir = tempfile::Builder::new()
        .prefix("fvt-workload-")
        .tempdir()
        .unwrap();
    let (image, rw) = build_disks(dir.path());

    let mut vm = boot(&image, &rw);
    let mut c = vm.first_health_logged("boot-to-Health (with disks)").await;
    assert_eq!(workload(&mut c).await.state, State::None as i32);
    let e = c.start_workload(WorkloadSpec::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // No image root before StartWorkload mounted it (a plain directory
    // there is not one either).
    let r = exec(&mut c, &["busybox", "mkdir", "-p", "/run/forkvm/root/bin"]).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    let e = c.exec(image_req(&["true"], "")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let e = c.exec_stream(image_req(&["true"], "")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    let spec = sh(
        "echo written-by-workload > data.txt; \
         echo FVT-WORKLOAD $(id -u):$(id -g) $(pwd) $FVT",
        "app",
        "/srv",
    );
    let t0 = std::time::Instant::now();
    let st = c.start_workload(spec.clone()).await.unwrap().into_inner();
    println!(
        "StartWorkload (modules, mounts, spawn): {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    assert!(st.started && st.pid > 0, "{st:?}");
    assert_eq!((st.uid, st.gid), (1000, 1001));
    let again = c.start_workload(spec.clone()).await.unwrap().into_inner();
    assert_eq!(again.pid, st.pid, "a repeated start must not start another");
    let mut other = spec.clone();
    other.argv[2] = "true".into();
    let e = c.start_workload(other).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    wait_until(
        Duration::from_secs(30),
        || {
            vm.console()
                .contains("FVT-WORKLOAD 1000:1001 /srv from-spec")
        },
        || format!("no workload marker on the console:\n{}", vm.console()),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let done = loop {
        let w = workload(&mut c).await;
        if w.state == State::Exited as i32 || std::time::Instant::now() > deadline {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (done.state, done.exit_code),
        (State::Exited as i32, 0),
        "{done:?}"
    );

    mounts_and_data_are_in_place(&mut c).await;
    exec_in_the_image_root(&mut c).await;
    let r = exec(&mut c, &["sync"]).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    drop(c);
    vm.stop();

    data_survives_a_new_boot(&image, &rw).await;
}

/// Exec runs in the agent's own root: the mounts and the file in the upper
/// layer, owned by the workload's user.
async fn mounts_and_data_are_in_place(c: &mut Client) {
    let r = exec(c, &["cat", "/proc/mounts"]).await;
    let mounts = out(&r);
    for want in [
        "/run/forkvm/image erofs ro",
        "/run/forkvm/rw ext4 rw",
        "overlay /run/forkvm/root overlay rw",
        "/run/forkvm/root/proc proc",
        "/run/forkvm/root/tmp tmpfs",
    ] {
        assert!(mounts.contains(want), "{want:?} not in\n{mounts}");
    }
    let r = exec(c, &["cat", "/run/forkvm/rw/upper/srv/data.txt"]).await;
    assert_eq!(out(&r), "written-by-workload\n", "{r:?}");
    let r = exec(c, &["ls", "-n", "/run/forkvm/rw/upper/srv/data.txt"]).await;
    assert!(out(&r).contains(" 1000 "), "{}", out(&r));
}

/// An Exec request in the image's root.
fn image_req(argv: &[&str], cwd: &str) -> forkvm_proto::agent::ExecRequest {
    let mut r = req(argv);
    r.image_root = true;
    r.cwd = cwd.into();
    r
}

async fn image_exec(c: &mut Client, argv: &[&str], cwd: &str) -> ExecResponse {
    c.exec(image_req(argv, cwd)).await.unwrap().into_inner()
}

/// Exec with image_root: the workload's file at its path in the image, the
/// image's own /etc and no /run/forkvm (chrooted), cwd inside the image, as
/// root although the workload ran as `app`; output streamed as well.
async fn exec_in_the_image_root(c: &mut Client) {
    let r = image_exec(c, &["cat", "/srv/data.txt"], "").await;
    assert_eq!(
        (r.exit_code, out(&r).as_str()),
        (0, "written-by-workload\n"),
        "{r:?}"
    );
    let r = image_exec(c, &["cat", "/etc/passwd"], "").await;
    assert!(out(&r).contains("app:x:1000:1001"), "{r:?}");
    let r = image_exec(c, &["ls", "/run/forkvm"], "").await;
    assert_ne!(
        r.exit_code, 0,
        "/run/forkvm seen from the image root: {r:?}"
    );
    let r = image_exec(c, &["sh", "-c", "echo $(id -u) $(pwd) $PATH"], "/srv").await;
    assert!(out(&r).starts_with("0 /srv /usr/local/sbin:"), "{r:?}");
    let r = image_exec(c, &["pwd"], "").await;
    assert_eq!(out(&r), "/\n", "{r:?}");
    let e = c
        .exec(image_req(&["no-such-program"], ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    // Writes land in the writable layer, visible from the agent's root.
    let r = image_exec(c, &["sh", "-c", "echo via-exec > /srv/exec.txt"], "").await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    let r = exec(c, &["cat", "/run/forkvm/rw/upper/srv/exec.txt"]).await;
    assert_eq!(out(&r), "via-exec\n", "{r:?}");

    let mut s = c
        .exec_stream(image_req(&["cat", "/srv/data.txt"], ""))
        .await
        .unwrap()
        .into_inner();
    let (mut so, mut code) = (Vec::new(), None);
    while let Some(m) = s.message().await.unwrap() {
        match m.kind {
            Some(exec_output::Kind::Stdout(b)) => so.extend(b),
            Some(exec_output::Kind::Exit(e)) => code = Some(e.exit_code),
            _ => {}
        }
    }
    assert_eq!(
        (so.as_slice(), code),
        (&b"written-by-workload\n"[..], Some(0))
    );
}

/// A second boot of the same qcow2: the workload (as root, default working
/// dir) reads what the first one wrote.
async fn data_survives_a_new_boot(image: &Path, rw: &Path) {
    let mut vm = boot(image, rw);
    let mut c = vm.first_health_logged("second boot-to-Health").await;
    let st = c
        .start_workload(sh(
            "echo FVT-PERSISTED $(cat /srv/data.txt) $(id -u)",
            "",
            "",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.uid, st.gid), (0, 0));
    wait_until(
        Duration::from_secs(30),
        || vm.console().contains("FVT-PERSISTED written-by-workload 0"),
        || format!("the second boot did not read the data:\n{}", vm.console()),
    )
    .await;
}
