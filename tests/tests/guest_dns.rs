//! Name servers reach guests: the daemon's `--dns` (`FORKVM_DNS`) in the
//! guest's resolv.conf at boot and in every fork's, whichever path the
//! fork's handoff took.

use anyhow::{Result, ensure};
use forkvm_e2e::{TestEnv, s};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn guests_and_their_forks_get_the_daemons_name_servers() -> Result<()> {
    // Addresses of this test's own: nothing in the namespace answers them.
    let env = TestEnv::start_env(&[("FORKVM_DNS", "10.77.0.53,10.77.0.54")]).await?;
    let src = env.create(json!({"name": "dns"})).await?;
    let resolv = env
        .exec_ok(&s(&src, "id"), &["cat", "/etc/resolv.conf"])
        .await?;
    ensure!(
        resolv.contains("nameserver 10.77.0.53") && resolv.contains("nameserver 10.77.0.54"),
        "boot: {resolv}"
    );
    for path in ["mailbox", "rpc", "exec"] {
        let (st, v) = env
            .request(
                "POST",
                &format!("/instances/{}/fork", s(&src, "id")),
                Some(json!({"name": format!("dns-{path}"), "from_running": true, "handoff": path})),
            )
            .await?;
        ensure!(st == 201, "{v}");
        // One fork without `count`: the fork itself, not a list.
        let f = &v;
        ensure!(s(&f["handoff"], "path") == path, "{f}");
        let resolv = env
            .exec_ok(&s(f, "id"), &["cat", "/etc/resolv.conf"])
            .await?;
        ensure!(
            resolv.contains("nameserver 10.77.0.53"),
            "{path} fork: {resolv}"
        );
    }
    Ok(())
}
