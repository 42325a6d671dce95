//! OCI images into a read-only erofs file system image (placeholder docs, see below).

mod blobs;
mod error;
mod manifest;
mod reference;
mod tarstream;
mod unpack;

pub use blobs::{BlobStore, BlobWriter};
pub use error::{BoxError, OciError};
pub use manifest::{Compression, Fetched, ImageConfig, Layer, MAX_JSON, MAX_LAYERS, PLATFORM};
pub use reference::Reference;
pub use tarstream::Counters;
pub use unpack::{UnpackLimits, UnpackStats, unpack};
