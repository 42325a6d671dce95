//! `import` of OCI layouts (directory, tar, tar.gz) and `docker save` archives
//! made here, including truncated, corrupt and hostile ones.

mod common;

use std::fs;
use std::path::Path;

use common::{LayerTar, private_tempdir, sha, two_layer_image};
use forkvm_oci::{BlobStore, ImageName, Reference, UnpackLimits, import, unpack};

fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(fs::File::create(out).expect("create"));
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).expect("append");
    b.finish().expect("finish");
}

fn check_unpacked(fetched: &forkvm_oci::Fetched, blobs: &BlobStore) {
    let work = private_tempdir();
    let root = work.path().join("rootfs");
    unpack(fetched, blobs, &root, &UnpackLimits::default()).expect("unpack");
    assert_eq!(
        fs::read_to_string(root.join("etc/added")).expect("added"),
        "added by layer two\n"
    );
    assert!(!root.join("etc/gone").exists());
}

#[test]
fn oci_layout_directory_tar_and_tar_gz() {
    let layout = tempfile::tempdir().expect("tempdir");
    let digest = two_layer_image(layout.path(), "v1");
    let store = private_tempdir();
    let blobs = BlobStore::open(store.path()).expect("store");

    let (name, fetched) = import(layout.path(), &blobs).expect("import dir");
    assert_eq!(name, Some(ImageName::Tag("v1".into())));
    assert_eq!(fetched.manifest_digest, digest);
    assert_eq!(fetched.layers.len(), 2);
    check_unpacked(&fetched, &blobs);

    let out = tempfile::tempdir().expect("tempdir");
    let tar_path = out.path().join("image.tar");
    tar_dir(layout.path(), &tar_path);
    let fresh = private_tempdir();
    let blobs2 = BlobStore::open(fresh.path()).expect("store");
    let (_, from_tar) = import(&tar_path, &blobs2).expect("import tar");
    assert_eq!(from_tar, fetched);
    check_unpacked(&from_tar, &blobs2);

    let gz_path = out.path().join("image.tar.gz");
    fs::write(&gz_path, common::gzip(&fs::read(&tar_path).expect("read"))).expect("write");
    let fresh = private_tempdir();
    let blobs3 = BlobStore::open(fresh.path()).expect("store");
    assert_eq!(import(&gz_path, &blobs3).expect("import tar.gz").1, fetched);
}

/// A legacy `docker save` archive: manifest.json, `<hex>.json` config,
/// `<id>/layer.tar`; the second layer is a symlink into `blobs/` as Docker 25 writes.
fn docker_save(out: &Path) {
    let lower = LayerTar::new()
        .dir("etc", 0o755)
        .file("etc/gone", b"x", 0o644, 0)
        .file("etc/keep", b"k", 0o644, 0)
        .finish();
    let upper = LayerTar::new()
        .file("etc/.wh.gone", b"", 0o644, 0)
        .file("etc/added", b"added by layer two\n", 0o644, 0)
        .finish();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&lower), sha(&upper)]},
    });
    let config = serde_json::to_vec(&config).expect("json");
    let config_name = format!("{}.json", sha(&config).trim_start_matches("sha256:"));
    let upper_blob = format!("blobs/sha256/{}", sha(&upper).trim_start_matches("sha256:"));
    let manifest = serde_json::json!([{
        "Config": config_name, "RepoTags": ["forkvm/legacy:1"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar"],
    }]);
    let mut b = tar::Builder::new(fs::File::create(out).expect("create"));
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, data).expect("append");
    };
    add(&config_name, &config);
    add("aaa/layer.tar", &lower);
    add(&upper_blob, &upper);
    add(
        "manifest.json",
        &serde_json::to_vec(&manifest).expect("json"),
    );
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "bbb/layer.tar", format!("../{upper_blob}"))
        .expect("symlink");
    b.finish().expect("finish");
}

#[test]
fn docker_save_archive() {
    let out = tempfile::tempdir().expect("tempdir");
    let path = out.path().join("save.tar");
    docker_save(&path);
    let store = private_tempdir();
    let blobs = BlobStore::open(store.path()).expect("store");
    let (name, fetched) = import(&path, &blobs).expect("import");
    let want: Reference = "forkvm/legacy:1".parse().expect("ref");
    assert_eq!(name, Some(ImageName::Reference(want)));
    assert_eq!(fetched.config.entrypoint, Some(vec!["/bin/sh".to_string()]));
    assert!(
        blobs.contains(&fetched.manifest_digest),
        "the implied manifest is stored"
    );
    check_unpacked(&fetched, &blobs);
}

#[test]
fn truncated_archives_are_bad_archive() {
    let out = tempfile::tempdir().expect("tempdir");
    let layout = tempfile::tempdir().expect("tempdir");
    two_layer_image(layout.path(), "v1");
    let oci_tar = out.path().join("oci.tar");
    tar_dir(layout.path(), &oci_tar);
    let save_tar = out.path().join("save.tar");
    docker_save(&save_tar);
    for full in [&oci_tar, &save_tar] {
        let bytes = fs::read(full).expect("read");
        for cut in [700, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1500] {
            let cut_path = out.path().join("cut.tar");
            fs::write(&cut_path, &bytes[..cut]).expect("write");
            let store = private_tempdir();
            let blobs = BlobStore::open(store.path()).expect("store");
            let e = import(&cut_path, &blobs).expect_err("truncated");
            assert_eq!(
                e.code(),
                "bad_archive",
                "{} cut at {cut}: {e}",
                full.display()
            );
            // The message says why, not only where (a cut on a member
            // boundary reads as an archive without its end marker).
            let m = e.to_string();
            assert!(
                m.contains("truncated") || (cut % 512 == 0 && m.contains("missing")),
                "cut at {cut}: {e}"
            );
        }
    }
}

#[test]
fn corrupt_missing_and_escaping_blobs() {
    let layout = tempfile::tempdir().expect("tempdir");
    two_layer_image(layout.path(), "v1");
    let blob_dir = layout.path().join("blobs/sha256");
    let store = private_tempdir();
    let blobs = BlobStore::open(store.path()).expect("store");
    let (_, fetched) = import(layout.path(), &blobs).expect("import");
    let layer = blob_dir.join(fetched.layers[0].digest.trim_start_matches("sha256:"));

    // A flipped byte in a layer: DigestMismatch (fresh store, so it is read again).
    let mut bytes = fs::read(&layer).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&layer, &bytes).expect("write");
    let store = private_tempdir();
    let e = import(
        layout.path(),
        &BlobStore::open(store.path()).expect("store"),
    )
    .expect_err("corrupt");
    assert_eq!(e.code(), "digest_mismatch", "{e}");

    // The layer replaced by a symlink out of the layout: refused.
    let outside = tempfile::tempdir().expect("tempdir");
    let evil = outside.path().join("evil");
    bytes[mid] ^= 1;
    fs::write(&evil, &bytes).expect("write");
    fs::remove_file(&layer).expect("rm");
    std::os::unix::fs::symlink(&evil, &layer).expect("symlink");
    let store = private_tempdir();
    let e = import(
        layout.path(),
        &BlobStore::open(store.path()).expect("store"),
    )
    .expect_err("escape");
    assert_eq!(e.code(), "bad_archive", "{e}");

    // Missing altogether.
    fs::remove_file(&layer).expect("rm");
    let store = private_tempdir();
    let e = import(
        layout.path(),
        &BlobStore::open(store.path()).expect("store"),
    )
    .expect_err("missing");
    assert_eq!(e.code(), "bad_archive", "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn other_platforms_only_is_unsupported_platform() {
    let layout = tempfile::tempdir().expect("tempdir");
    two_layer_image(layout.path(), "v1");
    let index_path = layout.path().join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).expect("read")).expect("json");
    index["manifests"][0]["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64"});
    fs::write(&index_path, serde_json::to_vec(&index).expect("json")).expect("write");
    let store = private_tempdir();
    let e = import(
        layout.path(),
        &BlobStore::open(store.path()).expect("store"),
    )
    .expect_err("arm64");
    assert_eq!(e.code(), "unsupported_platform", "{e}");
    assert!(e.to_string().contains("linux/arm64"), "{e}");
}
