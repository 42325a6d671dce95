//! Disk layers: the writable disk of an instance that runs an image, as a
//! chain of qcow2 files (see `crate::layers`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One qcow2 file of a writable-disk chain. The top of an instance's chain
/// is written by its VMM; every other layer is frozen (never written again)
/// and may be shared by forks and snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub id: String,
    /// The layer below; `None`: directly on the empty-filesystem template
    /// of `size_mib`.
    pub parent: Option<String>,
    /// Virtual size of the disk (every layer of a chain has the same).
    pub size_mib: u64,
    pub created_at: DateTime<Utc>,
}
