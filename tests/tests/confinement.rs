//! What other local users and a compromised VMM can see of the daemon:
//! its directories and files are closed to group and others, QEMU carries
//! none of the daemon's environment (the API token), and each VM's QEMU
//! runs as a uid of its own that can't open another VM's files.

use anyhow::{Result, ensure};
use forkvm_e2e::registry::Registry;
use forkvm_e2e::{TestEnv, s};
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The daemon's default VM group (`--vm-uid-base`).
const VM_GID: u32 = 900_000;

#[tokio::test(flavor = "multi_thread")]
async fn state_is_private_and_qemu_gets_no_secrets() -> Result<()> {
    let token = format!("tok-{:032x}", rand::random::<u128>());
    let env = TestEnv::start_tcp(4975, &token).await?;
    let secret = format!("s3cret-{:016x}", rand::random::<u64>());
    let i = env
        .create(json!({"name": "priv", "env": {"FVM_SECRET": secret}}))
        .await?;
    let id = s(&i, "id");
    // The env reaches the guest (by fw_cfg), and no command line shows it:
    // not QEMU's or any other on the host, not the guest kernel's or any
    // guest process's.
    let out = env
        .exec_ok(&id, &["sh", "-c", "echo \"$FVM_SECRET\""])
        .await?;
    ensure!(out.trim() == secret, "env in the guest: {out:?}");
    for p in std::fs::read_dir("/proc")?.flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        ensure!(
            !cmdline.contains(&secret),
            "{} has the env in its command line",
            p.path().display()
        );
    }
    // forkvm.cfg= would carry it base64-encoded (other daemons' QEMUs on
    // this host are not this test's business).
    for pid in env.qemu_pids() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        ensure!(
            !String::from_utf8_lossy(&cmdline).contains("forkvm.cfg="),
            "QEMU {pid} has a boot config in its command line"
        );
    }
    let script = "cat /proc/cmdline; for f in /proc/[0-9]*/cmdline; do cat $f; echo; done";
    let guest = env.exec_ok(&id, &["sh", "-c", script]).await?;
    ensure!(guest.contains("console=ttyS0"), "{guest}");
    ensure!(
        !guest.contains(&secret) && !guest.contains("forkvm.cfg="),
        "a guest command line has the env: {guest}"
    );
    let raw = "/sys/firmware/qemu_fw_cfg/by_name/opt/forkvm/boot/raw";
    let mode = env.exec_ok(&id, &["stat", "-c", "%a %u", raw]).await?;
    ensure!(
        mode.trim() == "400 0",
        "the guest's copy is root's alone: {mode}"
    );
    let dir = env.data_dir.join("instances").join(&id);
    for f in std::fs::read_dir(&dir)?.flatten() {
        ensure!(
            !f.file_name().to_string_lossy().starts_with("boot-config"),
            "the boot config stayed on disk: {}",
            f.path().display()
        );
    }
    let mode = std::fs::metadata(&env.mem_dir)?.mode() & 0o777;
    ensure!(mode == 0o700, "the memory directory has mode {mode:o}");
    // The data directory is on the path to disk layers, which QEMU opens
    // by path: traversable by the VM group, listable by nobody else.
    let m = std::fs::metadata(&env.data_dir)?;
    ensure!(
        (m.mode() & 0o7777, m.gid()) == (0o710, VM_GID),
        "the data directory has mode {:o}, group {}",
        m.mode() & 0o7777,
        m.gid()
    );
    // Those two are the barrier; the daemon's own files are 0600 (QEMU
    // inherits its umask, 077).
    let mode = std::fs::metadata(env.data_dir.join("forkvm.db"))?.mode() & 0o777;
    ensure!(mode == 0o600, "forkvm.db has mode {mode:o}");
    let pids = env.qemu_pids();
    ensure!(pids.len() == 1, "{pids:?}");
    let environ = std::fs::read(format!("/proc/{}/environ", pids[0]))?;
    let environ = String::from_utf8_lossy(&environ);
    ensure!(!environ.contains(&token), "QEMU has the API token");
    ensure!(
        !environ.contains("FORKVM_"),
        "QEMU has the daemon's settings: {environ}"
    );
    let (st, _) = env
        .request("DELETE", &format!("/instances/{id}"), None)
        .await?;
    ensure!(st == 204);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_flooding_its_console_stays_within_its_bound() -> Result<()> {
    const MAX: u64 = 64 << 10;
    let env = TestEnv::start_env(&[("FORKVM_CONSOLE_MAX_BYTES", &MAX.to_string())]).await?;
    let i = env.create(json!({"name": "loud"})).await?;
    let id = s(&i, "id");
    // 1 MiB of console output, then a last line.
    let flood = "head -c 1048576 /dev/zero | tr '\\0' 'x' | fold -w 79 > /dev/console; \
                 echo flood-end > /dev/console";
    env.exec_ok(&id, &["sh", "-c", flood]).await?;
    let log = env.data_dir.join("instances").join(&id).join("console.log");
    let rotated = env
        .data_dir
        .join("instances")
        .join(&id)
        .join("console.log.1");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    // The watch runs every second; a rotation happened once the older half exists.
    forkvm_e2e::wait_for(
        "a rotation",
        std::time::Duration::from_secs(10),
        async || (size(&rotated) > 0 && size(&log) <= MAX).then_some(()),
    )
    .await?;
    ensure!(
        size(&rotated) <= MAX / 2,
        "rotated half: {}",
        size(&rotated)
    );
    let (st, logs) = env
        .request("GET", &format!("/instances/{id}/logs"), None)
        .await?;
    ensure!(st == 200);
    let logs = logs.as_str().unwrap_or_default();
    ensure!(
        logs.len() as u64 <= MAX + 4096,
        "logs answer of {} bytes",
        logs.len()
    );
    ensure!(logs.contains("flood-end"), "the last line is kept");
    Ok(())
}

/// The `(controllers, path)` lines of `/proc/<pid>/cgroup`.
fn cgroups_of(pid: i32) -> Result<Vec<(String, String)>> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, c, p) = (it.next()?, it.next()?, it.next()?);
            Some((c.to_string(), p.to_string()))
        })
        .collect())
}

fn cgroup_path(lines: &[(String, String)], ctrl: &str) -> Option<String> {
    lines
        .iter()
        .find(|(c, _)| c.split(',').any(|x| x == ctrl))
        .map(|(_, p)| p.clone())
}

fn read_trim(p: &std::path::Path) -> Result<String> {
    Ok(std::fs::read_to_string(p)
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        .trim()
        .to_string())
}

/// A running VM's QEMU: under its seccomp filter, with file-size and
/// open-file limits, in a cgroup of its own beneath the daemon's (v1 here:
/// memory, cpu, pids) with limits derived from the VM; the cgroup goes with
/// the VM.
#[tokio::test(flavor = "multi_thread")]
async fn qemu_is_sandboxed_limited_and_in_a_cgroup_of_its_own() -> Result<()> {
    let env = TestEnv::start().await?;
    let i = env.create(json!({"name": "conf"})).await?;
    let id = s(&i, "id");
    let pids = env.qemu_pids();
    ensure!(pids.len() == 1, "{pids:?}");
    let pid = pids[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
        "QEMU has no seccomp filter"
    );
    let cmdline = String::from_utf8(std::fs::read(format!("/proc/{pid}/cmdline"))?)?;
    let args: Vec<&str> = cmdline.split('\0').collect();
    let mem_mb: u64 = args
        .iter()
        .position(|a| *a == "-m")
        .and_then(|k| args.get(k + 1))
        .and_then(|m| m.trim_end_matches('M').parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no -m in {cmdline}"))?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let soft = |name: &str| -> Option<String> {
        let l = limits.lines().find(|l| l.starts_with(name))?;
        l[name.len()..]
            .split_whitespace()
            .next()
            .map(str::to_string)
    };
    let fsize: u64 = soft("Max file size").unwrap_or_default().parse()?;
    ensure!(
        fsize >= mem_mb << 20 && fsize < u64::MAX,
        "Max file size {fsize} (guest memory {mem_mb} MiB)"
    );
    ensure!(
        soft("Max open files").as_deref() == Some("4096"),
        "{limits}"
    );

    // In a cgroup of its own beneath the daemon's (the daemon runs in this
    // test's cgroups), per controller.
    let ours = cgroups_of(std::process::id() as i32)?;
    let its = cgroups_of(pid)?;
    let name = format!("forkvm-{id}-qemu");
    let mut dirs = vec![];
    for (ctrl, file, want) in [
        ("memory", "memory.limit_in_bytes", (mem_mb + 256) << 20),
        ("cpu", "cpu.cfs_quota_us", 200_000),
        ("pids", "pids.max", 129),
    ] {
        let parent = cgroup_path(&ours, ctrl).unwrap_or_default();
        let path = cgroup_path(&its, ctrl).unwrap_or_default();
        ensure!(
            path == format!("{}/{name}", parent.trim_end_matches('/')),
            "{ctrl}: QEMU in {path:?}, the daemon in {parent:?}"
        );
        let dir = std::path::Path::new("/sys/fs/cgroup")
            .join(ctrl)
            .join(path.trim_start_matches('/'));
        ensure!(read_trim(&dir.join(file))? == want.to_string(), "{file}");
        dirs.push(dir);
    }
    let (st, _) = env
        .request("DELETE", &format!("/instances/{id}"), None)
        .await?;
    ensure!(st == 204);
    for d in &dirs {
        ensure!(!d.exists(), "{} outlived the VM", d.display());
    }
    Ok(())
}

/// `Uid:` (real) of a process.
fn uid_of(pid: i32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no Uid: in {status}"))
}

/// The QEMU of instance `id`.
fn qemu_of(env: &TestEnv, id: &str) -> Result<(i32, String)> {
    for pid in env.qemu_pids() {
        let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline"))?)
            .replace('\0', " ");
        if cmd.contains(&format!("forkvm-{id},")) {
            return Ok((pid, cmd));
        }
    }
    anyhow::bail!("no QEMU of {id}")
}

/// The memory file, console and writable disk top of instance `id`.
fn files_of(env: &TestEnv, id: &str, cmdline: &str) -> Result<Vec<PathBuf>> {
    let top = cmdline
        .split(' ')
        .find_map(|a| a.strip_prefix("if=none,id=disk-rw,file="))
        .and_then(|a| a.split(",format=").next())
        .ok_or_else(|| anyhow::anyhow!("no writable disk in {cmdline}"))?;
    Ok(vec![
        env.mem_dir.join(format!("{id}.mem")),
        env.data_dir.join("instances").join(id).join("console.log"),
        PathBuf::from(top),
    ])
}

/// Whether a process of `uid` (in the VM group, like QEMU) opens `file`
/// read-write: by its path, or (`by_fd`) through `/proc/self/fd/3` of a
/// descriptor root opened — as QEMU gets its files, which skips the
/// directories' search permission but not the file's own mode.
fn opens_as(uid: u32, file: &Path, by_fd: bool) -> Result<bool> {
    let target = if by_fd {
        "/proc/self/fd/3".to_string()
    } else {
        file.display().to_string()
    };
    let out = std::process::Command::new("sh")
        .args(["-c", r#"exec 3<"$1"; shift; exec "$@""#, "_"])
        .arg(file)
        .args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={VM_GID}"),
        ])
        .args([&format!("--groups={VM_GID}"), "--", "sh", "-c"])
        .args([r#"exec 4<>"$0""#, &target])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() || err.contains("Permission denied"),
        "{}: {err}",
        file.display()
    );
    Ok(out.status.success())
}

async fn pull_ready(env: &TestEnv, name: &str) -> Result<()> {
    let (st, v) = env
        .request("POST", "/images", Some(json!({"name": name})))
        .await?;
    ensure!(st == 202 || st == 200, "pull -> {st}: {v}");
    let path = format!("/images/{}", name.replace('/', "%2F"));
    let img = forkvm_e2e::wait_for("the image", Duration::from_secs(180), async || {
        let (_, v) = env.request("GET", &path, None).await.ok()?;
        matches!(v["status"].as_str(), Some("ready" | "failed")).then_some(v)
    })
    .await?;
    ensure!(s(&img, "status") == "ready", "{img}");
    Ok(())
}

/// Every file under `dir` owned by `uid`.
fn owned_by(dir: &Path, uid: u32) -> Vec<PathBuf> {
    let mut found = vec![];
    let Ok(rd) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        if m.uid() == uid {
            found.push(e.path());
        }
        if m.is_dir() {
            found.extend(owned_by(&e.path(), uid));
        }
    }
    found
}

/// Each VM's QEMU runs as a uid of its own (not root, in no group but the
/// VM group, without capabilities), still under its seccomp filter; that
/// uid can open its own memory file, console and writable disk but not
/// another VM's — not even handed a descriptor of them — and nothing of
/// its own outlives the VM. Its QEMU's mount namespace shows neither.
#[tokio::test(flavor = "multi_thread")]
async fn each_vm_runs_as_a_uid_of_its_own_that_cannot_open_another_vms_files() -> Result<()> {
    let env = TestEnv::start().await?;
    let reg = Registry::start(&env)?;
    let name = reg.push_fixture(&env, "forkvm/uid", "1")?;
    pull_ready(&env, &name).await?;
    let a = s(
        &env.create(json!({"name": "ua", "image": name})).await?,
        "id",
    );
    let b = s(
        &env.create(json!({"name": "ub", "image": name})).await?,
        "id",
    );
    let (pa, cmd_a) = qemu_of(&env, &a)?;
    let (pb, cmd_b) = qemu_of(&env, &b)?;
    let (ua, ub) = (uid_of(pa)?, uid_of(pb)?);
    ensure!(ua != 0 && ub != 0 && ua != ub, "uids {ua} and {ub}");
    for pid in [pa, pb] {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        for want in [
            vec!["Seccomp:", "2"],
            vec!["Groups:", &VM_GID.to_string()],
            vec!["CapEff:", "0000000000000000"],
            vec!["NoNewPrivs:", "1"],
        ] {
            ensure!(
                status
                    .lines()
                    .any(|l| l.split_whitespace().eq(want.iter().copied())),
                "{want:?} in\n{status}"
            );
        }
    }
    let (fa, fb) = (files_of(&env, &a, &cmd_a)?, files_of(&env, &b, &cmd_b)?);
    for (own, other) in fa.iter().zip(&fb) {
        ensure!(
            opens_as(ua, own, true)?,
            "A can't open its {}",
            own.display()
        );
        ensure!(
            !opens_as(ua, other, true)?,
            "A opened B's {}",
            other.display()
        );
        ensure!(
            !opens_as(ua, other, false)?,
            "A opened B's {}",
            other.display()
        );
        ensure!(
            opens_as(ub, other, true)?,
            "B can't open its {}",
            other.display()
        );
        ensure!(!opens_as(ub, own, true)?, "B opened A's {}", own.display());
    }
    // Its disk top is the only file of its own A reaches by path (the
    // layer directory is traversable; memory and console are not).
    ensure!(opens_as(ua, &fa[2], false)?, "A can't reach its disk top");
    ensure!(
        !opens_as(ua, &fa[0], false)?,
        "A reached a memory file by path"
    );
    // Its mount namespace holds the system files and its layer directory:
    // not the store, not /etc, not B's memory or console, whatever the uid.
    let root = PathBuf::from(format!("/proc/{pa}/root"));
    let seen = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p)).exists();
    ensure!(seen(&fa[2]), "A's disk top is not in its jail");
    ensure!(seen(Path::new("/usr/bin")), "no /usr in the jail");
    for hidden in [
        env.data_dir.join("forkvm.db"),
        PathBuf::from("/etc/passwd"),
        PathBuf::from("/root"),
        fb[0].clone(),
        fb[1].clone(),
        fa[0].clone(),
    ] {
        ensure!(!seen(&hidden), "{} is in A's jail", hidden.display());
    }
    for id in [&a, &b] {
        let (st, _) = env
            .request("DELETE", &format!("/instances/{id}"), None)
            .await?;
        ensure!(st == 204);
    }
    for uid in [ua, ub] {
        for dir in [&env.data_dir, &env.mem_dir] {
            let left = owned_by(dir, uid);
            ensure!(left.is_empty(), "files of uid {uid} left: {left:?}");
        }
    }
    Ok(())
}
