//! OCI image pulls over a fake registry: statuses in order, failures with
//! codes, restarts mid-pull, deletion refused while in use, root disks
//! shared by names of one image and never left behind.

use crate::images::{ImageBackend, PullRequest, rootfs_path};
use crate::model::{CreateRequest, ImageSource, ImageStatus};
use crate::testkit::World;
use crate::{ErrorKind, RegistryCredentials};

fn pull(name: &str) -> PullRequest {
    PullRequest {
        name: name.into(),
        ..Default::default()
    }
}

fn rootfs_files(w: &World) -> Vec<String> {
    std::fs::read_dir(crate::images::rootfs_dir(w.mgr.services()))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_pull_is_queued_then_ready_with_the_image_config() {
    let w = World::new().await;
    let digest = w.images.publish("registry.test/app:1", &["/app", "serve"]);
    w.images.close_gate();
    let first = w.mgr.pull_image(pull("registry.test/app:1")).await.unwrap();
    assert!(first.status.in_progress(), "{first:?}");
    assert_eq!(first.name, "registry.test/app:1");
    // Asking again while it pulls returns the same record, no second pull.
    let again = w.mgr.pull_image(pull("registry.test/app:1")).await.unwrap();
    assert_eq!(again.name, first.name);
    // While it pulls, the image shows how far it has got.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = w.mgr.get_image("registry.test/app:1").await.unwrap();
        if let Some(p) = now.progress {
            assert_eq!((now.status, p.layers_total), (ImageStatus::Pulling, 1));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {now:?}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    w.images.open_gate();
    let rec = w.image_settled("registry.test/app:1").await;
    assert_eq!(rec.status, ImageStatus::Ready, "{rec:?}");
    assert_eq!(rec.digest.as_deref(), Some(digest.as_str()));
    assert_eq!(rec.config.cmd, Some(vec!["/app".into(), "serve".into()]));
    assert_eq!(rec.size_bytes, Some(5));
    assert_eq!(w.images.pulls(), 1);
    assert_eq!(rec.progress, None, "progress is shown while pulling only");
    assert!(rootfs_path(w.mgr.services(), rec.digest_hex().unwrap()).exists());
}

#[tokio::test]
async fn short_names_are_normalized_and_found_either_way() {
    let w = World::new().await;
    w.images
        .publish("docker.io/library/nginx:latest", &["nginx"]);
    let rec = w.mgr.pull_image(pull("nginx")).await.unwrap();
    assert_eq!(rec.name, "docker.io/library/nginx:latest");
    w.image_settled("nginx").await;
    let i = w
        .mgr
        .create(CreateRequest {
            name: "web".into(),
            image: Some("nginx:latest".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(i.image, "docker.io/library/nginx:latest");
    assert_eq!(i.workload.unwrap().argv, vec!["nginx".to_string()]);
}

#[tokio::test]
async fn bad_requests_are_refused_and_record_nothing() {
    let w = World::new().await;
    for (req, what) in [
        (pull("UPPER/case"), "invalid reference"),
        (
            PullRequest {
                platform: Some("linux/arm64".into()),
                ..pull("a:1")
            },
            "foreign platform",
        ),
        (
            PullRequest {
                platform: Some("linux".into()),
                ..pull("a:1")
            },
            "malformed platform",
        ),
    ] {
        let e = w.mgr.pull_image(req).await.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::Invalid, "{what}: {e}");
    }
    assert!(
        w.mgr
            .list_images(&Default::default())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn failures_are_recorded_with_a_code_and_a_retry_starts_over() {
    let w = World::new().await;
    w.mgr
        .pull_image(pull("registry.test/missing:1"))
        .await
        .unwrap();
    let rec = w.image_settled("registry.test/missing:1").await;
    assert_eq!(rec.status, ImageStatus::Failed);
    assert_eq!(rec.error_code.as_deref(), Some("not_found"), "{rec:?}");
    let e = w
        .mgr
        .create(CreateRequest {
            name: "x".into(),
            image: Some("registry.test/missing:1".into()),
            ..Default::default()
        })
        .await
        .expect_err("a failed image does not boot");
    assert_eq!(e.kind(), ErrorKind::Conflict);

    w.images.publish("registry.test/missing:1", &["true"]);
    w.mgr
        .pull_image(pull("registry.test/missing:1"))
        .await
        .unwrap();
    let rec = w.image_settled("registry.test/missing:1").await;
    assert_eq!(rec.status, ImageStatus::Ready, "{rec:?}");
    assert_eq!(rec.error, None);
}

#[tokio::test]
async fn credentials_are_used_for_one_pull_and_never_stored() {
    let w = World::new().await;
    w.images.publish("registry.test/private:1", &["x"]);
    w.images
        .require_credentials("registry.test/private:1", "u", "s3cret");
    w.mgr
        .pull_image(pull("registry.test/private:1"))
        .await
        .unwrap();
    let rec = w.image_settled("registry.test/private:1").await;
    assert_eq!(rec.error_code.as_deref(), Some("unauthorized"));
    w.mgr
        .pull_image(PullRequest {
            credentials: Some(RegistryCredentials::basic("u", "s3cret")),
            ..pull("registry.test/private:1")
        })
        .await
        .unwrap();
    let rec = w.image_settled("registry.test/private:1").await;
    assert_eq!(rec.status, ImageStatus::Ready);
    let db = std::fs::read(w.cfg.data_dir.join("forkvm.db")).unwrap();
    assert!(
        !db.windows(6).any(|x| x == b"s3cret"),
        "credentials reached the store"
    );
}

#[tokio::test]
async fn a_bearer_token_is_used_for_one_pull_and_never_stored() {
    let w = World::new().await;
    w.images.publish("registry.test/tok:1", &["x"]);
    w.images
        .require_token("registry.test/tok:1", "t0ken-s3cret");
    let with = |c| PullRequest {
        credentials: Some(c),
        ..pull("registry.test/tok:1")
    };
    for wrong in [
        RegistryCredentials::bearer("other"),
        RegistryCredentials::basic("t0ken-s3cret", "t0ken-s3cret"),
    ] {
        w.mgr.pull_image(with(wrong)).await.unwrap();
        let rec = w.image_settled("registry.test/tok:1").await;
        assert_eq!(rec.error_code.as_deref(), Some("unauthorized"), "{rec:?}");
    }
    let rec = w
        .mgr
        .pull_image(with(RegistryCredentials::bearer("t0ken-s3cret")))
        .await
        .unwrap();
    assert_eq!(rec.source, ImageSource::RegistryWithCredentials);
    let rec = w.image_settled("registry.test/tok:1").await;
    assert_eq!(rec.status, ImageStatus::Ready, "{rec:?}");
    let db = std::fs::read(w.cfg.data_dir.join("forkvm.db")).unwrap();
    assert!(
        !db.windows(12).any(|x| x == b"t0ken-s3cret"),
        "the token reached the store"
    );
}

#[tokio::test]
async fn a_restart_mid_pull_starts_it_over_but_not_one_with_credentials() {
    let mut w = World::new().await;
    w.images.publish("registry.test/a:1", &["a"]);
    w.images.publish("registry.test/b:1", &["b"]);
    w.images.close_gate();
    w.mgr.pull_image(pull("registry.test/a:1")).await.unwrap();
    w.mgr
        .pull_image(PullRequest {
            credentials: Some(RegistryCredentials::basic("u", "p")),
            ..pull("registry.test/b:1")
        })
        .await
        .unwrap();
    w.restart().await;
    w.images.open_gate();
    let a = w.image_settled("registry.test/a:1").await;
    assert_eq!(a.status, ImageStatus::Ready, "{a:?}");
    let b = w.image_settled("registry.test/b:1").await;
    assert_eq!(b.status, ImageStatus::Failed);
    assert_eq!(b.error_code.as_deref(), Some("interrupted"), "{b:?}");
}

#[tokio::test]
async fn pulls_beyond_the_parallel_limit_wait_in_order() {
    let w = World::with(|c| c.image_pulls_parallel = 1).await;
    w.images.close_gate();
    for n in [
        "registry.test/q:1",
        "registry.test/q:2",
        "registry.test/q:3",
    ] {
        w.images.publish(n, &["q"]);
        w.mgr.pull_image(pull(n)).await.unwrap();
    }
    // One holds the slot; the other two wait behind it, in order.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let positions = loop {
        let all = w.mgr.list_images(&Default::default()).await.unwrap();
        let p: Vec<Option<usize>> = all.iter().map(|i| i.queue_position).collect();
        if p == [None, Some(0), Some(1)] || std::time::Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert_eq!(positions, [None, Some(0), Some(1)]);
    w.images.open_gate();
    for n in [
        "registry.test/q:1",
        "registry.test/q:2",
        "registry.test/q:3",
    ] {
        assert_eq!(w.image_settled(n).await.status, ImageStatus::Ready);
    }
}

#[tokio::test]
async fn delete_is_refused_while_used_and_removes_the_disk_after() {
    let w = World::new().await;
    let rec = w.add_oci_image("registry.test/app:1").await;
    w.running_image("vm", "registry.test/app:1").await;
    let snap = w.mgr.create_snapshot("vm", Some("s".into())).await.unwrap();
    let e = w
        .mgr
        .delete_image("registry.test/app:1")
        .await
        .expect_err("in use");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.to_string().contains("instance vm"), "{e}");
    w.mgr.delete("vm").await.unwrap();
    let e = w
        .mgr
        .delete_image("registry.test/app:1")
        .await
        .expect_err("snapshot");
    assert!(e.to_string().contains("snapshot s"), "{e}");
    w.mgr.delete_snapshot(&snap.id).await.unwrap();
    w.mgr.delete_image("registry.test/app:1").await.unwrap();
    assert!(!rootfs_path(w.mgr.services(), rec.digest_hex().unwrap()).exists());
    let e = w
        .mgr
        .get_image("registry.test/app:1")
        .await
        .expect_err("gone");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(rootfs_files(&w).is_empty());
}

#[tokio::test]
async fn orphan_root_disks_are_removed_at_start() {
    let mut w = World::new().await;
    let rec = w.add_oci_image("registry.test/app:1").await;
    let orphan = rootfs_path(w.mgr.services(), &"e".repeat(64));
    std::fs::write(&orphan, b"left by a crash").unwrap();
    w.restart().await;
    assert!(!orphan.exists());
    assert_eq!(
        rootfs_files(&w),
        vec![format!("{}.erofs", rec.digest_hex().unwrap())]
    );
}

#[tokio::test]
async fn an_archive_is_imported_under_its_own_name_or_a_given_one() {
    let w = World::new().await;
    w.images.publish("registry.test/arch:1", &["x"]);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    std::fs::write(&archive, "registry.test/arch:1").unwrap();
    let rec = w
        .mgr
        .import_image(&archive, None, Default::default())
        .await
        .unwrap();
    assert_eq!(
        (rec.name.as_str(), rec.status),
        ("registry.test/arch:1", ImageStatus::Ready)
    );
    let other = w
        .mgr
        .import_image(&archive, Some("mine:2"), Default::default())
        .await
        .unwrap();
    assert_eq!(other.name, "docker.io/library/mine:2");
    assert_eq!(other.digest, rec.digest);
    assert_eq!(w.images.converts(), 1, "one root disk per digest");
    w.mgr.delete_image("mine:2").await.unwrap();
    assert!(
        rootfs_path(w.mgr.services(), rec.digest_hex().unwrap()).exists(),
        "the other name still uses the disk"
    );
    let e = w
        .mgr
        .import_image(
            std::path::Path::new("relative.tar"),
            None,
            Default::default(),
        )
        .await
        .expect_err("relative");
    assert_eq!(e.kind(), ErrorKind::Invalid);
}

#[tokio::test]
async fn an_image_instance_starts_its_workload_with_the_overrides() {
    let w = World::new().await;
    w.add_oci_image("registry.test/app:1").await;
    let i = w
        .mgr
        .create(CreateRequest {
            name: "vm".into(),
            image: Some("registry.test/app:1".into()),
            cmd: Some(vec!["-m".into(), "http.server".into(), "9000".into()]),
            env: [("MODE".to_string(), "test".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let started = w.agent.workloads();
    assert_eq!(started.len(), 1);
    let (id, spec) = &started[0];
    assert_eq!(id, &i.id);
    assert_eq!(
        spec.argv,
        ["-m", "http.server", "9000"],
        "cmd replaces the image's"
    );
    assert!(
        spec.env.contains(&"MODE=test".to_string()),
        "{:?}",
        spec.env
    );
    assert!(!spec.host_root);
    // A guest-image instance runs its entrypoint from the initramfs.
    w.running("plain").await;
    assert_eq!(w.agent.workloads().len(), 1);
}

#[tokio::test]
async fn a_workload_the_guest_refuses_fails_the_create_and_leaves_nothing() {
    let w = World::new().await;
    w.add_oci_image("registry.test/app:1").await;
    w.agent.workload(crate::testkit::Answer::Fail);
    let e = w
        .mgr
        .create(CreateRequest {
            name: "vm".into(),
            image: Some("registry.test/app:1".into()),
            ..Default::default()
        })
        .await
        .expect_err("workload failed");
    assert_eq!(e.kind(), ErrorKind::Failed, "{e}");
    w.assert_only(&[]).await;
}

#[tokio::test]
async fn cached_blobs_go_with_the_last_image_that_names_them() {
    let mut w = World::new().await;
    let a = w.add_oci_image("registry.test/a:1").await;
    w.add_oci_image("registry.test/b:1").await;
    assert_eq!(a.blobs.len(), 3, "manifest, config, one layer: {a:?}");
    let before = w.images.stored_blobs();
    w.mgr.delete_image("registry.test/a:1").await.unwrap();
    let after = w.images.stored_blobs();
    assert_eq!(after.len(), before.len() - 3);
    assert!(a.blobs.iter().all(|b| !after.contains(b)));
    // Blobs of a failed pull that no record names go at the next start.
    w.images.publish("registry.test/c:1", &["c"]);
    w.mgr.pull_image(pull("registry.test/c:1")).await.unwrap();
    w.image_settled("registry.test/c:1").await;
    w.mgr.delete_image("registry.test/c:1").await.unwrap();
    w.images.publish("registry.test/orphan:1", &["o"]);
    w.images
        .pull(&"registry.test/orphan:1".parse().unwrap(), None, &|_| {})
        .await
        .unwrap();
    assert_eq!(w.images.stored_blobs().len(), after.len() + 3);
    w.restart().await;
    assert_eq!(
        w.images.stored_blobs(),
        after,
        "only image b's blobs are kept"
    );
}
