//! Pulls from Debian's real `docker-registry` (distribution 2.8) on loopback, fed
//! by `skopeo copy` from an OCI layout made here; then unpack and erofs.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::Instant;

use common::{ErofsView, Registry, have, make_multi_arch, private_tempdir, two_layer_image, xattr};
use forkvm_oci::{
    BlobStore, Credentials, Progress, Reference, RegistryOptions, UnpackLimits, build_erofs, pull,
    unpack,
};

fn tools(test: &str) -> bool {
    have("docker-registry", test) && have("skopeo", test)
}

fn reference(reg: &Registry, repo: &str, tag: &str) -> Reference {
    format!("{}/{repo}:{tag}", reg.addr())
        .parse()
        .expect("reference")
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_unpack_and_build_erofs() {
    if !tools("pull_unpack_and_build_erofs") || !have("mkfs.erofs", "pull_unpack_and_build_erofs") {
        return;
    }
    let reg = Registry::start(None);
    let layout = tempfile::tempdir().expect("tempdir");
    two_layer_image(layout.path(), "v1");
    reg.push(layout.path(), "v1", "forkvm/py", None);

    let work = private_tempdir();
    let blobs = BlobStore::open(work.path().join("blobs")).expect("store");
    let events = Mutex::new(Vec::new());
    let record = |p: Progress| events.lock().expect("lock").push(p);
    let t = Instant::now();
    let fetched = pull(
        &reference(&reg, "forkvm/py", "v1"),
        &RegistryOptions::default(),
        &blobs,
        &record,
    )
    .await
    .expect("pull");
    let pull_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(fetched.layers.len(), 2);
    assert_eq!(
        fetched.config.cmd,
        Some(vec!["python3".to_string(), "/srv/app.py".to_string()])
    );
    assert_eq!(fetched.config.working_dir.as_deref(), Some("/srv"));
    assert!(fetched.config.env.contains(&"FORKVM=1".to_string()));
    assert_eq!(fetched.config.platform, "linux/amd64");
    let done = events
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| matches!(e, Progress::LayerDone { .. }))
        .count();
    assert_eq!(done, 2, "{:?}", events.lock());

    // A second pull finds every layer in the store.
    events.lock().expect("lock").clear();
    let again = pull(
        &reference(&reg, "forkvm/py", "v1"),
        &RegistryOptions::default(),
        &blobs,
        &record,
    )
    .await
    .expect("pull again");
    assert_eq!(again, fetched);
    let cached = events
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| matches!(e, Progress::LayerCached { .. }))
        .count();
    assert_eq!(cached, 2);
    // Pinned by digest, through the same registry.
    let pinned = reference(&reg, "forkvm/py", "v1").with_digest(&fetched.manifest_digest);
    let by_digest = pull(&pinned, &RegistryOptions::default(), &blobs, &|_| {})
        .await
        .expect("pull by digest");
    assert_eq!(by_digest.manifest_digest, fetched.manifest_digest);

    let root = work.path().join("rootfs");
    let t = Instant::now();
    let stats = unpack(&fetched, &blobs, &root, &UnpackLimits::default()).expect("unpack");
    let unpack_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(stats.layers, 2);
    assert!(!root.join("etc/gone").exists());

    let image = work.path().join("root.erofs");
    let t = Instant::now();
    let size = build_erofs(&root, &image).expect("mkfs.erofs");
    let erofs_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(fs::metadata(&image).expect("image").len(), size);
    eprintln!(
        "timings: pull {pull_ms:.1} ms, unpack {unpack_ms:.1} ms, erofs {erofs_ms:.1} ms ({size} bytes)"
    );

    check_erofs(&image);
}

/// The built image, mounted (or extracted), holds both layers' result.
fn check_erofs(image: &std::path::Path) {
    let view = ErofsView::open(image);
    let r = &view.root;
    assert_eq!(
        fs::read_to_string(r.join("etc/hello")).expect("hello"),
        "hello from layer one\n"
    );
    assert_eq!(
        fs::read_to_string(r.join("etc/added")).expect("added"),
        "added by layer two\n"
    );
    assert!(
        fs::symlink_metadata(r.join("etc/gone")).is_err(),
        "whited-out file is absent"
    );
    assert!(
        fs::symlink_metadata(r.join("etc/.wh.gone")).is_err(),
        "no whiteout marker in the image"
    );
    let app = fs::metadata(r.join("srv/app.py")).expect("app");
    assert_eq!(
        (app.mode() & 0o7777, app.uid(), app.gid()),
        (0o4755, 1000, 1000)
    );
    assert_eq!(app.mtime(), 1_700_000_000);
    let added = fs::metadata(r.join("etc/added")).expect("added");
    assert_eq!((added.mode() & 0o7777, added.uid()), (0o600, 33));
    assert_eq!(
        fs::read_link(r.join("srv/link")).expect("link").to_str(),
        Some("../etc/hello")
    );
    if view.mounted() {
        // Hard links and xattrs are checked on the mounted image (an extraction
        // by fsck.erofs may not reproduce them).
        assert_eq!(
            fs::metadata(r.join("srv/app-hardlink.py"))
                .expect("hl")
                .ino(),
            app.ino()
        );
        assert_eq!(
            xattr(&r.join("srv/tagged"), "user.forkvm").as_deref(),
            Some(&b"yes"[..])
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_tag_or_repository_is_not_found() {
    if !tools("unknown_tag_or_repository_is_not_found") {
        return;
    }
    let reg = Registry::start(None);
    let layout = tempfile::tempdir().expect("tempdir");
    two_layer_image(layout.path(), "v1");
    reg.push(layout.path(), "v1", "forkvm/py", None);
    let work = private_tempdir();
    let blobs = BlobStore::open(work.path()).expect("store");
    for (repo, tag) in [("forkvm/py", "nope"), ("forkvm/absent", "v1")] {
        let e = pull(
            &reference(&reg, repo, tag),
            &RegistryOptions::default(),
            &blobs,
            &|_| {},
        )
        .await
        .expect_err("must fail");
        assert_eq!(e.code(), "not_found", "{repo}:{tag}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_registry_needs_credentials() {
    let test = "htpasswd_registry_needs_credentials";
    if !tools(test) || !have("htpasswd", test) {
        return;
    }
    let reg = Registry::start(Some(("forkvm", "s3cret")));
    let layout = tempfile::tempdir().expect("tempdir");
    two_layer_image(layout.path(), "v1");
    reg.push(layout.path(), "v1", "private/app", Some("forkvm:s3cret"));
    let work = private_tempdir();
    let blobs = BlobStore::open(work.path()).expect("store");
    let r = reference(&reg, "private/app", "v1");

    let e = pull(&r, &RegistryOptions::default(), &blobs, &|_| {})
        .await
        .expect_err("no credentials");
    assert_eq!(e.code(), "unauthorized", "{e}");
    let wrong = RegistryOptions {
        credentials: Some(Credentials::basic("forkvm", "wrong")),
        ..RegistryOptions::default()
    };
    let e = pull(&r, &wrong, &blobs, &|_| {})
        .await
        .expect_err("wrong password");
    assert_eq!(e.code(), "unauthorized", "{e}");
    // htpasswd auth takes no bearer token: it is sent, and refused.
    let token = RegistryOptions {
        credentials: Some(Credentials::bearer("s3cret")),
        ..RegistryOptions::default()
    };
    let e = pull(&r, &token, &blobs, &|_| {})
        .await
        .expect_err("a bearer token");
    assert_eq!(e.code(), "unauthorized", "{e}");
    let right = RegistryOptions {
        credentials: Some(Credentials::basic("forkvm", "s3cret")),
        ..RegistryOptions::default()
    };
    let fetched = pull(&r, &right, &blobs, &|_| {})
        .await
        .expect("pull with credentials");
    assert_eq!(fetched.layers.len(), 2);
    assert!(fetched.layers.iter().all(|l| blobs.contains(&l.digest)));
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_blob_is_digest_mismatch() {
    if !tools("corrupted_blob_is_digest_mismatch") {
        return;
    }
    let reg = Registry::start(None);
    let layout = tempfile::tempdir().expect("tempdir");
    two_layer_image(layout.path(), "v1");
    reg.push(layout.path(), "v1", "forkvm/py", None);
    // Learn the layer digests from a good pull into a throwaway store.
    let scratch = private_tempdir();
    let good = BlobStore::open(scratch.path()).expect("store");
    let r = reference(&reg, "forkvm/py", "v1");
    let fetched = pull(&r, &RegistryOptions::default(), &good, &|_| {})
        .await
        .expect("pull");
    let victim = &fetched.layers[1].digest;
    let data = reg.blob_data(victim);
    let mut bytes = fs::read(&data).expect("registry blob data");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&data, &bytes).expect("corrupt blob");

    let work = private_tempdir();
    let blobs = BlobStore::open(work.path()).expect("store");
    let e = pull(&r, &RegistryOptions::default(), &blobs, &|_| {})
        .await
        .expect_err("corrupt");
    assert_eq!(e.code(), "digest_mismatch", "{e}");
    assert!(
        !blobs.contains(victim),
        "a corrupt blob never becomes visible"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn image_index_resolves_linux_amd64_or_says_what_it_offers() {
    if !tools("image_index_resolves_linux_amd64_or_says_what_it_offers") {
        return;
    }
    let reg = Registry::start(None);
    let multi = tempfile::tempdir().expect("tempdir");
    let amd64_digest = two_layer_image(multi.path(), "multi");
    make_multi_arch(
        multi.path(),
        "multi",
        true,
        &[("linux", "arm64"), ("linux", "s390x")],
    );
    reg.push(multi.path(), "multi", "forkvm/multi", None);
    let foreign = tempfile::tempdir().expect("tempdir");
    two_layer_image(foreign.path(), "arm");
    make_multi_arch(
        foreign.path(),
        "arm",
        false,
        &[("linux", "arm64"), ("windows", "amd64")],
    );
    reg.push(foreign.path(), "arm", "forkvm/arm", None);

    let work = private_tempdir();
    let blobs = BlobStore::open(work.path()).expect("store");
    let opts = RegistryOptions::default();
    let fetched = pull(
        &reference(&reg, "forkvm/multi", "multi"),
        &opts,
        &blobs,
        &|_| {},
    )
    .await
    .expect("pull through an index");
    assert_eq!(
        fetched.manifest_digest, amd64_digest,
        "the linux/amd64 manifest is chosen"
    );
    let e = pull(
        &reference(&reg, "forkvm/arm", "arm"),
        &opts,
        &blobs,
        &|_| {},
    )
    .await
    .expect_err("no linux/amd64");
    assert_eq!(e.code(), "unsupported_platform", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("linux/arm64") && msg.contains("windows/amd64"),
        "{msg}"
    );
}
