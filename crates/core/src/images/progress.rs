//! How far each running pull has got, in memory only (a restarted pull
//! starts from zero again): bytes and layers done of the totals the
//! manifest announced. Shown with the image while it is `pulling`.

use forkvm_oci::Progress;
use std::collections::HashMap;
use std::sync::Mutex;

/// Progress of one pull.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PullProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub layers_done: usize,
    pub layers_total: usize,
}

#[derive(Default)]
struct Pull {
    total: PullProgress,
    /// Bytes received per layer index (the layers stream in parallel).
    per_layer: HashMap<usize, u64>,
    sizes: HashMap<usize, u64>,
}

/// Progress of the pulls running now, by image name.
#[derive(Default)]
pub(crate) struct Pulls(Mutex<HashMap<String, Pull>>);

impl Pulls {
    pub fn report(&self, name: &str, p: Progress) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let pull = all.entry(name.to_string()).or_default();
        match p {
            Progress::Resolved { layers, bytes, .. } => {
                pull.total.layers_total = layers;
                pull.total.bytes_total = bytes;
            }
            Progress::Layer {
                index, done, total, ..
            } => {
                pull.per_layer.insert(index, done);
                pull.sizes.insert(index, total);
            }
            Progress::LayerCached { index, .. } | Progress::LayerDone { index, .. } => {
                let size = pull.sizes.get(&index).copied();
                if let Some(size) = size {
                    pull.per_layer.insert(index, size);
                }
                pull.total.layers_done += 1;
            }
        }
        pull.total.bytes_done = pull.per_layer.values().sum();
    }

    pub fn get(&self, name: &str) -> Option<PullProgress> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.get(name).map(|p| p.total)
    }

    pub fn done(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_streaming_in_parallel_add_up() {
        let p = Pulls::default();
        let d = || "sha256:x".to_string();
        p.report(
            "a",
            Progress::Resolved {
                manifest_digest: d(),
                layers: 3,
                bytes: 300,
            },
        );
        p.report(
            "a",
            Progress::LayerCached {
                index: 0,
                digest: d(),
            },
        );
        p.report(
            "a",
            Progress::Layer {
                index: 1,
                digest: d(),
                done: 50,
                total: 100,
            },
        );
        p.report(
            "a",
            Progress::Layer {
                index: 2,
                digest: d(),
                done: 20,
                total: 100,
            },
        );
        let now = p.get("a").unwrap();
        assert_eq!((now.bytes_done, now.layers_done), (70, 1));
        p.report(
            "a",
            Progress::LayerDone {
                index: 1,
                digest: d(),
            },
        );
        assert_eq!(p.get("a").unwrap().bytes_done, 120);
        assert_eq!(p.get("a").unwrap().layers_total, 3);
        p.done("a");
        assert_eq!(p.get("a"), None);
    }
}
