//! Orchestration scenarios against the fakes of [`crate::testkit`]: every
//! fork stage failing and cleaning up, the handoff ladder's choices,
//! restore's two failure modes, and adoption after a restart.

mod adopt;
mod disks;
mod exec;
mod firewall;
mod fork;
mod handoff;
mod handover;
mod images;
mod observe;
mod restore;
mod vm_users;
mod wait;

use crate::error::{CoreError, Result};
use crate::model::{ForkRequest, HandoffPath, Instance, InstanceState};
use crate::testkit::World;
use std::time::{Duration, Instant};

/// `count` forks (or one named `name`) of a running source.
fn from_running(name: &str, count: Option<u32>) -> ForkRequest {
    ForkRequest {
        name: name.into(),
        from_running: true,
        count,
        ..Default::default()
    }
}

fn with_path(name: &str, path: HandoffPath) -> ForkRequest {
    ForkRequest {
        handoff: Some(path),
        ..from_running(name, None)
    }
}

/// The only result of a one-fork request.
async fn fork_one(w: &World, src: &str, req: ForkRequest) -> Result<Instance> {
    let mut v = w.mgr.fork(src, req).await?;
    assert_eq!(v.len(), 1);
    v.remove(0)
}

/// The source is untouched by whatever happened to its forks.
async fn source_intact(w: &World, name: &str) {
    let src = w.mgr.get(name).await.unwrap();
    assert_eq!(src.state, InstanceState::Running, "{src:?}");
    let pid = src.pid.expect("source VMM");
    assert_eq!(
        w.hv.state_of(pid),
        Some(forkvm_vmm::RunState::Running),
        "{src:?}"
    );
}

/// Polls until the instance is in `state`.
async fn wait_state(w: &World, name: &str, state: InstanceState) -> Instance {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let i = w.mgr.get(name).await.unwrap();
        if i.state == state {
            return i;
        }
        assert!(Instant::now() < deadline, "{name} never {state:?}: {i:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_conflict(e: &CoreError) -> bool {
    matches!(e, CoreError::Conflict(_))
}
