//! Manifests, indexes, image configs and media types, shared by registry pulls and
//! archive imports: parse with bounds, choose linux/amd64, describe the layers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::OciError;
use crate::reference::parse_digest;

/// Manifest, index and config documents larger than this are refused.
pub const MAX_JSON: u64 = 4 << 20;
/// Images with more layers than this are refused (Docker's own limit is 127).
pub const MAX_LAYERS: usize = 256;
/// The only platform forkvm guests run.
pub const PLATFORM: &str = "linux/amd64";

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// What a registry is told we accept for manifests.
pub(crate) const MANIFEST_TYPES: [&str; 4] =
    [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer media type; anything else is unsupported.
    pub fn of_media_type(media_type: &str) -> Result<Compression, OciError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
            other => Err(OciError::media("layer", other)),
        }
    }
}

/// One layer of an image, its blob in the [`crate::BlobStore`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Digest of the (compressed) blob.
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    pub media_type: String,
    pub compression: Compression,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`), checked on unpack.
    pub diff_id: Option<String>,
}

/// What the guest needs from the image config to run the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// `os/architecture`, always `linux/amd64` for an accepted image.
    pub platform: String,
}

/// A resolved image: its manifest, config and layers, every blob in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetched {
    /// Digest of the platform manifest (not of an index that led to it).
    pub manifest_digest: String,
    pub config_digest: String,
    pub config: ImageConfig,
    /// In application order, lowest first.
    pub layers: Vec<Layer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    fn name(&self) -> String {
        match &self.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", self.os, self.architecture),
            _ => format!("{}/{}", self.os, self.architecture),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDoc {
    schema_version: Option<i64>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

/// A parsed manifest document.
#[derive(Debug)]
pub(crate) enum Doc {
    Manifest {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    Index(Vec<Descriptor>),
}

/// Parses a manifest or index. `content_type` (from HTTP or a descriptor) is used
/// when the document does not name its own media type.
pub(crate) fn parse_doc(
    bytes: &[u8],
    content_type: Option<&str>,
    what: &str,
) -> Result<Doc, OciError> {
    check_json_size(bytes.len() as u64, what)?;
    let raw: RawDoc = serde_json::from_slice(bytes)
        .map_err(|e| OciError::bad_src(what, "manifest is not valid JSON", e))?;
    if raw.schema_version != Some(2) {
        return Err(OciError::media(
            what,
            format!("schemaVersion {:?}", raw.schema_version),
        ));
    }
    let media_type = raw
        .media_type
        .as_deref()
        .filter(|m| !m.is_empty())
        .or(content_type.map(|c| c.split(';').next().unwrap_or(c).trim()))
        .unwrap_or("");
    let is_index = match media_type {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        // Untyped documents (allowed by OCI): decide by shape.
        "" | "application/json" | "application/octet-stream" => raw.manifests.is_some(),
        other => return Err(OciError::media(what, other)),
    };
    if is_index {
        let entries = raw
            .manifests
            .ok_or_else(|| OciError::bad(what, "index has no \"manifests\""))?;
        return Ok(Doc::Index(entries));
    }
    let config = raw
        .config
        .ok_or_else(|| OciError::bad(what, "manifest has no config"))?;
    let layers = raw.layers.unwrap_or_default();
    if layers.len() > MAX_LAYERS {
        return Err(OciError::TooLarge {
            what: format!("layer count of {what}"),
            actual: layers.len() as u64,
            limit: MAX_LAYERS as u64,
        });
    }
    Ok(Doc::Manifest { config, layers })
}

/// Picks the linux/amd64 entry of an index. An index whose single entry names no
/// platform (common in OCI layouts) yields that entry; the config is checked later.
pub(crate) fn select_platform(entries: &[Descriptor]) -> Result<&Descriptor, OciError> {
    let manifests: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| matches!(d.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST | ""))
        .collect();
    let amd64 = manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    if let Some(d) = amd64 {
        return Ok(d);
    }
    if let [only] = manifests.as_slice()
        && only.platform.is_none()
    {
        return Ok(only);
    }
    let mut offered: Vec<String> = manifests
        .iter()
        .filter_map(|d| d.platform.as_ref().map(Platform::name))
        .filter(|p| p != "unknown/unknown")
        .collect();
    offered.dedup();
    if offered.is_empty() {
        offered.push("no platform".into());
    }
    Err(OciError::UnsupportedPlatform { offered })
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<RawRunConfig>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRunConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Turns a manifest and its config document into a [`Fetched`]: checks the media
/// types, the platform, the digests' syntax and that diff_ids match the layers.
pub(crate) fn describe(
    manifest_digest: &str,
    config_desc: &Descriptor,
    layers: &[Descriptor],
    config_bytes: &[u8],
) -> Result<Fetched, OciError> {
    if !matches!(config_desc.media_type.as_str(), OCI_CONFIG | DOCKER_CONFIG) {
        return Err(OciError::media("image config", &config_desc.media_type));
    }
    let raw: RawConfig = serde_json::from_slice(config_bytes)
        .map_err(|e| OciError::bad_src("image config", "not valid JSON", e))?;
    if raw.os != "linux" || raw.architecture != "amd64" {
        let platform = Platform {
            os: raw.os.clone(),
            architecture: raw.architecture.clone(),
            variant: raw.variant.clone(),
        };
        return Err(OciError::UnsupportedPlatform {
            offered: vec![platform.name()],
        });
    }
    let diff_ids = raw.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != layers.len() {
        return Err(OciError::bad(
            "image config",
            format!(
                "lists {} diff_ids for {} layers",
                diff_ids.len(),
                layers.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(layers.len());
    for (i, (d, diff_id)) in layers.iter().zip(diff_ids).enumerate() {
        let what = format!("layer {i}");
        check_digest(&d.digest, &what)?;
        check_digest(&diff_id, &format!("diff_id of {what}"))?;
        out.push(Layer {
            digest: d.digest.clone(),
            size: descriptor_size(d, &what)?,
            media_type: d.media_type.clone(),
            compression: Compression::of_media_type(&d.media_type)?,
            diff_id: Some(diff_id),
        });
    }
    let run = raw.config.unwrap_or_default();
    Ok(Fetched {
        manifest_digest: manifest_digest.to_string(),
        config_digest: config_desc.digest.clone(),
        config: ImageConfig {
            entrypoint: run.entrypoint,
            cmd: run.cmd,
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            user: run.user.filter(|u| !u.is_empty()),
            labels: run.labels.unwrap_or_default(),
            platform: PLATFORM.to_string(),
        },
        layers: out,
    })
}

pub(crate) fn check_digest(digest: &str, what: &str) -> Result<(), OciError> {
    parse_digest(digest)
        .map(|_| ())
        .map_err(|r| OciError::bad(what, format!("digest {digest:?}: {r}")))
}

pub(crate) fn descriptor_size(d: &Descriptor, what: &str) -> Result<u64, OciError> {
    u64::try_from(d.size).map_err(|_| OciError::bad(what, format!("negative size {}", d.size)))
}

pub(crate) fn check_json_size(len: u64, what: &str) -> Result<(), OciError> {
    if len > MAX_JSON {
        return Err(OciError::TooLarge {
            what: what.to_string(),
            actual: len,
            limit: MAX_JSON,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(platform: Option<(&str, &str)>) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "1".repeat(64)),
            size: 10,
            platform: platform.map(|(os, arch)| Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn platform_selection() {
        let entries = [
            desc(Some(("linux", "arm64"))),
            desc(Some(("linux", "amd64"))),
        ];
        assert!(select_platform(&entries).is_ok());
        let entries = [
            desc(Some(("linux", "arm64"))),
            desc(Some(("windows", "amd64"))),
        ];
        let e = select_platform(&entries).unwrap_err();
        assert_eq!(e.code(), "unsupported_platform");
        let msg = e.to_string();
        assert!(
            msg.contains("linux/arm64") && msg.contains("windows/amd64"),
            "{msg}"
        );
        assert!(select_platform(&[desc(None)]).is_ok());
    }

    #[test]
    fn media_types() {
        assert_eq!(
            Compression::of_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip")
                .unwrap(),
            Compression::Gzip
        );
        let e = Compression::of_media_type(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        );
        assert_eq!(e.unwrap_err().code(), "unsupported_media_type");
        let v1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert_eq!(
            parse_doc(v1, None, "m").unwrap_err().code(),
            "unsupported_media_type"
        );
        let odd = br#"{"schemaVersion":2,"mediaType":"application/vnd.foo"}"#;
        assert_eq!(
            parse_doc(odd, None, "m").unwrap_err().code(),
            "unsupported_media_type"
        );
    }

    #[test]
    fn too_many_layers_refused() {
        let layer = format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{}","size":1}}"#,
            "2".repeat(64)
        );
        let layers = vec![layer; MAX_LAYERS + 1].join(",");
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"sha256:{}","size":1}},"layers":[{layers}]}}"#,
            "3".repeat(64)
        );
        assert_eq!(
            parse_doc(doc.as_bytes(), None, "m").unwrap_err().code(),
            "too_large"
        );
    }

    #[test]
    fn config_checks() {
        let cfg_desc = Descriptor {
            media_type: OCI_CONFIG.into(),
            ..desc(None)
        };
        let arm = br#"{"os":"linux","architecture":"arm64","rootfs":{"diff_ids":[]}}"#;
        let e = describe("sha256:x", &cfg_desc, &[], arm).unwrap_err();
        assert_eq!(e.code(), "unsupported_platform");
        let ok = br#"{"os":"linux","architecture":"amd64","config":{"Cmd":["sh"],"Env":["A=1"],"WorkingDir":"/w"},"rootfs":{"diff_ids":[]}}"#;
        let f = describe("sha256:x", &cfg_desc, &[], ok).unwrap();
        assert_eq!(f.config.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(f.config.working_dir.as_deref(), Some("/w"));
        assert_eq!(f.config.platform, "linux/amd64");
        let mismatch =
            br#"{"os":"linux","architecture":"amd64","rootfs":{"diff_ids":["sha256:1"]}}"#;
        assert_eq!(
            describe("d", &cfg_desc, &[], mismatch).unwrap_err().code(),
            "bad_archive"
        );
    }
}
