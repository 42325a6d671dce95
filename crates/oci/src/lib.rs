//! OCI images as read-only root disks: pull from a registry or import an
//! archive, verify every blob, apply the layers into a directory, and build an
//! erofs image of it with `mkfs.erofs`.
//!
//! ```text
//! "nginx:1.25" ──parse──▶ Reference (docker.io/library/nginx:1.25)
//!        │
//!   pull (registry) / import (OCI layout dir|tar, docker save)
//!        ▼
//! BlobStore <root>/sha256/<hex>  ◀── verified before visible
//!        │  Fetched { manifest_digest, config_digest, config: ImageConfig, layers }
//!        ▼
//! unpack(fetched, blobs, root, limits)  ── layers in order, whiteouts, owners, xattrs
//!        ▼
//! build_erofs(root, out)  ── mkfs.erofs into a temp file, then rename
//! ```
//!
//! # Modules (one concern each)
//!
//! | module | what |
//! |---|---|
//! | `reference` | [`Reference`]: Docker's normalization (`docker.io`, `library/`, `latest`) |
//! | `error` | [`OciError`] with a stable [`OciError::code`] per variant |
//! | `blobs` | [`BlobStore`]: temp file → streaming sha256 + size check → fsync → rename |
//! | `manifest` | manifests, indexes, configs, media types, linux/amd64 selection, bounds |
//! | `registry` | [`pull`]: `oci-client` for auth and blob streams, bounded manifest fetches |
//! | `layout` | [`import`]: OCI layouts and `docker save` archives |
//! | `tarstream` | a bounded streaming tar reader (PAX, GNU long names) for hostile input |
//! | `unpack` | [`unpack`]: layer application confined to the root (`openat2(RESOLVE_IN_ROOT)`) |
//! | `erofs` | [`build_erofs`] |
//!
//! # Shape, and where it differs from the first sketch
//!
//! - [`pull`] takes `progress: &(dyn Fn(Progress) + Send + Sync)` so that the
//!   pull future is `Send` and can be spawned by the daemon.
//! - [`import`] returns `(Option<ImageName>, Fetched)`: an archive may name its
//!   image with a full reference (`io.containerd.image.name`, `RepoTags`, a
//!   `ref.name` that parses as one) or only a tag (`ref.name` = `latest`).
//! - [`unpack`] takes [`UnpackLimits`] and returns [`UnpackStats`]; its root must
//!   be new (or empty) and sit in a private (0700) directory.
//! - [`Fetched`] also carries `config_digest`, and each [`Layer`] its `diff_id`,
//!   which [`unpack`] checks against the uncompressed stream.
//! - Only sha256 digests are accepted (references, descriptors, blobs).
//! - Plain HTTP goes to loopback and `RegistryOptions::insecure` hosts only,
//!   and is used for them directly (no HTTPS attempt first).
//!
//! # Threat model: a hostile registry or archive
//!
//! It **cannot**:
//! - make unverified content visible: every manifest, config and layer is hashed
//!   while it streams and compared with the digest that names it (and the size
//!   with its descriptor) before it is stored or parsed; uncompressed layers are
//!   checked against the config's `diff_ids`;
//! - write outside the unpack root: `..` is refused, parent directories are
//!   resolved with the root as `/` (symlinks clamp to it), the last component is
//!   never followed, files are created `O_EXCL|O_NOFOLLOW` after the old entry is
//!   removed (so no write goes through a symlink or into a hard-linked file),
//!   hard-link targets must be earlier entries inside the root;
//! - exhaust memory with documents: manifests, indexes and configs are read with
//!   a 4 MiB cap while downloading; PAX/long-name records are capped at 1 MiB;
//! - fill the disk or run forever: layer count ≤ 256, unpacked bytes and
//!   entries bounded by [`UnpackLimits`] (checked before each file is written),
//!   at most 1 MiB of data after a layer's end-of-archive;
//! - send us elsewhere: foreign-layer `urls` are never followed; plain HTTP is
//!   refused for non-loopback, non-listed registries ([`OciError::InsecureRegistry`]);
//! - steer the guest's overlayfs: `trusted.overlay.*` xattrs (and `system.*`) are
//!   dropped.
//!
//! It **can**: make a pull fail or slow (timeouts are 30 s to connect and 120 s
//! between reads, not a total deadline); ship any program, setuid binary or
//! device node *into the image* — that is the guest's business, but on the host
//! the unpacked tree must stay private, which is why [`unpack`] requires a
//! private parent directory; redirect blob downloads (HTTP redirects are
//! followed, the content is still verified).
//!
//! # Requirements
//!
//! Unpacking reproduces owners, device nodes and `trusted.*` xattrs, so it runs
//! as root. Linux ≥ 5.6 for `openat2` (older kernels get a stricter walk that
//! refuses symlinks in parent paths). `mkfs.erofs` from erofs-utils ≥ 1.5.

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
pub use reference::{DEFAULT_REGISTRY, DEFAULT_TAG, Reference};
pub use registry::{Credentials, Progress, RegistryOptions, plain_http_allowed, pull};
pub use unpack::{UnpackLimits, UnpackStats, unpack};
