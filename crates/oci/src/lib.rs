//! OCI images into a read-only erofs file system image (placeholder docs, see below).

mod blobs;
mod erofs;
mod error;
mod layout;
mod manifest;
mod reference;
mod registry;
mod tarstream;
mod unpack;

pub use blobs::{BlobStore, BlobWriter};
pub use erofs::{ErofsOptions, MKFS_EROFS, build_erofs, build_erofs_with};
pub use error::{BoxError, OciError};
pub use layout::{ImageName, import};
pub use manifest::{Compression, Fetched, ImageConfig, Layer, MAX_JSON, MAX_LAYERS, PLATFORM};
pub use reference::Reference;
pub use registry::{Credentials, Progress, RegistryOptions, plain_http_allowed, pull};
pub use tarstream::Counters;
pub use unpack::{UnpackLimits, UnpackStats, unpack};
