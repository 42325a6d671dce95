//! A fake image backend: a "registry" of images a test publishes, pulls
//! a test can hold at a gate, conversions that write a small file.

use crate::images::{ImageBackend, OciFuture, ProgressFn};
use forkvm_oci::{
    Compression, Credentials, Fetched, ImageConfig, ImageName, Layer, OciError, Reference,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

#[derive(Default)]
struct State {
    /// Reference (normalized) → its image.
    published: HashMap<String, Fetched>,
    /// Images that need credentials: reference → the ones that work.
    private: HashMap<String, Credentials>,
    pulls: usize,
    converts: usize,
    /// The "blob store": digests of what pulls and imports fetched.
    blobs: std::collections::BTreeSet<String>,
}

pub(crate) struct FakeImages {
    st: Mutex<State>,
    /// Pulls wait here for a permit while a test holds the gate.
    gate: Arc<Semaphore>,
}

impl Default for FakeImages {
    fn default() -> Self {
        Self {
            st: Mutex::default(),
            gate: Arc::new(Semaphore::new(GATE)),
        }
    }
}

/// A sha256-shaped digest derived from `s` (the fake never hashes content).
fn fake_digest(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("sha256:{h:016x}{:048x}", 0)
}

/// More pulls than any test starts.
const GATE: usize = 1 << 20;

impl FakeImages {
    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `reference` with `cmd`; returns its manifest digest.
    pub fn publish(&self, reference: &str, cmd: &[&str]) -> String {
        let r: Reference = reference.parse().unwrap();
        let d = fake_digest(&r.to_string());
        let f = Fetched {
            manifest_digest: d.clone(),
            config_digest: fake_digest(&format!("{r}/config")),
            config: ImageConfig {
                cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
                env: vec!["PATH=/usr/bin:/bin".into()],
                platform: "linux/amd64".into(),
                ..Default::default()
            },
            layers: vec![Layer {
                digest: fake_digest(&format!("{r}/layer")),
                size: 1,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                compression: Compression::None,
                diff_id: None,
            }],
        };
        self.st().published.insert(r.to_string(), f);
        d
    }

    /// Only these credentials may pull `reference`.
    pub fn require_credentials(&self, reference: &str, user: &str, password: &str) {
        let r: Reference = reference.parse().unwrap();
        self.st()
            .private
            .insert(r.to_string(), Credentials::basic(user, password));
    }

    /// Only this bearer token may pull `reference`.
    pub fn require_token(&self, reference: &str, token: &str) {
        let r: Reference = reference.parse().unwrap();
        self.st()
            .private
            .insert(r.to_string(), Credentials::bearer(token));
    }

    /// Holds every pull until [`FakeImages::open_gate`].
    pub fn close_gate(&self) {
        self.gate.forget_permits(GATE);
    }

    pub fn open_gate(&self) {
        self.gate.add_permits(GATE);
    }

    pub fn pulls(&self) -> usize {
        self.st().pulls
    }

    pub fn converts(&self) -> usize {
        self.st().converts
    }

    /// The blobs the "store" keeps.
    pub fn stored_blobs(&self) -> Vec<String> {
        self.st().blobs.iter().cloned().collect()
    }
}

impl ImageBackend for FakeImages {
    fn blobs(&self) -> Vec<String> {
        self.st().blobs.iter().cloned().collect()
    }

    fn remove_blobs(&self, digests: &[String]) {
        let mut st = self.st();
        for d in digests {
            st.blobs.remove(d);
        }
    }

    fn pull<'a>(
        &'a self,
        r: &'a Reference,
        creds: Option<Credentials>,
        progress: &'a ProgressFn<'a>,
    ) -> OciFuture<'a, Fetched> {
        Box::pin(async move {
            progress(forkvm_oci::Progress::Resolved {
                manifest_digest: fake_digest(&r.to_string()),
                layers: 1,
                bytes: 1,
            });
            let _permit = self.gate.acquire().await;
            let mut st = self.st();
            st.pulls += 1;
            if let Some(want) = st.private.get(&r.to_string())
                && creds.as_ref() != Some(want)
            {
                return Err(OciError::Unauthorized {
                    registry: r.registry.clone(),
                    repository: r.repository.clone(),
                    source: None,
                });
            }
            let f =
                st.published
                    .get(&r.to_string())
                    .cloned()
                    .ok_or_else(|| OciError::NotFound {
                        registry: r.registry.clone(),
                        what: format!("{r}"),
                        source: None,
                    })?;
            st.blobs.extend(crate::images::blobs_of(&f));
            Ok(f)
        })
    }

    fn import<'a>(&'a self, path: &'a Path) -> OciFuture<'a, (Option<ImageName>, Fetched)> {
        Box::pin(async move {
            // The "archive" holds the reference it names.
            let text = std::fs::read_to_string(path).map_err(|e| OciError::Io {
                op: "reading",
                path: path.to_path_buf(),
                source: e,
            })?;
            let r: Reference = text.trim().parse()?;
            let f = self.st().published.get(&r.to_string()).cloned();
            let f = f.ok_or_else(|| OciError::InvalidInput(format!("bad archive {text}")))?;
            self.st().blobs.extend(crate::images::blobs_of(&f));
            Ok((Some(ImageName::Reference(r)), f))
        })
    }

    fn convert<'a>(&'a self, _f: &'a Fetched, out: &'a Path) -> OciFuture<'a, u64> {
        Box::pin(async move {
            self.st().converts += 1;
            std::fs::write(out, b"erofs").map_err(|e| OciError::Io {
                op: "writing",
                path: out.to_path_buf(),
                source: e,
            })?;
            Ok(5)
        })
    }
}
