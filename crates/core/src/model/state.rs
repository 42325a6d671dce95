//! Instance lifecycle states, spelled as the hypeman API spells them.

use serde::{Deserialize, Serialize};

/// Lifecycle states. Transitions happen only through the `to_*` methods of
/// [`crate::model::Instance`] (see `docs/architecture.md` for the machine).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum InstanceState {
    Created,
    Initializing,
    Running,
    Paused,
    Shutdown,
    Stopped,
    Standby,
    Unknown,
}

impl InstanceState {
    pub const ALL: [InstanceState; 8] = [
        Self::Created,
        Self::Initializing,
        Self::Running,
        Self::Paused,
        Self::Shutdown,
        Self::Stopped,
        Self::Standby,
        Self::Unknown,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Created => "Created",
            Self::Initializing => "Initializing",
            Self::Running => "Running",
            Self::Paused => "Paused",
            Self::Shutdown => "Shutdown",
            Self::Stopped => "Stopped",
            Self::Standby => "Standby",
            Self::Unknown => "Unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// States in which a QEMU process is expected to exist.
    pub fn has_vmm(&self) -> bool {
        matches!(
            self,
            Self::Created | Self::Initializing | Self::Running | Self::Paused | Self::Shutdown
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in InstanceState::ALL {
            assert_eq!(InstanceState::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(InstanceState::parse("running"), None);
    }
}
