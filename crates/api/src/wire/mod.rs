//! Wire types: the JSON bodies of the REST API.
//!
//! Field names, states and shapes follow the hypeman API (its Python client
//! parses these unchanged); forkvm's additions are extra fields only. These
//! types derive both `Serialize` and `Deserialize` so the CLI client can reuse
//! them.
//!
//! One module per resource; everything is re-exported here, so callers use
//! `wire::Instance`, `wire::ForkResponse` and so on.

mod error;
mod exec;
mod fork;
mod handoff;
mod health;
mod image;
mod instance;
mod logs;
mod ports;
mod size;
mod snapshot;
mod unknown;
mod wait;

pub use error::ErrorBody;
pub use exec::{ExecEncoding, ExecParams, ExecResponse};
pub use fork::{
    ForkFailure, ForkOutcome, ForkResponse, ForkTargetState, InstanceForkParams, MAX_FORK_COUNT,
    SnapshotForkParams,
};
pub use handoff::{Handoff, HandoffPath};
pub use health::{AgentHealth, Health};
pub use image::tag_filter;
pub use image::{
    Image, ImageCreateParams, ImageImportParams, ImageListQuery, ImageStatus, PullCredentials,
    PullProgress,
};
pub use instance::{
    DeleteQuery, Instance, InstanceCreateParams, InstanceNetwork, InstanceStartParams,
    InstanceState, ListQuery, NetworkParams,
};
pub use logs::LogsQuery;
pub use ports::{EgressParam, PortProtocol, PublishedPort};
pub use size::{format_size_mb, parse_size_mb};
pub use snapshot::has_tags;
pub use snapshot::{
    InstanceStandbyParams, Snapshot, SnapshotCreateParams, SnapshotKind, SnapshotListQuery,
    SnapshotNetwork, SnapshotRestoreParams, reject_compression,
};
pub use unknown::Unsupported;
pub use wait::{WaitForStateResponse, WaitQuery, parse_go_duration};
