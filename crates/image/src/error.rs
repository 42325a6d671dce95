//! What building or loading a guest image can fail with.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {name:?} not found in {}", dir.display())]
    NotFound { name: String, dir: PathBuf },
    #[error("invalid image name {0:?}: use letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("command {command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("cannot resolve the kernel package: {0}")]
    Resolve(String),
    #[error("no xz/zstd kernel payload found in the bzImage")]
    NoKernelPayload,
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("kernel package layout: {0}")]
    Package(String),
    #[error("guest agent {}: {reason}", path.display())]
    AgentNotStatic { path: PathBuf, reason: String },
    #[error("module {name}: {reason}")]
    Module { name: String, reason: String },
    #[error("invalid manifest {}: {source}", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
