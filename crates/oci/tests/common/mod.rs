//! Shared helpers for the integration tests: tools, a real registry process on
//! loopback, OCI layouts made here, and a look inside built erofs images.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// Whether `tool` is on PATH. Missing: a failure under `CI`, else a skip (false).
pub fn have(tool: &str, test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: required tool {tool} is missing (run scripts/setup.sh)");
        }
        eprintln!("SKIP {test}: {tool} is not installed (scripts/setup.sh installs it)");
    }
    found
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A temp dir only its owner can enter (unpack roots must live in one).
pub fn private_tempdir() -> tempfile::TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    t
}

/// Debian's `docker-registry` (distribution 2.8) serving on 127.0.0.1.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry; with `htpasswd` (user, password) it requires basic auth.
    pub fn start(htpasswd: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().join("storage");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((user, password)) = htpasswd {
            let line = run(Command::new("htpasswd").args(["-Bbn", user, password]));
            let file = dir.path().join("htpasswd");
            fs::write(&file, line.trim()).expect("write htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: forkvm-test\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).expect("write config");
        let log = fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let mut reg = Registry {
            child,
            port,
            storage,
            _dir: dir,
        };
        reg.wait_ready();
        reg
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Polls `/v2/` until the registry answers (any HTTP status), 20 s at most.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = http_status(self.port, "/v2/") {
                assert!(
                    status == 200 || status == 401,
                    "unexpected /v2/ status {status}"
                );
                return;
            }
            if let Ok(Some(exit)) = self.child.try_wait() {
                let log =
                    fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default();
                panic!("docker-registry exited with {exit}: {log}");
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `skopeo copy` of an OCI layout into this registry.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str, creds: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
        ]);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()));
        cmd.arg(format!("docker://{}/{repo}:{tag}", self.addr()));
        run(&mut cmd);
    }

    /// The registry's on-disk data file of a blob.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The status code of `GET path` on 127.0.0.1:port, `None` if nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A layer tar under construction.
pub struct LayerTar(tar::Builder<Vec<u8>>);

impl LayerTar {
    pub fn new() -> Self {
        LayerTar(tar::Builder::new(Vec::new()))
    }
    pub fn file(mut self, path: &str, data: &[u8], mode: u32, uid: u64) -> Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_700_000_000);
        self.0.append_data(&mut h, path, data).expect("append");
        self
    }
    pub fn xattr_file(mut self, path: &str, data: &[u8], key: &str, value: &[u8]) -> Self {
        let k = format!("SCHILY.xattr.{key}");
        self.0
            .append_pax_extensions([(k.as_str(), value)])
            .expect("pax");
        self.file(path, data, 0o644, 0)
    }
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        self.0.append_data(&mut h, path, &[][..]).expect("append");
        self
    }
    pub fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        self.0.append_link(&mut h, path, target).expect("link");
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().expect("tar")
    }
}

impl Default for LayerTar {
    fn default() -> Self {
        Self::new()
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// An OCI image layout at `dir`: layers given as (uncompressed tar, "gzip"|"zstd"|"tar").
/// Returns the manifest digest.
pub fn write_layout(dir: &Path, tag: &str, layers: &[(Vec<u8>, &str)], cmd: &[&str]) -> String {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("mkdir");
    let put = |data: &[u8]| {
        let d = sha(data);
        fs::write(blobs.join(d.trim_start_matches("sha256:")), data).expect("write blob");
        d
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, comp) in layers {
        let (blob, media) = match *comp {
            "gzip" => (gzip(tar), "application/vnd.oci.image.layer.v1.tar+gzip"),
            "zstd" => (
                zstd::encode_all(&tar[..], 3).expect("zstd"),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            _ => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
        };
        diff_ids.push(sha(tar));
        descs.push(
            serde_json::json!({"mediaType": media, "digest": put(&blob), "size": blob.len()}),
        );
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/usr/bin:/bin", "FORKVM=1"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).expect("json");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
        "layers": descs,
    });
    let manifest = serde_json::to_vec(&manifest).expect("json");
    let mdigest = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("index");
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    mdigest
}

/// Turns the single-image layout at `dir` (from [`write_layout`]) into a
/// multi-platform one: `index.json` points at an image index whose entries are
/// the original manifest as linux/amd64 (when `with_amd64`) plus manifests for
/// `others` (os, arch) with their own configs over the same layers.
pub fn make_multi_arch(dir: &Path, tag: &str, with_amd64: bool, others: &[(&str, &str)]) {
    let blobs = dir.join("blobs/sha256");
    let read_blob = |d: &str| fs::read(blobs.join(d.trim_start_matches("sha256:"))).expect("blob");
    let put = |data: &[u8]| {
        let d = sha(data);
        fs::write(blobs.join(d.trim_start_matches("sha256:")), data).expect("write blob");
        d
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).expect("index")).expect("json");
    let amd64 = index["manifests"][0].clone();
    let manifest: serde_json::Value =
        serde_json::from_slice(&read_blob(amd64["digest"].as_str().expect("digest")))
            .expect("json");
    let config: serde_json::Value = serde_json::from_slice(&read_blob(
        manifest["config"]["digest"].as_str().expect("digest"),
    ))
    .expect("json");
    let mut entries = Vec::new();
    if with_amd64 {
        entries.push(serde_json::json!({
            "mediaType": amd64["mediaType"], "digest": amd64["digest"], "size": amd64["size"],
            "platform": {"os": "linux", "architecture": "amd64"},
        }));
    }
    for (os, arch) in others {
        let mut c = config.clone();
        c["os"] = serde_json::json!(os);
        c["architecture"] = serde_json::json!(arch);
        let c = serde_json::to_vec(&c).expect("json");
        let mut m = manifest.clone();
        m["config"]["digest"] = serde_json::json!(put(&c));
        m["config"]["size"] = serde_json::json!(c.len());
        let m = serde_json::to_vec(&m).expect("json");
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(&m), "size": m.len(),
            "platform": {"os": os, "architecture": arch},
        }));
    }
    let inner = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries,
    }))
    .expect("json");
    let top = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": put(&inner), "size": inner.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&top).expect("json"),
    )
    .expect("index");
}

/// The two-layer test image: the upper layer whites out `etc/gone`, adds
/// `etc/added` and a hard link.
pub fn two_layer_image(dir: &Path, tag: &str) -> String {
    let lower = LayerTar::new()
        .dir("etc", 0o755)
        .file("etc/hello", b"hello from layer one\n", 0o644, 0)
        .file("etc/gone", b"to be whited out\n", 0o644, 0)
        .dir("srv", 0o755)
        .file("srv/app.py", b"print('hi')\n", 0o4755, 1000)
        .xattr_file("srv/tagged", b"x", "user.forkvm", b"yes")
        .link(tar::EntryType::Symlink, "srv/link", "../etc/hello")
        .finish();
    let upper = LayerTar::new()
        .file("etc/.wh.gone", b"", 0o644, 0)
        .file("etc/added", b"added by layer two\n", 0o600, 33)
        .link(tar::EntryType::Link, "srv/app-hardlink.py", "srv/app.py")
        .finish();
    write_layout(
        dir,
        tag,
        &[(lower, "gzip"), (upper, "zstd")],
        &["python3", "/srv/app.py"],
    )
}

/// A look inside an erofs image: mounted (loop, read-only) when possible,
/// else extracted with `fsck.erofs --extract`.
pub struct ErofsView {
    pub root: PathBuf,
    mounted: bool,
    _dir: tempfile::TempDir,
}

impl ErofsView {
    pub fn open(image: &Path) -> ErofsView {
        let dir = private_tempdir();
        let root = dir.path().join("view");
        fs::create_dir(&root).expect("mkdir");
        let mounted = is_root()
            && Command::new("mount")
                .args(["-t", "erofs", "-o", "loop,ro"])
                .arg(image)
                .arg(&root)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("erofs mount not possible here; checking with fsck.erofs --extract");
            fs::remove_dir(&root).expect("rmdir");
            run(Command::new("fsck.erofs")
                .arg(format!("--extract={}", root.display()))
                .arg(image));
        }
        ErofsView {
            root,
            mounted,
            _dir: dir,
        }
    }

    pub fn mounted(&self) -> bool {
        self.mounted
    }
}

impl Drop for ErofsView {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.root).status();
        }
    }
}

/// An extended attribute of `path` (not followed), if set.
pub fn xattr(path: &Path, key: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let k = std::ffi::CString::new(key).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated strings and a buffer of the stated length.
    let n = unsafe { libc::lgetxattr(p.as_ptr(), k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}
