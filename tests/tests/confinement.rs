//! What other local users and a compromised VMM can see of the daemon:
//! its directories and files are closed to group and others, and QEMU
//! carries none of the daemon's environment (the API token).

use anyhow::{Result, ensure};
use forkvm_e2e::{TestEnv, s};
use serde_json::json;
use std::os::unix::fs::MetadataExt;

#[tokio::test(flavor = "multi_thread")]
async fn state_is_private_and_qemu_gets_no_secrets() -> Result<()> {
    let token = format!("tok-{:032x}", rand::random::<u128>());
    let env = TestEnv::start_tcp(4975, &token).await?;
    let i = env.create(json!({"name": "priv"})).await?;
    for d in [&env.data_dir, &env.mem_dir] {
        let mode = std::fs::metadata(d)?.mode() & 0o777;
        ensure!(mode == 0o700, "{} has mode {mode:o}", d.display());
    }
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
        .request("DELETE", &format!("/instances/{}", s(&i, "id")), None)
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
