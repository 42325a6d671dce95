//! forkvm core: instances, their state machine and persistence, and the
//! orchestration that ties the hypervisor, host networking and the guest
//! agent together. The API and CLI crates are thin layers over [`Manager`].
//!
//! Where things live (`docs/architecture.md` has the whole map):
//! - [`model`]: instances, snapshots, the handoff record and its [`Stage`]s;
//!   every state change is an `Instance::to_*` transition.
//! - [`manager`]: the façade; it owns the `Services` every operation uses.
//! - one module per operation: `lifecycle` (create/start/stop/delete),
//!   `standby`, `restore`, `snapshot`, `fork` (the fork pipeline), `guest`
//!   (exec, logs, health), `adopt` (reconciliation after a restart, one
//!   table), `reaper` (VMs that died on their own);
//! - the steps they share: `capture` (pause → state → memory), `resume`
//!   (TAP → VMM → state load → resume), `handoff` (mailbox → RPC → exec),
//!   `teardown`, `capacity`, `bases` (shared memory), `layers` (disk
//!   chains), `images` (what an instance boots);
//! - the outside world behind narrow traits: [`forkvm_vmm::Hypervisor`],
//!   [`netalloc::HostNetwork`], [`agent::GuestAgent`], [`clock::Clock`].

mod adopt;
pub mod agent;
mod bases;
mod capacity;
mod capture;
pub mod clock;
pub mod config;
mod console;
pub mod error;
pub mod files;
mod fork;
mod guest;
mod handoff;
mod handover;
mod images;
mod layers;
mod lifecycle;
mod logs;
pub mod manager;
pub mod memory;
pub mod model;
pub mod netalloc;
pub mod observe;
mod orphans;
pub mod paths;
mod private_dir;
mod promote;
mod reaper;
mod restore;
mod resume;
mod rollback;
#[cfg(test)]
mod scenarios;
mod services;
pub mod session;
mod snapshot;
mod standby;
pub mod stats;
pub mod store;
mod teardown;
#[cfg(test)]
mod testkit;
pub mod vm_users;
mod vmm_switch;
mod wait;

pub use config::{Config, TestHooks};
pub use error::{CoreError, ErrorKind, Result};
pub use fork::MAX_FORK_COUNT;
pub use forkvm_oci::Credentials as RegistryCredentials;
pub use guest::AgentHealth;
pub use handoff::{HandoffError, MailboxFallback};
pub use images::{
    ImageBackend, OciBackend, OciFuture, PLATFORM, ProgressFn, PullProgress, PullRequest,
};
pub use logs::{LogFollow, LogSource};
pub use manager::{Deps, Manager};
pub use model::*;
pub use session::{ExecSession, SessionInput, SessionOutput, SessionRequest};
pub use wait::{MAX_WAIT, WaitOutcome};

/// Instance names: lowercase letters, digits and dashes, not starting or
/// ending with a dash, at most 63 characters (a DNS label).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(CoreError::Invalid(format!(
            "invalid name {name:?}: use 1-63 lowercase letters, digits and dashes, not starting or ending with a dash"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web-1", "0x", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a b",
            &"a".repeat(64),
            "../x",
            "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
