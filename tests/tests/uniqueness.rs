//! Every fork is a machine of its own, whichever handoff path it took: its
//! own machine-id (in the agent's root; an OCI image root gets the same in
//! the agent's unit tests), its own RNG output, and a clock stepped to the
//! host's after resume even when the snapshot is seconds old.

use anyhow::{Result, ensure};
use forkvm_e2e::{TestEnv, s};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

/// machine-id, 16 random bytes and the guest's clock (unix seconds).
async fn identity(env: &TestEnv, id: &str) -> Result<(String, String, i64)> {
    let out = env
        .exec_ok(
            id,
            &[
                "sh",
                "-c",
                "cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s",
            ],
        )
        .await?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 3, "{out:?}");
    Ok((
        lines[0].to_string(),
        lines[1].to_string(),
        lines[2].trim().parse()?,
    ))
}

fn host_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn forks_get_their_own_machine_id_rng_and_a_current_clock_on_every_path() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env.create(json!({"name": "uniq"})).await?;
    let src_id = s(&src, "id");
    let (mid, rnd, _) = identity(&env, &src_id).await?;
    ensure!(
        mid.len() == 32 && mid.chars().all(|c| c.is_ascii_hexdigit()),
        "{mid}"
    );
    let (st, snap) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/snapshots"),
            Some(json!({"kind": "Standby"})),
        )
        .await?;
    ensure!(st == 201, "{snap}");
    // Age the snapshot: a fork whose clock were not stepped would run late.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (mut ids, mut rnds) = (HashSet::from([mid]), HashSet::from([rnd]));
    for path in ["mailbox", "rpc", "exec"] {
        let (st, f) = env
            .request(
                "POST",
                &format!("/snapshots/{}/fork", s(&snap, "id")),
                Some(json!({"name": format!("uniq-{path}"), "handoff": path})),
            )
            .await?;
        ensure!(st == 201, "{f}\n{}", env.daemon_log());
        ensure!(s(&f["handoff"], "path") == path, "{f}");
        let (mid, rnd, clock) = identity(&env, &s(&f, "id")).await?;
        let skew = (clock - host_secs()).abs();
        println!("{path}: machine-id {mid}, clock skew {skew} s");
        ensure!(skew <= 1, "{path} fork's clock is {skew} s off");
        ensure!(
            ids.insert(mid.clone()),
            "{path} fork kept a machine-id: {mid}"
        );
        ensure!(
            rnds.insert(rnd.clone()),
            "{path} fork repeats random bytes: {rnd}"
        );
    }
    Ok(())
}
