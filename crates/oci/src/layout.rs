//! Importing images from local archives: an OCI image layout (a directory, or a
//! tar of one, optionally gzipped) and `docker save` output (legacy
//! `manifest.json` + `<id>/layer.tar`, or Docker 25+'s OCI layout with
//! `manifest.json` beside it).
//!
//! Archives are read in one streaming pass with the bounded tar reader; blobs go
//! straight into the blob store, verified against the digest in their path where
//! there is one. Paths are normalized and `..` refused; in a directory,
//! symlinks may not lead outside it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::manifest::{self, Compression, Descriptor, Doc, Fetched, MAX_JSON};
use crate::tarstream::{Data, Kind, TarReader};
use crate::{BlobStore, OciError, Reference, UnpackLimits};

const OCI_LAYOUT_ENTRIES: u64 = 1_000_000;
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The name an archive gives its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageName {
    /// A full reference (`io.containerd.image.name`, docker's `RepoTags`, or a
    /// `ref.name` that parses as one), normalized.
    Reference(Reference),
    /// A bare `org.opencontainers.image.ref.name` such as `latest` or `1.0`.
    Tag(String),
}

/// Imports the single linux/amd64 image of an OCI layout (directory or tar) or a
/// `docker save` archive into `blobs`; returns its name, if the archive gives
/// one, and the image.
pub fn import(path: &Path, blobs: &BlobStore) -> Result<(Option<ImageName>, Fetched), OciError> {
    let meta = std::fs::metadata(path).map_err(|e| OciError::io("opening", path, e))?;
    if meta.is_dir() {
        let root = path
            .canonicalize()
            .map_err(|e| OciError::io("resolving", path, e))?;
        resolve(&mut DirSource { root }, blobs)
    } else {
        let mut src = TarSource::read(path, blobs)?;
        resolve(&mut src, blobs)
    }
}

/// Where the layout's files come from.
trait Source {
    /// A small file (at most `MAX_JSON`), `None` if absent.
    fn json(&mut self, path: &str, blobs: &BlobStore) -> Result<Option<Vec<u8>>, OciError>;
    /// Puts the file at `path` into the store (checked against `expected`);
    /// returns (digest, size), `None` if absent.
    fn blob(
        &mut self,
        path: &str,
        expected: Option<&str>,
        blobs: &BlobStore,
    ) -> Result<Option<(String, u64)>, OciError>;
}

fn resolve(
    src: &mut dyn Source,
    blobs: &BlobStore,
) -> Result<(Option<ImageName>, Fetched), OciError> {
    if let Some(index) = src.json("index.json", blobs)? {
        return from_oci_layout(src, blobs, &index);
    }
    if let Some(m) = src.json("manifest.json", blobs)? {
        return from_docker_save(src, blobs, &m);
    }
    Err(OciError::bad(
        "archive",
        "neither an OCI image layout (no index.json) nor a docker save archive (no manifest.json)",
    ))
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

/// Makes sure the blob of `d` is in the store, with the descriptor's size.
fn need_blob(
    src: &mut dyn Source,
    blobs: &BlobStore,
    d: &Descriptor,
    what: &str,
) -> Result<(), OciError> {
    manifest::check_digest(&d.digest, what)?;
    let size = manifest::descriptor_size(d, what)?;
    let (_, have) = src
        .blob(&blob_path(&d.digest), Some(&d.digest), blobs)?
        .ok_or_else(|| {
            OciError::bad(
                what,
                format!("blob {} is missing from the archive", d.digest),
            )
        })?;
    if have != size {
        return Err(OciError::SizeMismatch {
            what: what.to_string(),
            expected: size,
            actual: have,
        });
    }
    Ok(())
}

fn read_doc(
    src: &mut dyn Source,
    blobs: &BlobStore,
    d: &Descriptor,
    what: &str,
) -> Result<Doc, OciError> {
    manifest::check_json_size(manifest::descriptor_size(d, what)?, what)?;
    need_blob(src, blobs, d, what)?;
    let bytes = blobs.read_small(&d.digest, MAX_JSON)?;
    manifest::parse_doc(&bytes, Some(&d.media_type), what)
}

fn from_oci_layout(
    src: &mut dyn Source,
    blobs: &BlobStore,
    index: &[u8],
) -> Result<(Option<ImageName>, Fetched), OciError> {
    let Doc::Index(entries) = manifest::parse_doc(index, Some(manifest::OCI_INDEX), "index.json")?
    else {
        return Err(OciError::bad("index.json", "is a manifest, not an index"));
    };
    let usable: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .collect();
    let top = match usable.as_slice() {
        [one] => (*one).clone(),
        [] => manifest::select_platform(&entries)?.clone(),
        many => {
            return Err(OciError::bad(
                "index.json",
                format!(
                    "the archive holds {} images; import them one at a time",
                    many.len()
                ),
            ));
        }
    };
    let name = name_from(&top);
    let (mdesc, config, layers) = match read_doc(src, blobs, &top, "manifest")? {
        Doc::Manifest { config, layers } => (top, config, layers),
        Doc::Index(inner) => {
            let chosen = manifest::select_platform(&inner)?.clone();
            match read_doc(src, blobs, &chosen, "platform manifest")? {
                Doc::Manifest { config, layers } => (chosen, config, layers),
                Doc::Index(_) => {
                    return Err(OciError::bad("index.json", "indexes nested too deep"));
                }
            }
        }
    };
    manifest::check_json_size(
        manifest::descriptor_size(&config, "image config")?,
        "image config",
    )?;
    need_blob(src, blobs, &config, "image config")?;
    let config_bytes = blobs.read_small(&config.digest, MAX_JSON)?;
    let fetched = manifest::describe(&mdesc.digest, &config, &layers, &config_bytes)?;
    for (i, d) in layers.iter().enumerate() {
        need_blob(src, blobs, d, &format!("layer {i}"))?;
    }
    Ok((name, fetched))
}

fn name_from(d: &Descriptor) -> Option<ImageName> {
    if let Some(r) = d
        .annotations
        .get(CONTAINERD_NAME)
        .and_then(|n| n.parse().ok())
    {
        return Some(ImageName::Reference(r));
    }
    let n = d.annotations.get(REF_NAME)?;
    // A ref.name with a '/' or ':' is a full reference (docker, skopeo with names).
    if (n.contains('/') || n.contains(':'))
        && let Ok(r) = n.parse()
    {
        return Some(ImageName::Reference(r));
    }
    Some(ImageName::Tag(n.clone()))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn from_docker_save(
    src: &mut dyn Source,
    blobs: &BlobStore,
    m: &[u8],
) -> Result<(Option<ImageName>, Fetched), OciError> {
    let entries: Vec<SaveEntry> = serde_json::from_slice(m)
        .map_err(|e| OciError::bad_src("manifest.json", "not a docker save manifest", e))?;
    let entry = match entries.as_slice() {
        [one] => one,
        other => {
            return Err(OciError::bad(
                "manifest.json",
                format!(
                    "the archive holds {} images; save and import one at a time",
                    other.len()
                ),
            ));
        }
    };
    if entry.layers.len() > manifest::MAX_LAYERS {
        return Err(OciError::TooLarge {
            what: "layer count".into(),
            actual: entry.layers.len() as u64,
            limit: manifest::MAX_LAYERS as u64,
        });
    }
    let config_bytes = src.json(&entry.config, blobs)?.ok_or_else(|| {
        OciError::bad(
            "manifest.json",
            format!("config {} is missing", entry.config),
        )
    })?;
    let mut config_in = &config_bytes[..];
    let (config_digest, config_size) =
        blobs.ingest("image config", &mut config_in, None, None, MAX_JSON)?;
    let mut layer_descs = Vec::new();
    for (i, p) in entry.layers.iter().enumerate() {
        let what = format!("layer {i}");
        let (digest, size) = src
            .blob(p, None, blobs)?
            .ok_or_else(|| OciError::bad(&what, format!("{p} is missing from the archive")))?;
        let media_type = match sniff(blobs, &digest)? {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        };
        layer_descs
            .push(serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}));
    }
    // Legacy archives have no manifest: write the OCI manifest they imply.
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": layer_descs,
    });
    let manifest =
        serde_json::to_vec(&manifest).map_err(|e| OciError::bad_src("manifest", "encoding", e))?;
    let (manifest_digest, _) =
        blobs.ingest("manifest", &mut &manifest[..], None, None, MAX_JSON)?;
    let Doc::Manifest { config, layers } = manifest::parse_doc(&manifest, None, "manifest")? else {
        return Err(OciError::bad("manifest", "not a manifest"));
    };
    let fetched = manifest::describe(&manifest_digest, &config, &layers, &config_bytes)?;
    let name = entry
        .repo_tags
        .as_ref()
        .and_then(|t| t.first())
        .and_then(|t| t.parse().ok())
        .map(ImageName::Reference);
    Ok((name, fetched))
}

/// The compression of a stored layer, from its first bytes.
fn sniff(blobs: &BlobStore, digest: &str) -> Result<Compression, OciError> {
    let mut head = [0u8; 4];
    let mut f = blobs.open_blob(digest)?;
    let n = f
        .read(&mut head)
        .map_err(|e| OciError::io("reading blob", digest, e))?;
    Ok(match &head[..n] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    })
}

/// Normalizes an archive path: `./` and empty components dropped, `..` refused.
fn normalize(path: &str) -> Result<String, OciError> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(OciError::bad(
                    "archive",
                    format!("path {path:?} contains '..'"),
                ));
            }
            c => out.push(c),
        }
    }
    Ok(out.join("/"))
}

/// Resolves `..` in a link target lexically; going above the archive root is refused.
fn resolve_link(path: &str) -> Result<String, OciError> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop().ok_or_else(|| {
                    OciError::bad(
                        "archive",
                        format!("link {path:?} leads outside the archive"),
                    )
                })?;
            }
            c => out.push(c),
        }
    }
    Ok(out.join("/"))
}

/// A layout directory.
struct DirSource {
    root: PathBuf,
}

impl DirSource {
    /// The file at `path`, which must stay inside the root after symlinks.
    fn open(&self, path: &str) -> Result<Option<(File, u64)>, OciError> {
        let rel = normalize(path)?;
        let full = self.root.join(&rel);
        let real = match full.canonicalize() {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(OciError::io("resolving", &full, e)),
        };
        if !real.starts_with(&self.root) {
            return Err(OciError::bad(path, "leads outside the layout directory"));
        }
        let f = File::open(&real).map_err(|e| OciError::io("opening", &real, e))?;
        let len = f
            .metadata()
            .map_err(|e| OciError::io("inspecting", &real, e))?
            .len();
        Ok(Some((f, len)))
    }
}

impl Source for DirSource {
    fn json(&mut self, path: &str, _: &BlobStore) -> Result<Option<Vec<u8>>, OciError> {
        let Some((f, len)) = self.open(path)? else {
            return Ok(None);
        };
        manifest::check_json_size(len, path)?;
        let mut buf = Vec::new();
        f.take(MAX_JSON + 1)
            .read_to_end(&mut buf)
            .map_err(|e| OciError::io("reading", self.root.join(path), e))?;
        manifest::check_json_size(buf.len() as u64, path)?;
        Ok(Some(buf))
    }

    fn blob(
        &mut self,
        path: &str,
        expected: Option<&str>,
        blobs: &BlobStore,
    ) -> Result<Option<(String, u64)>, OciError> {
        let Some((f, len)) = self.open(path)? else {
            return Ok(None);
        };
        if let Some(d) = expected.filter(|d| blobs.contains(d)) {
            return Ok(Some((d.to_string(), blobs.size(d)?)));
        }
        let mut r = BufReader::new(f);
        blobs
            .ingest(path, &mut r, expected, Some(len), u64::MAX)
            .map(Some)
    }
}

/// A layout or docker save archive, read once: blobs stored, small files kept.
struct TarSource {
    small: HashMap<String, Vec<u8>>,
    stored: HashMap<String, (String, u64)>,
    links: HashMap<String, String>,
}

impl TarSource {
    fn read(path: &Path, blobs: &BlobStore) -> Result<TarSource, OciError> {
        let f = File::open(path).map_err(|e| OciError::io("opening", path, e))?;
        let mut input = BufReader::new(f);
        let gz = input
            .fill_buf()
            .map_err(|e| OciError::io("reading", path, e))?
            .starts_with(&[0x1f, 0x8b]);
        let reader: Box<dyn Read> = if gz {
            Box::new(flate2::read::MultiGzDecoder::new(input))
        } else {
            Box::new(input)
        };
        let limits = UnpackLimits {
            max_bytes: u64::MAX,
            max_entries: OCI_LAYOUT_ENTRIES,
        };
        let mut tar = TarReader::new(reader, "archive", limits, Default::default());
        let mut src = TarSource {
            small: HashMap::new(),
            stored: HashMap::new(),
            links: HashMap::new(),
        };
        while let Some(m) = tar.next_member()? {
            let name = normalize(&String::from_utf8_lossy(&m.path))?;
            match m.kind {
                Kind::Symlink | Kind::HardLink => {
                    let target = String::from_utf8_lossy(&m.link).into_owned();
                    let base = match (m.kind, name.rsplit_once('/')) {
                        (Kind::Symlink, Some((dir, _))) => format!("{dir}/{target}"),
                        _ => target,
                    };
                    src.links.insert(name, resolve_link(&base)?);
                }
                Kind::File if is_small(&name) && m.size <= MAX_JSON => {
                    let mut buf = Vec::new();
                    Data(&mut tar)
                        .read_to_end(&mut buf)
                        .map_err(|e| OciError::bad_src("archive", "truncated", e))?;
                    src.small.insert(name, buf);
                }
                Kind::File if is_blob(&name) => {
                    let expected = name
                        .strip_prefix("blobs/sha256/")
                        .map(|h| format!("sha256:{h}"));
                    let stored = match expected.as_deref().filter(|d| blobs.contains(d)) {
                        Some(d) => (d.to_string(), blobs.size(d)?),
                        None => blobs.ingest(
                            &name,
                            &mut Data(&mut tar),
                            expected.as_deref(),
                            Some(m.size),
                            u64::MAX,
                        )?,
                    };
                    src.stored.insert(name, stored);
                }
                _ => {}
            }
        }
        Ok(src)
    }

    /// Follows archive links (a few hops) to the stored path.
    fn target(&self, path: &str) -> Result<String, OciError> {
        let mut p = normalize(path)?;
        for _ in 0..8 {
            match self.links.get(&p) {
                Some(next) => p = next.clone(),
                None => return Ok(p),
            }
        }
        Err(OciError::bad(path, "too many links"))
    }
}

fn is_small(name: &str) -> bool {
    matches!(
        name,
        "index.json" | "oci-layout" | "manifest.json" | "repositories"
    ) || name.ends_with(".json")
}

fn is_blob(name: &str) -> bool {
    name.starts_with("blobs/") || name.ends_with(".tar") || name.ends_with(".tar.gz")
}

impl Source for TarSource {
    fn json(&mut self, path: &str, blobs: &BlobStore) -> Result<Option<Vec<u8>>, OciError> {
        let p = self.target(path)?;
        if let Some(b) = self.small.get(&p) {
            return Ok(Some(b.clone()));
        }
        match self.stored.get(&p) {
            Some((digest, _)) => blobs.read_small(digest, MAX_JSON).map(Some),
            None => Ok(None),
        }
    }

    fn blob(
        &mut self,
        path: &str,
        expected: Option<&str>,
        blobs: &BlobStore,
    ) -> Result<Option<(String, u64)>, OciError> {
        let p = self.target(path)?;
        if let Some(s) = self.stored.get(&p) {
            if let Some(e) = expected.filter(|e| *e != s.0) {
                return Err(OciError::DigestMismatch {
                    what: p,
                    expected: e.to_string(),
                    actual: s.0.clone(),
                });
            }
            return Ok(Some(s.clone()));
        }
        // A small JSON document under blobs/ was kept in memory: store it too.
        match self.small.get(&p) {
            Some(b) => blobs
                .ingest(&p, &mut &b[..], expected, None, MAX_JSON)
                .map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize("./blobs//sha256/ab").unwrap(), "blobs/sha256/ab");
        assert!(normalize("blobs/../../etc/passwd").is_err());
        assert_eq!(
            resolve_link("abc/../blobs/sha256/x").unwrap(),
            "blobs/sha256/x"
        );
        assert!(resolve_link("abc/../../x").is_err());
    }

    #[test]
    fn names_from_annotations() {
        let mut d = Descriptor {
            media_type: String::new(),
            digest: String::new(),
            size: 0,
            platform: None,
            annotations: Default::default(),
        };
        d.annotations.insert(REF_NAME.into(), "latest".into());
        assert_eq!(name_from(&d), Some(ImageName::Tag("latest".into())));
        d.annotations
            .insert(REF_NAME.into(), "docker.io/library/nginx:1".into());
        let want: Reference = "nginx:1".parse().unwrap();
        assert_eq!(name_from(&d), Some(ImageName::Reference(want)));
    }
}
