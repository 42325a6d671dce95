//! forkvm core: instances, their state machine and persistence, and the
//! orchestration that ties the hypervisor, host networking and the guest agent
//! together. The API and CLI crates are thin layers over [`Manager`].

pub mod agent;
pub mod error;
mod fork;
mod handoff;
pub mod manager;
pub mod memory;
pub mod model;
pub mod netalloc;
pub mod paths;
pub mod store;

pub use error::{CoreError, Result};
pub use manager::{AgentHealth, Config, Manager};
pub use model::*;

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
