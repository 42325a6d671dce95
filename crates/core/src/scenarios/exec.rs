//! Exec on a tenant's behalf is bounded: a default timeout when none is
//! given, and a cap on execs running at once in one instance.

use crate::ErrorKind;
use crate::guest::{DEFAULT_EXEC_TIMEOUT_S, MAX_EXECS_PER_INSTANCE};
use crate::model::ExecRequest;
use crate::testkit::{Answer, World};
use std::time::{Duration, Instant};

fn req(timeout_s: Option<u32>) -> ExecRequest {
    ExecRequest {
        command: vec!["true".into()],
        timeout_s,
        ..Default::default()
    }
}

#[tokio::test]
async fn an_exec_without_a_timeout_gets_the_default_one() {
    let w = World::new().await;
    let i = w.running("vm").await;
    w.mgr.exec(&i.id, req(None)).await.unwrap();
    w.mgr.exec(&i.id, req(Some(7))).await.unwrap();
    let sent: Vec<u32> = w
        .agent
        .exec_requests()
        .iter()
        .map(|r| r.timeout_ms)
        .collect();
    assert_eq!(sent, [DEFAULT_EXEC_TIMEOUT_S * 1000, 7000]);
}

#[tokio::test]
async fn execs_beyond_the_cap_are_refused_until_one_finishes() {
    let w = World::new().await;
    let i = w.running("vm").await;
    let other = w.running("other").await;
    w.agent.exec(Answer::Silent, 0);
    let running: Vec<_> = (0..MAX_EXECS_PER_INSTANCE)
        .map(|_| {
            let (mgr, id) = (w.mgr.clone(), i.id.clone());
            tokio::spawn(async move { mgr.exec(&id, req(Some(30))).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.agent.calls("Exec", &i.id) < MAX_EXECS_PER_INSTANCE {
        assert!(
            Instant::now() < deadline,
            "the execs never reached the agent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e = w
        .mgr
        .exec(&i.id, req(Some(30)))
        .await
        .expect_err("over the cap");
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
    // The cap is per instance.
    w.agent.exec(Answer::Ok, 0);
    w.mgr.exec(&other.id, req(Some(30))).await.unwrap();
    for t in &running {
        t.abort();
    }
    for t in running {
        let _ = t.await;
    }
    w.mgr
        .exec(&i.id, req(Some(30)))
        .await
        .expect("a slot is free again");
}
