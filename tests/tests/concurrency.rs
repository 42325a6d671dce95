//! Many clients at once: forks of the same and of different sources while
//! other clients create and delete instances. Every fork ends Running with a
//! unique IP, MAC and TAP (or fails cleanly), and afterwards the store, the
//! bridge's ports and the live QEMU processes agree.

use anyhow::{Result, ensure};
use forkvm_e2e::{TestEnv, s};
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread")]
async fn eight_clients_fork_and_churn_without_duplicates_or_leaks() -> Result<()> {
    let env = Arc::new(TestEnv::start().await?);
    let mut sources = vec![];
    for name in ["src-a", "src-b"] {
        let (st, v) = env
            .request("POST", "/instances", Some(json!({"name": name})))
            .await?;
        ensure!(st == 201, "{v}\n{}", env.daemon_log());
        sources.push(s(&v, "id"));
    }
    const CLIENTS: usize = 8;
    const FORKS_PER_CLIENT: usize = 3;
    let mut tasks = vec![];
    for c in 0..CLIENTS {
        let env = env.clone();
        // Half the clients share one source, half the other.
        let src = sources[c % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut out = vec![];
            for i in 0..FORKS_PER_CLIENT {
                let body = json!({"name": format!("c{c}-f{i}"), "from_running": true});
                out.push(
                    env.request("POST", &format!("/instances/{src}/fork"), Some(body))
                        .await,
                );
            }
            out
        }));
    }
    // Churn alongside: create and delete instances.
    let mut churn = vec![];
    for c in 0..2 {
        let env = env.clone();
        churn.push(tokio::spawn(async move {
            let mut codes = vec![];
            for i in 0..2 {
                let name = format!("churn{c}-{i}");
                let (st, v) = env
                    .request("POST", "/instances", Some(json!({"name": name})))
                    .await?;
                codes.push(st);
                if st == 201 {
                    let (st, _) = env
                        .request("DELETE", &format!("/instances/{}", s(&v, "id")), None)
                        .await?;
                    codes.push(st);
                }
            }
            anyhow::Ok(codes)
        }));
    }

    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        for r in t.await? {
            let (st, v) = r?;
            match st {
                201 => {
                    ensure!(s(&v, "state") == "Running", "fork not Running: {v}");
                    ok += 1;
                }
                // A clean failure is allowed; it must carry a message.
                _ => {
                    ensure!(
                        !s(&v, "message").is_empty(),
                        "failure without message: {st} {v}"
                    );
                    failed += 1;
                }
            }
        }
    }
    for t in churn {
        let codes = t.await??;
        ensure!(
            codes.iter().all(|c| *c == 201 || *c == 204),
            "churn codes {codes:?}"
        );
    }
    println!("forks: {ok} ok, {failed} failed cleanly");
    ensure!(ok + failed == CLIENTS * FORKS_PER_CLIENT);
    ensure!(
        ok >= CLIENTS * FORKS_PER_CLIENT * 3 / 4,
        "too many failures: {failed}"
    );

    // The views agree.
    let (_, list) = env.request("GET", "/instances", None).await?;
    let list = list.as_array().cloned().unwrap_or_default();
    ensure!(
        list.len() == 2 + ok,
        "instances: {} (expected {})",
        list.len(),
        2 + ok
    );
    let (mut ips, mut macs, mut taps) = (HashSet::new(), HashSet::new(), HashSet::new());
    for i in &list {
        ensure!(s(i, "state") == "Running", "{i}");
        ensure!(ips.insert(s(&i["network"], "ip")), "duplicate IP in {i}");
        ensure!(macs.insert(s(&i["network"], "mac")), "duplicate MAC in {i}");
        ensure!(taps.insert(s(&i["network"], "tap")), "duplicate TAP in {i}");
    }
    let ports: HashSet<String> = env
        .links()?
        .into_iter()
        .filter(|l| l.starts_with("fvm"))
        .collect();
    ensure!(
        ports == taps,
        "bridge ports {ports:?} != instance TAPs {taps:?}"
    );
    ensure!(
        env.qemu_pids().len() == list.len(),
        "QEMU processes {} != instances {}",
        env.qemu_pids().len(),
        list.len()
    );
    // Every fork answers on its own address.
    for i in &list {
        ensure!(
            env.ping(&s(&i["network"], "ip")),
            "{} does not answer",
            s(i, "name")
        );
    }
    Ok(())
}
