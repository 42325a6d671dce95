//! A guest's files from outside: `stat`, and `forkvm cp` both ways for a
//! 16 MiB random file and a directory tree, byte for byte, over hypeman's
//! cp WebSocket; and in an OCI image's instance paths are the image's.

use anyhow::{Context, Result, ensure};
use forkvm_e2e::{TestEnv, forkvm_bin, s};
use serde_json::json;
use std::path::Path;
use std::process::Command;

fn cp(env: &TestEnv, src: &str, dst: &str) -> Result<()> {
    let out = Command::new(forkvm_bin())
        .arg("--socket")
        .arg(&env.socket)
        .args(["cp", src, dst])
        .output()?;
    ensure!(
        out.status.success(),
        "cp {src} {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn random_file(p: &Path, n: usize) -> Result<Vec<u8>> {
    let mut v: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    v[..3].copy_from_slice(&[0, 0xff, b'\n']);
    std::fs::write(p, &v)?;
    Ok(v)
}

#[tokio::test(flavor = "multi_thread")]
async fn files_and_trees_copy_both_ways_byte_for_byte() -> Result<()> {
    let env = TestEnv::start().await?;
    let id = s(&env.create(json!({"name": "files"})).await?, "id");
    let local = env.root.join("local");
    std::fs::create_dir_all(local.join("tree/sub"))?;
    let big = random_file(&local.join("big.bin"), 16 << 20)?;
    let small = random_file(&local.join("tree/sub/s.bin"), 4097)?;
    std::fs::write(local.join("tree/a.txt"), "a\n")?;

    // Into the guest: a file to a new name, a tree into an existing dir.
    cp(
        &env,
        local.join("big.bin").to_str().context("utf-8")?,
        "files:/root/big.copy",
    )?;
    cp(
        &env,
        local.join("tree").to_str().context("utf-8")?,
        "files:/tmp",
    )?;
    let sum = env
        .exec_ok(
            &id,
            &[
                "sh",
                "-c",
                "sha256sum /root/big.copy /tmp/tree/sub/s.bin; cat /tmp/tree/a.txt",
            ],
        )
        .await?;
    let hex = |b: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b))
    };
    ensure!(
        sum.contains(&hex(&big)) && sum.contains(&hex(&small)),
        "{sum}"
    );
    ensure!(sum.ends_with("a\n"), "{sum}");

    // stat as hypeman's PathInfo.
    let (st, v) = env
        .request(
            "GET",
            &format!("/instances/{id}/stat?path=/root/big.copy"),
            None,
        )
        .await?;
    ensure!(
        st == 200 && v["is_file"] == true && v["size"] == 16 << 20,
        "{v}"
    );
    let (_, v) = env
        .request("GET", &format!("/instances/{id}/stat?path=/tmp/tree"), None)
        .await?;
    ensure!(v["exists"] == true && v["is_dir"] == true, "{v}");
    let (_, v) = env
        .request("GET", &format!("/instances/{id}/stat?path=/nope"), None)
        .await?;
    ensure!(v["exists"] == false, "{v}");

    // Out again: the file to a new local name, the tree into a directory.
    let back = env.root.join("back");
    std::fs::create_dir_all(&back)?;
    cp(
        &env,
        "files:/root/big.copy",
        back.join("big.back").to_str().context("utf-8")?,
    )?;
    cp(&env, "files:/tmp/tree", back.to_str().context("utf-8")?)?;
    ensure!(
        std::fs::read(back.join("big.back"))? == big,
        "big file changed on the way back"
    );
    ensure!(std::fs::read(back.join("tree/sub/s.bin"))? == small);
    ensure!(std::fs::read_to_string(back.join("tree/a.txt"))? == "a\n");
    // A missing guest path is a clear error, and nothing is created.
    let out = Command::new(forkvm_bin())
        .arg("--socket")
        .arg(&env.socket)
        .args([
            "cp",
            "files:/nope",
            back.join("nope").to_str().context("utf-8")?,
        ])
        .output()?;
    ensure!(!out.status.success() && !back.join("nope").exists());
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("/nope"),
        "{out:?}"
    );
    Ok(())
}
