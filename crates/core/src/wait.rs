//! Waiting for an instance to reach a state (hypeman's `instances.wait`):
//! returns when it is there, when it ends up stopped with an error (it
//! will not get there by itself), or when the time is up.

use crate::error::Result;
use crate::model::{Instance, InstanceState};
use crate::services::Services;
use std::time::Duration;
use tokio::time::Instant;

/// The longest one wait may last.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// How often the record is looked at (a store read).
const POLL: Duration = Duration::from_millis(50);

/// Where a wait ended.
#[derive(Clone, Debug)]
pub struct WaitOutcome {
    pub instance: Instance,
    pub timed_out: bool,
}

pub(crate) async fn wait(
    svc: &Services,
    id_or_name: &str,
    target: InstanceState,
    timeout: Duration,
) -> Result<WaitOutcome> {
    let deadline = Instant::now() + timeout.min(MAX_WAIT);
    loop {
        let instance = svc.find(id_or_name)?;
        let failed = instance.state_error.is_some()
            && matches!(
                instance.state,
                InstanceState::Stopped | InstanceState::Shutdown | InstanceState::Unknown
            );
        if instance.state == target || failed {
            return Ok(WaitOutcome {
                instance,
                timed_out: false,
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(WaitOutcome {
                instance,
                timed_out: true,
            });
        }
        tokio::time::sleep(POLL.min(deadline - now)).await;
    }
}
