//! The domain model: instances, their network identity, snapshots and the
//! handoff record, as stored and as returned to API clients.

mod disk;
mod handoff;
mod image;
mod instance;
mod memory;
mod ports;
mod requests;
mod snapshot;
mod state;

pub use disk::Layer;
pub use handoff::{HandoffPath, HandoffRecord, Stage};
pub use image::{ImageRecord, ImageRunConfig, ImageSource, ImageStatus, Workload, sha256_hex};
pub use instance::{Instance, MailboxInfo, NetworkInfo};
pub use memory::{Base, Memory};
pub use ports::{MAX_PUBLISHED_PORTS, PortProtocol, PublishedPort, validate_ports};
pub use requests::{CreateRequest, ExecRequest, ExecResult, ForkRequest};
pub use snapshot::Snapshot;
pub use state::InstanceState;
