//! Where guest RAM lives: an instance's own file, or a private
//! copy-on-write mapping of an immutable base shared with others.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The guest RAM of an instance's VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Memory {
    /// Its own file on the memory directory, mapped shared (`share=on`):
    /// guest writes reach the file, so it can become a base in O(1).
    #[default]
    Own,
    /// A private mapping (`share=off`) of base `base`: pages the guest
    /// writes are copied into the VMM process; the base never changes.
    Cow { base: String },
}

impl Memory {
    /// The base this memory maps, if any.
    pub fn base(&self) -> Option<&str> {
        match self {
            Self::Own => None,
            Self::Cow { base } => Some(base),
        }
    }
}

/// An immutable guest-memory file on the memory directory, shared by the
/// snapshots that hold it and every copy-on-write VM that maps it. It is
/// removed when none is left (see `bases::collect`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    pub id: String,
    /// Bytes allocated on the memory directory when it was made.
    pub size_bytes: u64,
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_tagged_and_defaults_to_own() {
        let cow = Memory::Cow { base: "b1".into() };
        let v = serde_json::to_value(&cow).unwrap();
        assert_eq!(v, serde_json::json!({"mode": "cow", "base": "b1"}));
        assert_eq!(serde_json::from_value::<Memory>(v).unwrap(), cow);
        assert_eq!(Memory::default().base(), None);
        assert_eq!(cow.base(), Some("b1"));
    }
}
