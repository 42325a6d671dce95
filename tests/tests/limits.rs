//! Capacity limits are checked before anything is created: a request that
//! would not fit fails with a clear 409 and changes nothing.

use anyhow::Result;
use forkvm_e2e::{TestEnv, s};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn memory_budget_and_address_pool_refuse_up_front() -> Result<()> {
    // A /29 has 5 guest addresses (gateway excluded); 700 MiB fit two 256 MiB guests.
    let env =
        TestEnv::start_subnet("10.79.0.0/29", &[("FORKVM_MAX_GUEST_MEMORY_MB", "700")]).await?;
    let (st, src) = env
        .request("POST", "/instances", Some(json!({"name": "src"})))
        .await?;
    assert_eq!(st, 201, "{src}\n{}", env.daemon_log());
    let src_id = src["id"].as_str().unwrap_or_default().to_string();
    let links = env.links()?;

    // Ten running copy-on-write forks are charged 25 % each (640 MiB) plus
    // their base: more than the 444 MiB left.
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "big", "count": 10, "from_running": true})),
        )
        .await?;
    assert_eq!(st, 409, "{v}");
    assert!(
        v["message"].as_str().unwrap_or_default().contains("memory"),
        "{v}"
    );
    let (st, v) = env
        .request(
            "POST",
            "/instances",
            Some(json!({"name": "a", "memory_mb": 512})),
        )
        .await?;
    assert_eq!(st, 409, "{v}");

    // Stopped forks need no memory but each needs an address: 5 don't fit in the 4 left.
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "cold", "count": 5, "from_running": true, "target_state": "Stopped"})),
        )
        .await?;
    assert_eq!(st, 409, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("address"),
        "{v}"
    );

    let (_, list) = env.request("GET", "/instances", None).await?;
    assert_eq!(list.as_array().map(|a| a.len()), Some(1), "{list}");
    assert_eq!(env.links()?, links);
    assert_eq!(env.qemu_pids().len(), 1);

    // What fits still works.
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{src_id}/fork"),
            Some(json!({"name": "one", "from_running": true})),
        )
        .await?;
    assert_eq!(st, 201, "{v}\n{}", env.daemon_log());
    Ok(())
}

/// Two requests that each fit but not together, sent at once: capacity is
/// reserved under one lock before anything is made, so exactly one passes.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_cannot_together_exceed_the_budget() -> Result<()> {
    // Copy-on-write forks of a 256 MiB guest are charged 64 MiB (25 %): four
    // are 256 MiB; with the source's base (~100 MiB) one request of four fits
    // in 500 MiB, two do not.
    let env = TestEnv::start_env(&[("FORKVM_MAX_GUEST_MEMORY_MB", "500")]).await?;
    let src = env.create(json!({"name": "src"})).await?;
    let id = s(&src, "id");
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/standby"), None)
        .await?;
    assert_eq!(st, 200, "{v}");
    let body = |n: &str| json!({"name": n, "count": 4});
    let path = format!("/instances/{id}/fork");
    let (a, b) = tokio::join!(
        env.request("POST", &path, Some(body("a"))),
        env.request("POST", &path, Some(body("b")))
    );
    let (a, b) = (a?, b?);
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "a: {}\nb: {}", a.1, b.1);
    let refused = if a.0 == 409 { &a.1 } else { &b.1 };
    assert!(s(refused, "message").contains("memory"), "{refused}");
    let (_, list) = env.request("GET", "/instances", None).await?;
    assert_eq!(list.as_array().map(|l| l.len()), Some(5), "{list}");
    Ok(())
}
