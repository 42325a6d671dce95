//! Waiting for a state: at once when there, on the transition, on time-out,
//! early when the instance failed, 404 when it is gone.

use crate::ErrorKind;
use crate::model::InstanceState;
use crate::testkit::World;
use std::time::Duration;

#[tokio::test]
async fn a_wait_ends_at_the_state_at_a_failure_or_at_its_timeout() {
    let w = World::new().await;
    let i = w.running("vm").await;
    let now = w
        .mgr
        .wait(&i.id, InstanceState::Running, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(!now.timed_out);
    let t = std::time::Instant::now();
    let late = w
        .mgr
        .wait(&i.id, InstanceState::Standby, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(late.timed_out && late.instance.state == InstanceState::Running);
    assert!(t.elapsed() >= Duration::from_millis(200));

    let (mgr, id) = (w.mgr.clone(), i.id.clone());
    let waiter = tokio::spawn(async move {
        mgr.wait(&id, InstanceState::Stopped, Duration::from_secs(10))
            .await
    });
    w.mgr.stop(&i.id).await.unwrap();
    let stopped = waiter.await.unwrap().unwrap();
    assert!(!stopped.timed_out);
    assert_eq!(stopped.instance.state, InstanceState::Stopped);

    // A VM that died will not become Running by itself: the wait ends.
    let j = w.running("dies").await;
    w.hv.kill(&j.id);
    let r = w
        .mgr
        .wait(&j.id, InstanceState::Standby, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(!r.timed_out, "{r:?}");
    assert!(r.instance.state_error.is_some());

    w.mgr.delete(&i.id).await.unwrap();
    let e = w
        .mgr
        .wait(&i.id, InstanceState::Running, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}
