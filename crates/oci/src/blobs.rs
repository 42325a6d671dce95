//! The content-addressed blob store: `<root>/sha256/<hex>`.
//!
//! A blob is written to a temporary file in `<root>/tmp`, hashed while it streams
//! in, and checked against its expected digest and size; only then is it fsynced
//! and renamed into place (and the directory fsynced). A crash leaves at most a
//! temporary file behind, never a partial or unverified blob under `sha256/`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::OciError;
use crate::reference::parse_digest;

/// A content-addressed store of verified blobs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, OciError> {
        let root = root.into();
        for sub in ["sha256", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| OciError::io("creating", &dir, e))?;
        }
        Ok(BlobStore { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` lives (whether or not it is present).
    pub fn path(&self, digest: &str) -> Result<PathBuf, OciError> {
        let digest = parse_digest(digest).map_err(|r| OciError::bad(digest, r))?;
        let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
        Ok(self.root.join("sha256").join(hex))
    }

    /// Whether the verified blob `digest` is present.
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// Opens a present blob for reading.
    pub fn open_blob(&self, digest: &str) -> Result<File, OciError> {
        let path = self.path(digest)?;
        File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => OciError::bad(
                digest,
                "blob is not in the blob store; pull or import the image again",
            ),
            _ => OciError::io("opening blob", &path, e),
        })
    }

    /// The size of a present blob.
    pub fn size(&self, digest: &str) -> Result<u64, OciError> {
        let path = self.path(digest)?;
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| OciError::io("reading blob metadata", &path, e))
    }

    /// Reads a present blob of at most `max` bytes into memory (JSON documents).
    pub fn read_small(&self, digest: &str, max: u64) -> Result<Vec<u8>, OciError> {
        let size = self.size(digest)?;
        if size > max {
            return Err(OciError::TooLarge {
                what: format!("document {digest}"),
                actual: size,
                limit: max,
            });
        }
        let path = self.path(digest)?;
        fs::read(&path).map_err(|e| OciError::io("reading blob", &path, e))
    }

    /// Starts writing a blob. `expected` digest and `expected_size` are checked on
    /// [`BlobWriter::commit`]; more than `max` (or `expected_size`) bytes fail at once.
    pub fn writer(
        &self,
        what: &str,
        expected: Option<&str>,
        expected_size: Option<u64>,
        max: u64,
    ) -> Result<BlobWriter, OciError> {
        if let Some(d) = expected {
            parse_digest(d)
                .map_err(|r| OciError::bad(what, format!("descriptor digest {d:?}: {r}")))?;
        }
        let dir = self.root.join("tmp");
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&dir)
            .map_err(|e| OciError::io("creating a temporary blob in", &dir, e))?;
        Ok(BlobWriter {
            store: self.clone(),
            what: what.to_string(),
            tmp,
            hasher: Sha256::new(),
            written: 0,
            expected: expected.map(str::to_string),
            expected_size,
            max: expected_size.map_or(max, |s| s.min(max)),
        })
    }

    /// Streams `reader` into the store (see [`BlobStore::writer`]); returns (digest, size).
    pub fn ingest(
        &self,
        what: &str,
        reader: &mut dyn Read,
        expected: Option<&str>,
        expected_size: Option<u64>,
        max: u64,
    ) -> Result<(String, u64), OciError> {
        let mut w = self.writer(what, expected, expected_size, max)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The cause (e.g. "archive is truncated inside a file") is
                // what the caller needs to read.
                Err(e) => {
                    let reason = format!("reading the blob failed: {e}");
                    return Err(OciError::bad_src(what, reason, e));
                }
            };
            w.write(&buf[..n])?;
        }
        w.commit()
    }
}

/// A blob being written; see [`BlobStore::writer`]. Dropping it discards the data.
pub struct BlobWriter {
    store: BlobStore,
    what: String,
    tmp: tempfile::NamedTempFile,
    hasher: Sha256,
    written: u64,
    expected: Option<String>,
    expected_size: Option<u64>,
    max: u64,
}

impl BlobWriter {
    /// Appends bytes; fails as soon as the blob grows past its size or limit.
    pub fn write(&mut self, buf: &[u8]) -> Result<(), OciError> {
        let after = self.written.saturating_add(buf.len() as u64);
        if after > self.max {
            return Err(match self.expected_size {
                Some(expected) if after > expected => OciError::SizeMismatch {
                    what: self.what.clone(),
                    expected,
                    actual: after,
                },
                _ => OciError::TooLarge {
                    what: self.what.clone(),
                    actual: after,
                    limit: self.max,
                },
            });
        }
        self.hasher.update(buf);
        self.tmp
            .write_all(buf)
            .map_err(|e| OciError::io("writing", self.tmp.path(), e))?;
        self.written = after;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies size and digest, then makes the blob visible (fsync + rename +
    /// directory fsync). Returns (digest, size).
    pub fn commit(self) -> Result<(String, u64), OciError> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if let Some(expected) = self.expected_size
            && expected != self.written
        {
            return Err(OciError::SizeMismatch {
                what: self.what,
                expected,
                actual: self.written,
            });
        }
        if let Some(expected) = self.expected
            && expected != actual
        {
            return Err(OciError::DigestMismatch {
                what: self.what,
                expected,
                actual,
            });
        }
        let dest = self.store.path(&actual)?;
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| OciError::io("syncing", self.tmp.path(), e))?;
        self.tmp
            .persist(&dest)
            .map_err(|e| OciError::io("renaming a blob to", &dest, e.error))?;
        let dir = self.store.root.join("sha256");
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| OciError::io("syncing", &dir, e))?;
        Ok((actual, self.written))
    }
}

/// sha256 of a byte slice as `sha256:<hex>`.
pub(crate) fn sha256_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_blob_becomes_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = sha256_of(b"hello");
        let mut r: &[u8] = b"hello";
        let (d, n) = store
            .ingest("t", &mut r, Some(&digest), Some(5), 1 << 20)
            .unwrap();
        assert_eq!((d.as_str(), n), (digest.as_str(), 5));
        assert!(store.contains(&digest));
        assert_eq!(store.read_small(&digest, 10).unwrap(), b"hello");
        assert_eq!(
            store.read_small(&digest, 4).unwrap_err().code(),
            "too_large"
        );
    }

    #[test]
    fn wrong_digest_or_size_never_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let want = sha256_of(b"hello");
        let mut r: &[u8] = b"hellO";
        let e = store
            .ingest("t", &mut r, Some(&want), Some(5), 1 << 20)
            .unwrap_err();
        assert_eq!(e.code(), "digest_mismatch");
        assert!(!store.contains(&want));
        assert!(!store.contains(&sha256_of(b"hellO")));
        let mut r: &[u8] = b"hello!";
        let e = store
            .ingest("t", &mut r, Some(&want), Some(5), 1 << 20)
            .unwrap_err();
        assert_eq!(e.code(), "size_mismatch");
        let mut r: &[u8] = b"hell";
        let e = store
            .ingest("t", &mut r, Some(&want), Some(5), 1 << 20)
            .unwrap_err();
        assert_eq!(e.code(), "size_mismatch");
        let mut r: &[u8] = b"hello";
        let e = store.ingest("t", &mut r, None, None, 3).unwrap_err();
        assert_eq!(e.code(), "too_large");
        // Nothing left behind in tmp either.
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(dir.path().join("sha256")).unwrap().count(), 0);
    }

    #[test]
    fn bad_digest_strings_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        assert!(store.path("sha256:../../etc/passwd").is_err());
        assert!(store.path("md5:abc").is_err());
        assert!(!store.contains("sha256:zz"));
    }
}
