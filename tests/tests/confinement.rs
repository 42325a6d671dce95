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
