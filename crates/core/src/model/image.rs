//! OCI images as forkvm keeps them: a record per normalized reference,
//! converted once per manifest digest into a read-only root filesystem.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where an image is on its way to being usable (hypeman's statuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageStatus {
    /// Recorded, waiting for its turn.
    Pending,
    /// Manifest and layers being fetched (and verified).
    Pulling,
    /// Layers being applied and the root filesystem built.
    Converting,
    Ready,
    /// See `error`.
    Failed,
}

impl ImageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Pulling => "pulling",
            Self::Converting => "converting",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }

    /// Still on its way (a pull or import owns it).
    pub fn in_progress(self) -> bool {
        matches!(self, Self::Pending | Self::Pulling | Self::Converting)
    }
}

/// How the image's process runs, from its config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRunConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `KEY=VALUE`, in the image's order.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// An image known to forkvm.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The normalized reference (`docker.io/library/nginx:latest`), or the
    /// name an imported image was given.
    pub name: String,
    /// The manifest digest, once resolved.
    pub digest: Option<String>,
    pub status: ImageStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// A stable code for `error` (`not_found`, `unauthorized`,
    /// `digest_mismatch`, `interrupted`, …).
    #[serde(default)]
    pub error_code: Option<String>,
    /// Size of the root filesystem, once ready.
    pub size_bytes: Option<u64>,
    pub config: ImageRunConfig,
    /// `os/arch`, once resolved.
    pub platform: Option<String>,
    /// User-defined key-value tags.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// The blobs it was made of (manifest, config, layers): kept in the
    /// pull cache while an image names them.
    #[serde(default)]
    pub blobs: Vec<String>,
    /// Where it comes from: pulled again or imported again after a restart
    /// that interrupted it.
    #[serde(default)]
    pub source: ImageSource,
    pub created_at: DateTime<Utc>,
    /// Pulls waiting ahead of this one (pending images only; computed when
    /// read, never stored).
    #[serde(skip)]
    pub queue_position: Option<usize>,
    /// How far a running pull has got (computed when read, never stored).
    #[serde(skip)]
    pub progress: Option<crate::images::PullProgress>,
    /// Which run of the pipeline owns the record: a run that finds another
    /// attempt here (started over after a restart, or retried) stops.
    #[serde(default)]
    pub attempt: String,
}

/// Where an image's content comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ImageSource {
    /// The registry its name refers to.
    #[default]
    Registry,
    /// The registry, with credentials that were never stored: an interrupted
    /// pull cannot resume by itself.
    RegistryWithCredentials,
    /// An OCI layout or `docker save` archive on the daemon's host.
    Archive { path: std::path::PathBuf },
}

impl ImageRecord {
    /// The hex part of the digest: names the root filesystem file.
    pub fn digest_hex(&self) -> Option<&str> {
        sha256_hex(self.digest.as_deref()?)
    }
}

/// The hex part of a `sha256:<64 hex>` digest (it names files on the host).
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let d = digest.strip_prefix("sha256:")?;
    (d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())).then_some(d)
}

/// The process an instance of an OCI image runs from the image's root:
/// the image's config with the create request's overrides applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Entrypoint followed by cmd.
    pub argv: Vec<String>,
    /// `KEY=VALUE`: the image's, then the request's (which win).
    pub env: Vec<String>,
    /// Empty: `/`.
    pub working_dir: String,
    /// OCI `user` (`uid[:gid]` or `name[:group]`); empty: root.
    pub user: String,
}

impl Workload {
    /// Docker's rules: an entrypoint given with the request replaces the
    /// image's and drops its cmd; a cmd given replaces the image's cmd;
    /// request variables override the image's of the same name.
    pub fn of(
        image: &ImageRunConfig,
        entrypoint: Option<&[String]>,
        cmd: Option<&[String]>,
        env: &std::collections::BTreeMap<String, String>,
    ) -> Self {
        let (ep, default_cmd) = match entrypoint {
            Some(e) => (e.to_vec(), Vec::new()),
            None => (
                image.entrypoint.clone().unwrap_or_default(),
                image.cmd.clone().unwrap_or_default(),
            ),
        };
        let mut argv = ep;
        argv.extend(cmd.map(<[String]>::to_vec).unwrap_or(default_cmd));
        let overridden = |kv: &String| kv.split_once('=').is_some_and(|(k, _)| env.contains_key(k));
        let mut vars: Vec<String> = image
            .env
            .iter()
            .filter(|kv| !overridden(kv))
            .cloned()
            .collect();
        vars.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        Workload {
            argv,
            env: vars,
            working_dir: image.working_dir.clone().unwrap_or_default(),
            user: image.user.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageRunConfig {
        ImageRunConfig {
            entrypoint: Some(vec!["/docker-entrypoint.sh".into()]),
            cmd: Some(vec!["nginx".into(), "-g".into()]),
            env: vec!["PATH=/usr/bin".into(), "A=1".into()],
            working_dir: Some("/srv".into()),
            user: Some("101:101".into()),
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn docker_override_rules() {
        let none = Default::default();
        let w = Workload::of(&image(), None, None, &none);
        assert_eq!(w.argv, s(&["/docker-entrypoint.sh", "nginx", "-g"]));
        assert_eq!(
            (w.working_dir.as_str(), w.user.as_str()),
            ("/srv", "101:101")
        );
        let w = Workload::of(&image(), None, Some(&s(&["sh"])), &none);
        assert_eq!(w.argv, s(&["/docker-entrypoint.sh", "sh"]));
        let w = Workload::of(&image(), Some(&s(&["python3"])), None, &none);
        assert_eq!(
            w.argv,
            s(&["python3"]),
            "a new entrypoint drops the image's cmd"
        );
        let w = Workload::of(
            &image(),
            Some(&s(&["python3"])),
            Some(&s(&["-m", "x"])),
            &none,
        );
        assert_eq!(w.argv, s(&["python3", "-m", "x"]));
        let env = [("A".to_string(), "2".to_string())].into();
        let w = Workload::of(&image(), None, None, &env);
        assert_eq!(w.env, s(&["PATH=/usr/bin", "A=2"]));
    }
}
