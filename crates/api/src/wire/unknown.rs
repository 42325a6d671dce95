//! Request fields forkvm does not know: refused, never dropped.
//!
//! hypeman's request bodies carry options forkvm does not implement
//! (`volumes`, `ttl`, `gpu`, …). Accepting such a body and ignoring the
//! field would hand the caller something other than what it asked for, so
//! every body type collects the fields it does not declare here and answers
//! 400 `unsupported` naming them.

use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The undeclared fields of a request body (`#[serde(flatten)]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Unsupported(pub BTreeMap<String, serde_json::Value>);

impl Unsupported {
    /// No field (serde's `skip_serializing_if`).
    pub fn is_none(&self) -> bool {
        self.0.is_empty()
    }

    /// 400 `unsupported` naming every field, unless there is none.
    pub fn refuse(&self, what: &str) -> Result<(), ApiError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = self.0.keys().map(|k| format!("{k:?}")).collect();
        Err(ApiError::unsupported(format!(
            "{what}: forkvm does not support the field{} {}",
            if names.len() == 1 { "" } else { "s" },
            names.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unknown_field_is_named() {
        let u: Unsupported = serde_json::from_str(r#"{"ttl":"1h","volumes":[]}"#).unwrap();
        let e = u.refuse("instance create").unwrap_err();
        assert_eq!(e.code, "unsupported");
        assert!(e.message.contains("\"ttl\", \"volumes\""), "{}", e.message);
        assert!(Unsupported::default().refuse("x").is_ok());
    }
}
