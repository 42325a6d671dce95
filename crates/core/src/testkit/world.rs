use super::*;
use crate::clock::SystemClock;
use crate::config::Config;
use crate::error::Result;
use crate::manager::{Deps, Manager};
use crate::model::{CreateRequest, Instance, InstanceState};
use forkvm_vmm::Accel;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A manager over fakes and temporary directories.
pub(crate) struct World {
    pub mgr: Arc<Manager>,
    pub hv: Arc<FakeHypervisor>,
    pub net: Arc<FakeHostNet>,
    pub agent: Arc<FakeAgent>,
    pub images: Arc<FakeImages>,
    pub cfg: Config,
    /// Holds the world's directories until it is dropped.
    _dir: tempfile::TempDir,
}

fn write_default_image(data_dir: &Path) {
    let dir = data_dir.join("images").join("default");
    std::fs::create_dir_all(&dir).unwrap();
    let img = forkvm_image::GuestImage {
        name: "default".into(),
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initrd.cpio"),
        kernel_version: "6.1.0-fake".into(),
        modules: vec![],
        built_at: chrono::Utc::now(),
        inputs_digest: "0".repeat(64),
        kernel_package: "linux-image-fake".into(),
        kernel_package_version: "1".into(),
    };
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&img).unwrap()).unwrap();
}

impl World {
    pub async fn new() -> World {
        Self::with(|_| {}).await
    }

    /// A world whose configuration `tweak` adjusts first.
    pub async fn with(tweak: impl FnOnce(&mut Config)) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::new(
            dir.path().join("data"),
            dir.path().join("mem"),
            "fakebr0",
            "10.99.0.0/24",
            "/nonexistent/qemu",
        );
        cfg.memory_budget_mb = Some(64 * 1024);
        // Deterministic tests: promotion is asked for explicitly.
        cfg.promote_after_handover = false;
        cfg.handoff_timeout = Duration::from_millis(1500);
        cfg.mailbox_ack_timeout = Duration::from_millis(300);
        // The gateway address exists in no namespace of a unit test.
        cfg.test_hooks.ack_bind_addr = Some(Ipv4Addr::LOCALHOST);
        // Small disk templates (mkfs.ext4 runs for real).
        cfg.default_overlay_mib = 64;
        tweak(&mut cfg);
        write_default_image(&cfg.data_dir);
        let (hv, net, agent) = (
            Arc::new(FakeHypervisor::default()),
            Arc::new(FakeHostNet::default()),
            Arc::new(FakeAgent::default()),
        );
        let images = Arc::new(FakeImages::default());
        let mgr = Self::open(&cfg, &hv, &net, &agent, &images).await.unwrap();
        World {
            mgr,
            hv,
            net,
            agent,
            images,
            cfg,
            _dir: dir,
        }
    }

    async fn open(
        cfg: &Config,
        hv: &Arc<FakeHypervisor>,
        net: &Arc<FakeHostNet>,
        agent: &Arc<FakeAgent>,
        images: &Arc<FakeImages>,
    ) -> Result<Arc<Manager>> {
        let deps = Deps {
            hv: hv.clone(),
            host_net: net.clone(),
            agent: agent.clone(),
            clock: Arc::new(SystemClock),
            accel: Accel::Tcg,
            images: images.clone(),
        };
        Manager::open_with(cfg.clone(), deps).await
    }

    /// A second manager on the same state and the same outside world, as
    /// after a daemon restart (adoption runs).
    pub async fn restart(&mut self) {
        self.mgr = Self::open(&self.cfg, &self.hv, &self.net, &self.agent, &self.images)
            .await
            .unwrap();
    }

    pub async fn running(&self, name: &str) -> Instance {
        let i = self
            .mgr
            .create(CreateRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(i.state, InstanceState::Running);
        i
    }

    /// OCI image `name` published by the fake registry and pulled until
    /// ready (its root filesystem is a small file the fakes never read).
    pub async fn add_oci_image(&self, name: &str) -> crate::model::ImageRecord {
        self.images.publish(name, &["python3", "-m", "http.server"]);
        self.mgr
            .pull_image(crate::images::PullRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        self.image_settled(name).await
    }

    /// Image `name` once it is ready or failed.
    pub async fn image_settled(&self, name: &str) -> crate::model::ImageRecord {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let rec = self.mgr.get_image(name).await.unwrap();
            if !rec.status.in_progress() {
                return rec;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never settled: {rec:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A Running instance of OCI image `image`.
    pub async fn running_image(&self, name: &str, image: &str) -> Instance {
        let i = self
            .mgr
            .create(CreateRequest {
                name: name.into(),
                image: Some(image.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(i.state, InstanceState::Running);
        i
    }

    pub fn mem_file(&self, id: &str) -> PathBuf {
        self.cfg.mem_dir.join(format!("{id}.mem"))
    }

    /// The file of the base holding snapshot `sid`'s memory.
    pub fn base_file(&self, sid: &str) -> PathBuf {
        let snap = self
            .mgr
            .services()
            .store
            .find_snapshot(sid)
            .unwrap()
            .unwrap();
        crate::bases::path(self.mgr.services(), snap.base())
    }

    /// Nothing exists but what the instances named `names` own: records,
    /// allocations, TAP ports, VMs, memory files, instance directories and
    /// snapshots (of Standby instances only).
    pub async fn assert_only(&self, names: &[&str]) {
        let all = self.mgr.list().await.unwrap();
        let mut got: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
        got.sort();
        let mut want = names.to_vec();
        want.sort();
        assert_eq!(got, want, "instance records");
        let ids: HashSet<&str> = all.iter().map(|i| i.id.as_str()).collect();
        let store = &self.mgr.services().store;
        for kind in [
            crate::store::AllocKind::Ip,
            crate::store::AllocKind::Mac,
            crate::store::AllocKind::Tap,
        ] {
            for (v, owner) in store.allocated(kind).unwrap() {
                assert!(ids.contains(owner.as_str()), "{kind:?} {v} held by {owner}");
            }
        }
        let taps: HashSet<String> = all.iter().filter_map(|i| i.network.tap.clone()).collect();
        assert!(self.net.ports().is_subset(&taps), "{:?}", self.net.ports());
        for id in self.hv.live().keys() {
            assert!(ids.contains(id.as_str()), "VM of {id} still runs");
        }
        for e in std::fs::read_dir(&self.cfg.mem_dir).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = n.strip_suffix(".mem") {
                assert!(ids.contains(id), "memory file {n} left");
            }
        }
        for e in std::fs::read_dir(self.cfg.data_dir.join("instances"))
            .unwrap()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(ids.contains(n.as_str()), "instance directory {n} left");
        }
        let owners: HashSet<Option<String>> = self
            .mgr
            .list_snapshots()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.standby_of)
            .collect();
        for o in owners {
            assert!(
                o.is_some_and(|o| ids.contains(o.as_str())),
                "stray snapshot"
            );
        }
        // Bases: one file per record, each referred to by something.
        let bases = self.mgr.services().store.list_bases().unwrap();
        let refs = crate::bases::referenced(self.mgr.services()).unwrap();
        for b in &bases {
            assert!(refs.contains(&b.id), "base {} left without referents", b.id);
        }
        let files: Vec<String> = std::fs::read_dir(self.cfg.mem_dir.join("bases"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for f in &files {
            let id = f.strip_suffix(".mem").unwrap_or(f);
            assert!(
                bases.iter().any(|b| b.id == id),
                "base file {f} without a record: {bases:?}"
            );
        }
        self.assert_layers_consistent();
    }

    /// Disk layers: every record used by something and backed by its file,
    /// every file recorded.
    pub fn assert_layers_consistent(&self) {
        let svc = self.mgr.services();
        let layers = svc.store.list_layers().unwrap();
        let used = crate::layers::used(svc).unwrap();
        for l in &layers {
            assert!(used.contains(&l.id), "layer {} left unused", l.id);
            assert!(
                crate::layers::path(svc, &l.id).exists(),
                "layer {} has no file",
                l.id
            );
        }
        let dir = self.cfg.data_dir.join("layers");
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = n.strip_suffix(".qcow2") {
                assert!(
                    layers.iter().any(|l| l.id == id),
                    "layer file {n} without a record"
                );
            }
        }
    }
}
