//! Typed errors for pulling, importing, unpacking and building images, each with a
//! stable machine code ([`OciError::code`]) that the API can put in its error body.

use std::path::PathBuf;

/// A boxed error from a lower layer (the HTTP client, a parser).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an image could not be pulled, imported, unpacked or built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OciError {
    /// The text is not an image reference.
    #[error(
        "invalid image reference {input:?}: {reason} (expected e.g. \"nginx:latest\", \"registry:5000/team/app:1\" or \"app@sha256:<64 hex>\")"
    )]
    InvalidReference { input: String, reason: String },
    /// The registry has no such repository, tag or manifest.
    #[error("{what} not found at {registry}; check the image name and tag")]
    NotFound {
        registry: String,
        what: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The registry requires authentication and none, or wrong, credentials were given.
    #[error(
        "registry {registry} refused access to {repository}; give valid credentials for it (user and password, or a registry token)"
    )]
    Unauthorized {
        registry: String,
        repository: String,
        #[source]
        source: Option<BoxError>,
    },
    /// Content did not hash to the digest that names it.
    #[error(
        "digest mismatch for {what}: expected {expected}, got {actual}; the registry or archive served corrupt or altered content"
    )]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// Content is larger or smaller than its descriptor says.
    #[error(
        "size mismatch for {what}: descriptor says {expected} bytes, got {actual}; the registry or archive served corrupt or altered content"
    )]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    /// The image has no linux/amd64 variant.
    #[error("image offers no linux/amd64 variant (it offers: {}); forkvm runs linux/amd64 guests, pick an image built for that platform", offered.join(", "))]
    UnsupportedPlatform { offered: Vec<String> },
    /// A manifest, config or layer has a media type this crate does not handle.
    #[error(
        "unsupported media type {media_type:?} for {what}; supported are OCI and Docker v2 schema 2 images with tar, tar+gzip or tar+zstd layers"
    )]
    UnsupportedMediaType { what: String, media_type: String },
    /// Plain HTTP to a registry that is neither loopback nor listed as insecure.
    #[error(
        "registry {registry} does not speak HTTPS and plain HTTP is refused for it; if it is a registry you trust, add {registry:?} to the insecure registries"
    )]
    InsecureRegistry {
        registry: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The image exceeds a bound (layer count, JSON size, unpacked bytes or entries).
    #[error(
        "image too large: {what} is {actual}, the limit is {limit}; raise the limit only for images you trust"
    )]
    TooLarge {
        what: String,
        actual: u64,
        limit: u64,
    },
    /// An archive, layout, layer or document is malformed, truncated or unsafe.
    #[error("bad archive {what}: {reason}")]
    BadArchive {
        what: String,
        reason: String,
        #[source]
        source: Option<BoxError>,
    },
    /// A local file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An argument is unusable (e.g. an unpack root that is not empty or not private).
    #[error("{0}")]
    InvalidInput(String),
    /// `mkfs.erofs` is missing or failed.
    #[error("building the erofs image failed: {reason}")]
    Erofs {
        reason: String,
        #[source]
        source: Option<std::io::Error>,
    },
    /// Any other registry failure (connection, protocol, server error).
    #[error("registry {registry}: {message}")]
    Registry {
        registry: String,
        message: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl OciError {
    /// A stable machine-readable code per variant.
    pub fn code(&self) -> &'static str {
        match self {
            OciError::InvalidReference { .. } => "invalid_reference",
            OciError::NotFound { .. } => "not_found",
            OciError::Unauthorized { .. } => "unauthorized",
            OciError::DigestMismatch { .. } => "digest_mismatch",
            OciError::SizeMismatch { .. } => "size_mismatch",
            OciError::UnsupportedPlatform { .. } => "unsupported_platform",
            OciError::UnsupportedMediaType { .. } => "unsupported_media_type",
            OciError::InsecureRegistry { .. } => "insecure_registry",
            OciError::TooLarge { .. } => "too_large",
            OciError::BadArchive { .. } => "bad_archive",
            OciError::Io { .. } => "io",
            OciError::InvalidInput(_) => "invalid_input",
            OciError::Erofs { .. } => "erofs",
            OciError::Registry { .. } => "registry",
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OciError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad(what: impl Into<String>, reason: impl Into<String>) -> Self {
        OciError::BadArchive {
            what: what.into(),
            reason: reason.into(),
            source: None,
        }
    }

    pub(crate) fn bad_src(
        what: impl Into<String>,
        reason: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        OciError::BadArchive {
            what: what.into(),
            reason: reason.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn media(what: impl Into<String>, media_type: impl Into<String>) -> Self {
        OciError::UnsupportedMediaType {
            what: what.into(),
            media_type: media_type.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct() {
        let errs = [
            OciError::bad("x", "y"),
            OciError::media("x", "y"),
            OciError::io("open", "/x", std::io::Error::other("e")),
            OciError::UnsupportedPlatform {
                offered: vec!["linux/arm64".into()],
            },
            OciError::DigestMismatch {
                what: "w".into(),
                expected: "a".into(),
                actual: "b".into(),
            },
        ];
        let codes: std::collections::HashSet<_> = errs.iter().map(|e| e.code()).collect();
        assert_eq!(codes.len(), errs.len());
        assert!(errs[3].to_string().contains("linux/arm64"));
    }
}
