//! A real registry (Debian's `docker-registry`) inside a test's network
//! namespace, on its loopback, and the OCI test image pushed into it with
//! `skopeo`. The image is the layout `scripts/oci-fixture.sh` builds (path
//! in `$FORKVM_TEST_OCI_LAYOUT`, set by scripts/test.sh).

use crate::{TestEnv, sh};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The registry's address inside the namespace (its own loopback).
pub const REGISTRY: &str = "127.0.0.1:5000";

/// The OCI test image's layout (tag `1`): busybox httpd serving
/// `/srv/www` on port 8080 as user `web`.
pub fn fixture_layout() -> Result<PathBuf> {
    let p = std::env::var("FORKVM_TEST_OCI_LAYOUT")
        .map(PathBuf::from)
        .context("FORKVM_TEST_OCI_LAYOUT unset: scripts/test.sh builds the OCI test image")?;
    if !p.join("index.json").exists() {
        bail!(
            "no OCI layout at {}: run scripts/oci-fixture.sh",
            p.display()
        );
    }
    Ok(p)
}

/// A registry process in a test's namespace; killed on drop.
pub struct Registry {
    child: Child,
}

impl Registry {
    /// Starts a registry storing under the test's directory and waits
    /// until it answers.
    pub fn start(env: &TestEnv) -> Result<Self> {
        let dir = env.root.join("registry");
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {REGISTRY}\n",
                dir.join("storage").display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let child = env
            .in_netns(&["docker-registry", "serve"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning docker-registry")?;
        let reg = Registry { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while env.http_get(&format!("http://{REGISTRY}/v2/")).is_none() {
            if Instant::now() > deadline {
                bail!("docker-registry did not answer within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(reg)
    }

    /// Pushes the OCI test image as `<registry>/<repo>:<tag>`; returns that
    /// reference.
    pub fn push_fixture(&self, env: &TestEnv, repo: &str, tag: &str) -> Result<String> {
        let layout = fixture_layout()?;
        let reference = format!("{REGISTRY}/{repo}:{tag}");
        sh(env
            .in_netns(&[
                "skopeo",
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}:1", layout.display()))
            .arg(format!("docker://{reference}")))?;
        Ok(reference)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
