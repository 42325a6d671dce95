//! OCI images: the image as returned by the API (hypeman's `Image`), the
//! pull and import parameters and the list filter.

use crate::error::ApiError;
use chrono::{DateTime, Utc};
use forkvm_core as core;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// Image status (hypeman's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageStatus {
    Pending,
    Pulling,
    Converting,
    Ready,
    Failed,
}

impl From<core::ImageStatus> for ImageStatus {
    fn from(s: core::ImageStatus) -> Self {
        match s {
            core::ImageStatus::Pending => Self::Pending,
            core::ImageStatus::Pulling => Self::Pulling,
            core::ImageStatus::Converting => Self::Converting,
            core::ImageStatus::Ready => Self::Ready,
            core::ImageStatus::Failed => Self::Failed,
        }
    }
}

/// An OCI image, converted once into a read-only root disk.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// Normalized reference (`docker.io/library/nginx:latest`).
    pub name: String,
    /// Resolved manifest digest; empty until resolved.
    pub digest: String,
    pub status: ImageStatus,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// forkvm: a stable code for `error` (`not_found`, `unauthorized`,
    /// `digest_mismatch`, `interrupted`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// `os/arch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Pulls waiting ahead of this one (pending images only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    /// forkvm: how far the pull has got (while `pulling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_progress: Option<PullProgress>,
    /// Root disk size in bytes (once ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl From<core::ImageRecord> for Image {
    fn from(r: core::ImageRecord) -> Self {
        // The config (and so env) is known once the manifest is resolved.
        let resolved = r.digest.is_some();
        let env = r
            .config
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>();
        Image {
            digest: r.digest.unwrap_or_default(),
            status: r.status.into(),
            created_at: r.created_at,
            cmd: r.config.cmd,
            entrypoint: r.config.entrypoint,
            env: resolved.then_some(env),
            working_dir: r.config.working_dir,
            error: r.error,
            error_code: r.error_code,
            platform: r.platform,
            queue_position: r.queue_position,
            pull_progress: r.progress.map(|p| PullProgress {
                bytes_done: p.bytes_done,
                bytes_total: p.bytes_total,
                layers_done: p.layers_done,
                layers_total: p.layers_total,
            }),
            size_bytes: r.size_bytes,
            tags: r.tags,
            name: r.name,
        }
    }
}

/// Bytes and layers of a running pull, of the totals its manifest gives.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
pub struct PullProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub layers_done: usize,
    pub layers_total: usize,
}

/// Registry credentials for one pull; never stored or logged.
#[derive(Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct PullCredentials {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A bearer token, sent as `Authorization: Bearer <token>` as it is;
    /// instead of username and password, not with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_token: Option<String>,
}

impl PullCredentials {
    /// Basic (username and password) or bearer (a token); `None` when
    /// empty. Half a pair, or a token with a pair, is a 400.
    fn into_core(self) -> Result<Option<core::RegistryCredentials>, ApiError> {
        let token = self.registry_token.filter(|t| !t.is_empty());
        match (self.username, self.password, token) {
            (None, None, None) => Ok(None),
            (None, None, Some(t)) => Ok(Some(core::RegistryCredentials::bearer(t))),
            (Some(u), Some(p), None) if !u.is_empty() => {
                Ok(Some(core::RegistryCredentials::basic(u, p)))
            }
            (_, _, Some(_)) => Err(ApiError::invalid(
                "credentials take either a registry_token or a username and password, not both",
            )),
            _ => Err(ApiError::invalid(
                "credentials need both a username and a password",
            )),
        }
    }
}

impl std::fmt::Debug for PullCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// `POST /images` body (hypeman's ImageCreateParams).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageCreateParams {
    /// OCI image reference (`nginx:1.25`, `registry:5000/team/app@sha256:…`).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<PullCredentials>,
    /// `os/arch[/variant]`; only `linux/amd64` runs here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// Fields forkvm does not support: 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "super::Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: super::Unsupported,
}

impl ImageCreateParams {
    pub fn into_core(self) -> Result<core::PullRequest, ApiError> {
        let credentials = self
            .credentials
            .map(|c| c.into_core())
            .transpose()?
            .flatten();
        Ok(core::PullRequest {
            name: self.name,
            credentials,
            platform: self.platform,
            tags: self.tags.unwrap_or_default(),
        })
    }
}

/// `POST /images/import` body (forkvm): an OCI layout (directory, `.tar`,
/// `.tar.gz`) or a `docker save` archive on the daemon's host.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageImportParams {
    /// Absolute path on the daemon's host.
    pub path: String,
    /// The image's name; default: the name the archive gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// Fields forkvm does not support: 400 `unsupported` naming them.
    #[serde(flatten, default, skip_serializing_if = "super::Unsupported::is_none")]
    #[schema(ignore)]
    pub unsupported: super::Unsupported,
}

/// `GET /images` filter: `?tags[key]=value` as the hypeman client sends it.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
pub struct ImageListQuery {
    /// Only images with every one of these tags.
    #[serde(flatten)]
    #[param(value_type = Option<Object>)]
    pub tags: BTreeMap<String, String>,
}

impl ImageListQuery {
    /// The tag filter from `tags[key]=value` pairs; other keys are a 400.
    pub fn tag_filter(&self) -> Result<BTreeMap<String, String>, ApiError> {
        tag_filter(&self.tags)
    }
}

/// A tag filter from the query's `tags[key]=value` pairs (hypeman's
/// deepObject style); any other key is a 400.
pub fn tag_filter(pairs: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        let key = k
            .strip_prefix("tags[")
            .and_then(|r| r.strip_suffix(']'))
            .ok_or_else(|| ApiError::invalid(format!("unknown query parameter {k:?}")))?;
        out.insert(key.to_string(), v.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_print_their_secret() {
        let c = PullCredentials {
            username: Some("u".into()),
            password: Some("hunter2".into()),
            registry_token: Some("tok".into()),
        };
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2") && !s.contains("tok"), "{s}");
    }

    fn params(c: PullCredentials) -> ImageCreateParams {
        ImageCreateParams {
            unsupported: Default::default(),
            name: "a".into(),
            credentials: Some(c),
            platform: None,
            tags: None,
        }
    }

    #[test]
    fn half_credentials_and_mixed_ones_are_refused() {
        let only_user = PullCredentials {
            username: Some("u".into()),
            ..Default::default()
        };
        assert!(params(only_user).into_core().is_err());
        let both = PullCredentials {
            username: Some("u".into()),
            password: Some("p".into()),
            registry_token: Some("t".into()),
        };
        let e = params(both).into_core().unwrap_err();
        assert!(format!("{e:?}").contains("not both"), "{e:?}");
        assert!(
            params(PullCredentials::default())
                .into_core()
                .unwrap()
                .credentials
                .is_none()
        );
    }

    #[test]
    fn a_token_is_bearer_and_a_pair_is_basic() {
        let token = PullCredentials {
            registry_token: Some("t0k".into()),
            ..Default::default()
        };
        let c = params(token).into_core().unwrap().credentials;
        assert_eq!(c, Some(core::RegistryCredentials::bearer("t0k")));
        let pair = PullCredentials {
            username: Some("u".into()),
            password: Some("p".into()),
            registry_token: Some(String::new()),
        };
        let c = params(pair).into_core().unwrap().credentials;
        assert_eq!(c, Some(core::RegistryCredentials::basic("u", "p")));
    }
}
