//! Bad input gets a clear error and leaves nothing (issue 12): against a
//! real docker-registry in the test's namespace, pulls of unknown names,
//! corrupt blobs, refused credentials and foreign platforms end `failed`
//! with a stable `error_code`; bad requests and truncated archives get a
//! 400. After each, no root disk, no scratch files, no instance, and the
//! image list holds the failed record or nothing.

use anyhow::{Context, Result, ensure};
use forkvm_e2e::registry::{REGISTRY, Registry, fixture_layout};
use forkvm_e2e::{TestEnv, s, sh, wait_for};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `/images/{name}` with the name's slashes encoded.
fn image_path(name: &str) -> String {
    format!("/images/{}", name.replace('/', "%2F"))
}

/// `POST /images` with `body`, then the image once it is ready or failed.
async fn pull_settled(env: &TestEnv, body: Value) -> Result<Value> {
    let name = s(&body, "name");
    let (st, v) = env.request("POST", "/images", Some(body)).await?;
    ensure!(st == 202, "pull {name} -> {st}: {v}");
    ensure!(s(&v, "status") == "pending", "{v}");
    let path = image_path(&name);
    wait_for(
        "the image to settle",
        Duration::from_secs(180),
        async || {
            let (_, v) = env.request("GET", &path, None).await.ok()?;
            matches!(v["status"].as_str(), Some("ready" | "failed")).then_some(v)
        },
    )
    .await
}

/// Pulls with `body` and expects it to fail with `code`; returns the record.
async fn pull_fails(env: &TestEnv, body: Value, code: &str) -> Result<Value> {
    let img = pull_settled(env, body).await?;
    ensure!(
        s(&img, "status") == "failed" && s(&img, "error_code") == code,
        "expected failed/{code}, got {img}\n{}",
        env.daemon_log()
    );
    ensure!(!s(&img, "error").is_empty(), "no error message: {img}");
    Ok(img)
}

/// Names in a directory ("" entries when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Nothing is left of failed pulls and imports: no root disk, no scratch
/// or temporary blob files, no instance, and exactly the images `failed`
/// listed, each failed.
async fn nothing_left(env: &TestEnv, failed: &[&str]) -> Result<()> {
    let oci = env.data_dir.join("oci");
    for dir in ["rootfs", "tmp", "blobs/tmp"] {
        let left = entries(&oci.join(dir));
        ensure!(left.is_empty(), "oci/{dir} keeps {left:?}");
    }
    let (st, list) = env.request("GET", "/images", None).await?;
    ensure!(st == 200, "{st}: {list}");
    let list = list.as_array().cloned().unwrap_or_default();
    let mut names: Vec<String> = list.iter().map(|i| s(i, "name")).collect();
    names.sort();
    let mut want: Vec<String> = failed.iter().map(|n| n.to_string()).collect();
    want.sort();
    ensure!(names == want, "images {names:?}, expected {want:?}");
    for i in &list {
        ensure!(s(i, "status") == "failed", "{i}");
    }
    let (st, inst) = env.request("GET", "/instances", None).await?;
    ensure!(
        st == 200 && inst.as_array().is_some_and(|a| a.is_empty()),
        "{inst}"
    );
    ensure!(env.qemu_pids().is_empty(), "QEMU running");
    Ok(())
}

/// The manifest of the fixture's tag `1` (the layout has one image).
fn fixture_manifest(layout: &Path) -> Result<Value> {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let digest = s(&index["manifests"][0], "digest");
    let hex = digest.strip_prefix("sha256:").context("manifest digest")?;
    Ok(serde_json::from_slice(&std::fs::read(
        layout.join("blobs/sha256").join(hex),
    )?)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_repositories_and_tags_are_not_found() -> Result<()> {
    let env = TestEnv::start().await?;
    let reg = Registry::start(&env)?;
    reg.push_fixture(&env, "forkvm/web", "1")?;
    let repo = format!("{REGISTRY}/forkvm/nothing:1");
    let tag = format!("{REGISTRY}/forkvm/web:2");
    for name in [&repo, &tag] {
        let img = pull_fails(&env, json!({"name": name}), "not_found").await?;
        ensure!(s(&img, "error").contains("not found"), "{img}");
    }
    nothing_left(&env, &[&repo, &tag]).await?;
    // A failed image boots nothing.
    let (st, v) = env
        .request(
            "POST",
            "/instances",
            Some(json!({"name": "x", "image": tag})),
        )
        .await?;
    ensure!(st == 409, "booting a failed image -> {st}: {v}");
    for name in [&repo, &tag] {
        let (st, v) = env.request("DELETE", &image_path(name), None).await?;
        ensure!(st == 204, "{st}: {v}");
    }
    nothing_left(&env, &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_layer_is_a_digest_mismatch_and_never_stored() -> Result<()> {
    let env = TestEnv::start().await?;
    let reg = Registry::start(&env)?;
    let name = reg.push_fixture(&env, "forkvm/corrupt", "1")?;
    let manifest = fixture_manifest(&fixture_layout()?)?;
    let layer = s(&manifest["layers"][0], "digest");
    let blob = reg.blob_path(&layer)?;
    // Same length, one byte changed: only the digest can tell.
    let mut data = std::fs::read(&blob).with_context(|| format!("{}", blob.display()))?;
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&blob, &data)?;

    let img = pull_fails(&env, json!({"name": name}), "digest_mismatch").await?;
    ensure!(s(&img, "error").contains(&layer), "{img}");
    let hex = layer.trim_start_matches("sha256:");
    let stored = env.data_dir.join("oci/blobs/sha256").join(hex);
    ensure!(!stored.exists(), "the corrupt layer reached the blob store");
    nothing_left(&env, &[&name]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_with_auth_wants_the_right_credentials() -> Result<()> {
    let env = TestEnv::start().await?;
    let reg = Registry::start_with_auth(&env, "alice", "s3cret-pw")?;
    let name = reg.push_fixture(&env, "forkvm/private", "1")?;

    pull_fails(&env, json!({"name": name}), "unauthorized").await?;
    nothing_left(&env, &[&name]).await?;
    let wrong = json!({"username": "alice", "password": "wrong"});
    pull_fails(
        &env,
        json!({"name": name, "credentials": wrong}),
        "unauthorized",
    )
    .await?;
    nothing_left(&env, &[&name]).await?;
    // A bearer token is sent as one; this registry knows only basic auth.
    let token = json!({"registry_token": "not-a-token"});
    pull_fails(
        &env,
        json!({"name": name, "credentials": token}),
        "unauthorized",
    )
    .await?;
    nothing_left(&env, &[&name]).await?;

    let right = json!({"username": "alice", "password": "s3cret-pw"});
    let img = pull_settled(&env, json!({"name": name, "credentials": right})).await?;
    ensure!(s(&img, "status") == "ready", "{img}\n{}", env.daemon_log());
    ensure!(img.get("error_code").is_none(), "{img}");
    let log = env.daemon_log();
    ensure!(
        !log.contains("s3cret-pw") && !log.contains("not-a-token"),
        "a secret reached the log"
    );
    let (st, _) = env.request("DELETE", &image_path(&name), None).await?;
    ensure!(st == 204);
    nothing_left(&env, &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_arm64_image_is_an_unsupported_platform() -> Result<()> {
    let env = TestEnv::start().await?;
    let reg = Registry::start(&env)?;
    let fixture = fixture_layout()?;
    let index_before = std::fs::read(fixture.join("index.json"))?;
    // A copy: the cached fixture is shared by every test.
    let layout = env.root.join("layout-arm64");
    sh(Command::new("cp").arg("-a").arg(&fixture).arg(&layout))?;
    sh(Command::new("umoci")
        .args(["config", "--architecture", "arm64", "--image"])
        .arg(format!("{}:1", layout.display())))?;
    ensure!(std::fs::read(fixture.join("index.json"))? == index_before);
    let name = reg.push_layout(&env, &layout, "forkvm/arm", "1")?;

    let img = pull_fails(&env, json!({"name": name}), "unsupported_platform").await?;
    ensure!(s(&img, "error").contains("linux/arm64"), "{img}");
    nothing_left(&env, &[&name]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_archive_is_refused_and_a_whole_one_imports() -> Result<()> {
    let env = TestEnv::start().await?;
    let tar = env.root.join("layout.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(fixture_layout()?)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    let cut = env.root.join("truncated.tar");
    std::fs::copy(&tar, &cut)?;
    let len = std::fs::metadata(&cut)?.len();
    // Not on a 512-byte block boundary: inside a member.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)?
        .set_len(len / 2 + 100)?;

    let name = "127.0.0.1:5000/forkvm/imported:1";
    let (st, v) = env
        .request(
            "POST",
            "/images/import",
            Some(json!({"path": cut, "name": name})),
        )
        .await?;
    ensure!(st == 400, "truncated import -> {st}: {v}");
    ensure!(s(&v, "message").contains("truncated"), "{v}");
    let (st, _) = env.request("GET", &image_path(name), None).await?;
    ensure!(st == 404, "a refused import left a record");
    nothing_left(&env, &[]).await?;

    let (st, v) = env
        .request(
            "POST",
            "/images/import",
            Some(json!({"path": tar, "name": name})),
        )
        .await?;
    ensure!(st == 201, "import -> {st}: {v}\n{}", env.daemon_log());
    ensure!(s(&v, "status") == "ready" && s(&v, "name") == name, "{v}");
    let rootfs = entries(&env.data_dir.join("oci/rootfs"));
    ensure!(rootfs.len() == 1, "{rootfs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_pull_requests_are_400_and_record_nothing() -> Result<()> {
    let env = TestEnv::start().await?;
    let name = format!("{REGISTRY}/forkvm/web:1");
    let bad = [
        json!({"name": name, "platform": "linux/arm64"}),
        json!({"name": "UPPER/Case"}),
        json!({"name": name, "platform": "linux"}),
        json!({"name": name, "credentials": {"username": "u"}}),
        json!({"name": name, "credentials": {"username": "u", "password": "p", "registry_token": "t"}}),
    ];
    for body in bad {
        let (st, v) = env.request("POST", "/images", Some(body.clone())).await?;
        ensure!(st == 400, "{body} -> {st}: {v}");
        ensure!(!s(&v, "message").is_empty(), "{v}");
    }
    nothing_left(&env, &[]).await
}
