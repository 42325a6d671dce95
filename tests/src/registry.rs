//! A real registry (Debian's `docker-registry`) inside a test's network
//! namespace, on its loopback, and the OCI test image pushed into it with
//! `skopeo`. The image is the layout `scripts/oci-fixture.sh` builds (path
//! in `$FORKVM_TEST_OCI_LAYOUT`, set by scripts/test.sh).

use crate::{TestEnv, sh};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    /// Where it stores repositories and blobs (docker-registry's filesystem
    /// driver: `docker/registry/v2/blobs/sha256/<xx>/<hex>/data`).
    pub storage: PathBuf,
    /// `user:password` for pushing, when it requires authentication.
    creds: Option<String>,
}

impl Registry {
    /// Starts a registry storing under the test's directory and waits
    /// until it answers.
    pub fn start(env: &TestEnv) -> Result<Self> {
        Self::start_inner(env, None)
    }

    /// Like [`Registry::start`], requiring HTTP basic authentication as
    /// `user` with `password` (an htpasswd file made by `htpasswd -Bbn`).
    pub fn start_with_auth(env: &TestEnv, user: &str, password: &str) -> Result<Self> {
        Self::start_inner(env, Some((user, password)))
    }

    fn start_inner(env: &TestEnv, auth: Option<(&str, &str)>) -> Result<Self> {
        let dir = env.root.join("registry");
        std::fs::create_dir_all(&dir)?;
        let storage = dir.join("storage");
        let mut yaml = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {REGISTRY}\n",
            storage.display()
        );
        if let Some((user, password)) = auth {
            let htpasswd = dir.join("htpasswd");
            let line = sh(Command::new("htpasswd").args(["-Bbn", user, password]))?;
            std::fs::write(&htpasswd, line.trim_end().to_string() + "\n")?;
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: forkvm-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config = dir.join("config.yml");
        std::fs::write(&config, yaml)?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let child = env
            .in_netns(&["docker-registry", "serve"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning docker-registry")?;
        let reg = Registry {
            child,
            storage,
            creds: auth.map(|(u, p)| format!("{u}:{p}")),
        };
        // Any HTTP answer (also a 401) means it is serving.
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
        self.push_layout(env, &fixture_layout()?, repo, tag)
    }

    /// Pushes tag `1` of the OCI layout at `layout` as
    /// `<registry>/<repo>:<tag>`; returns that reference.
    pub fn push_layout(
        &self,
        env: &TestEnv,
        layout: &Path,
        repo: &str,
        tag: &str,
    ) -> Result<String> {
        let reference = format!("{REGISTRY}/{repo}:{tag}");
        let mut cmd = env.in_netns(&[
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if let Some(creds) = &self.creds {
            cmd.arg(format!("--dest-creds={creds}"));
        }
        sh(cmd
            .arg(format!("oci:{}:1", layout.display()))
            .arg(format!("docker://{reference}")))?;
        Ok(reference)
    }

    /// Where the registry keeps blob `digest` (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64)
            .with_context(|| format!("not a sha256 digest: {digest}"))?;
        Ok(self
            .storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
