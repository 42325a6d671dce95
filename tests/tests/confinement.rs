//! What other local users and a compromised VMM can see of the daemon:
//! its directories and files are closed to group and others, and QEMU
//! carries none of the daemon's environment (the API token).

use anyhow::{Result, ensure};
use forkvm_e2e::{TestEnv, s};
use serde_json::json;
use std::os::unix::fs::MetadataExt;

#[tokio::test(flavor = "multi_thread")]
async fn state_is_private_and_qemu_gets_no_secrets() -> Result<()> {
    let token = format!("tok-{:016x}", rand::random::<u64>());
    let env = TestEnv::start_tcp(4975, &token).await?;
    let i = env.create(json!({"name": "priv"})).await?;
    for d in [&env.data_dir, &env.mem_dir] {
        let mode = std::fs::metadata(d)?.mode() & 0o777;
        ensure!(mode == 0o700, "{} has mode {mode:o}", d.display());
    }
    // Those two are the barrier (QEMU sets its own umask, 027, for the
    // files it makes inside them); the daemon's own files are 0600.
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
