//! Snapshots: device state plus guest memory, enough to rebuild the machine.

use super::{MailboxInfo, NetworkInfo};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A VM snapshot: device state plus the immutable base holding its memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub name: Option<String>,
    pub source_instance_id: String,
    pub source_instance_name: String,
    pub created_at: DateTime<Utc>,
    /// What a restore needs to rebuild an identical machine.
    pub image: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub env: BTreeMap<String, String>,
    pub entrypoint: Vec<String>,
    /// The kernel command line the source booted with (kept identical).
    pub cmdline: String,
    /// The source's network identity at snapshot time.
    pub network: NetworkInfo,
    /// Bytes actually used on the host (state file + allocated memory blocks).
    pub size_bytes: u64,
    /// Owned by an instance in Standby (deleted when it is restored).
    pub standby_of: Option<String>,
    /// The source's mailbox at capture time (forks patch it before resume).
    #[serde(default)]
    pub mailbox: Option<MailboxInfo>,
    /// The base holding its guest memory. `None` only in records written
    /// before bases existed (their memory file is upgraded into a base of
    /// the snapshot's own id at start-up): use [`Snapshot::base`].
    #[serde(default)]
    pub base_id: Option<String>,
    /// The frozen disk layer captured with the memory (instances of an
    /// image with a root filesystem).
    #[serde(default)]
    pub disk_layer: Option<String>,
    /// The source's workload (OCI images): forks run it already.
    #[serde(default)]
    pub workload: Option<super::Workload>,
    /// Host time when the guest's clock stopped for this snapshot (the
    /// capture's pause). A fork's guest steps its clock forward by the time
    /// since (mailbox path); `None` in records from before it was kept
    /// (`created_at`, a little later, stands in).
    #[serde(default)]
    pub frozen_at: Option<DateTime<Utc>>,
    /// The user's key-value tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl Snapshot {
    /// The id of the base holding its memory.
    pub fn base(&self) -> &str {
        self.base_id.as_deref().unwrap_or(&self.id)
    }
}
