//! Layers built with the `tar` crate, applied for real (as root) into temp dirs.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::*;
use crate::manifest::ImageConfig;

/// A layer under construction.
struct L(tar::Builder<Vec<u8>>);

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h
}

impl L {
    fn new() -> Self {
        L(tar::Builder::new(Vec::new()))
    }
    fn file(mut self, path: &str, data: &[u8]) -> Self {
        self.file_full(path, data, 0o644, 0, 0, &[]);
        self
    }
    fn file_full(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
        xattrs: &[(&str, &[u8])],
    ) {
        if !xattrs.is_empty() {
            let ext: Vec<(String, &[u8])> = xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            self.0
                .append_pax_extensions(ext.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.0.append_data(&mut h, path, data).unwrap();
    }
    fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut h = header(kind, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    fn symlink(self, path: &str, target: &str) -> Self {
        self.link(tar::EntryType::Symlink, path, target)
    }
    fn hardlink(self, path: &str, target: &str) -> Self {
        self.link(tar::EntryType::Link, path, target)
    }
    /// A header whose name (and link) bytes are written raw, bypassing the
    /// `tar` crate's own `..` checks: what a hostile archive contains.
    fn raw(mut self, kind: tar::EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Self {
        let mut h = header(kind, 0o644, data.len() as u64);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name);
        gnu.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn dev(mut self, kind: tar::EntryType, path: &str, major: u32, minor: u32) -> Self {
        let mut h = header(kind, 0o640, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    fn tar(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn compress(tar: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
    }
}

struct Env {
    _tmp: tempfile::TempDir,
    blobs: BlobStore,
    root: PathBuf,
}

fn new_env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let blobs = BlobStore::open(tmp.path().join("blobs")).unwrap();
    let root = tmp.path().join("rootfs");
    Env {
        _tmp: tmp,
        blobs,
        root,
    }
}

/// Stores the layers (cycling through the compressions) and describes the image.
fn image(env: &Env, layers: Vec<Vec<u8>>) -> Fetched {
    let kinds = [Compression::Gzip, Compression::None, Compression::Zstd];
    let layers = layers
        .iter()
        .enumerate()
        .map(|(i, tar)| {
            let compression = kinds[i % 3];
            let blob = compress(tar, compression);
            let (digest, size) = env
                .blobs
                .ingest("t", &mut &blob[..], None, None, u64::MAX)
                .unwrap();
            Layer {
                digest,
                size,
                media_type: String::new(),
                compression,
                diff_id: Some(sha(tar)),
            }
        })
        .collect();
    Fetched {
        manifest_digest: String::new(),
        config_digest: String::new(),
        config: ImageConfig::default(),
        layers,
    }
}

fn run(env: &Env, layers: Vec<Vec<u8>>) -> Result<UnpackStats, OciError> {
    unpack(
        &image(env, layers),
        &env.blobs,
        &env.root,
        &UnpackLimits::default(),
    )
}

fn read(root: &Path, p: &str) -> String {
    fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn exists(root: &Path, p: &str) -> bool {
    fs::symlink_metadata(root.join(p)).is_ok()
}

#[test]
fn owners_modes_times_xattrs_and_special_files() {
    let env = new_env();
    let mut l = L::new().dir("usr/bin", 0o755).dir("tmp", 0o1777);
    l.file_full("usr/bin/su", b"su", 0o4755, 0, 0, &[]);
    l.file_full(
        "home/u/f",
        b"data",
        0o640,
        1000,
        1001,
        &[("user.note", b"hi"), ("trusted.overlay.opaque", b"y")],
    );
    l.file_full(
        "usr/bin/ping",
        b"ping",
        0o755,
        0,
        0,
        &[(
            "security.capability",
            &[
                1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        )],
    );
    let l = l
        .symlink("usr/bin/sh", "dash")
        .dev(tar::EntryType::Char, "dev/null", 1, 3)
        .dev(tar::EntryType::Fifo, "run/fifo", 0, 0);
    let stats = run(&env, vec![l.tar()]).unwrap();
    assert_eq!(stats.layers, 1);
    let r = &env.root;
    let md = |p: &str| fs::symlink_metadata(r.join(p)).unwrap();
    assert_eq!(md("usr/bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(md("tmp").mode() & 0o7777, 0o1777);
    assert_eq!((md("home/u/f").uid(), md("home/u/f").gid()), (1000, 1001));
    assert_eq!(md("home/u/f").mode() & 0o7777, 0o640);
    assert_eq!(md("home/u/f").mtime(), 1_600_000_000);
    assert_eq!(
        md("usr/bin").mtime(),
        1_600_000_000,
        "directory mtime restored after children"
    );
    assert_eq!(
        fs::read_link(r.join("usr/bin/sh")).unwrap(),
        Path::new("dash")
    );
    assert!(md("dev/null").file_type().is_char_device());
    assert_eq!(md("dev/null").rdev(), makedev(1, 3));
    assert!(md("run/fifo").file_type().is_fifo());
    let get = |p: &str, k: &str| {
        let mut buf = vec![0u8; 256];
        let path = std::ffi::CString::new(r.join(p).into_os_string().into_encoded_bytes()).unwrap();
        let key = std::ffi::CString::new(k).unwrap();
        // SAFETY: valid NUL-terminated strings and a buffer of the given length.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                key.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    };
    assert_eq!(get("home/u/f", "user.note").as_deref(), Some(&b"hi"[..]));
    assert_eq!(
        get("home/u/f", "trusted.overlay.opaque"),
        None,
        "overlay xattrs are dropped"
    );
    assert!(
        get("usr/bin/ping", "security.capability").is_some(),
        "capabilities survive chown"
    );
}

#[test]
fn whiteouts_and_opaque_directories() {
    let env = new_env();
    let lower = L::new()
        .file("a/x", b"x")
        .file("a/y", b"y")
        .file("b/z", b"z")
        .file("d/old", b"o")
        .file("d/sub/old2", b"o")
        .tar();
    let upper = L::new()
        .file("a/.wh.x", b"")
        .file(".wh.b", b"")
        .dir("d", 0o755)
        .file("d/new", b"n")
        .file("d/.wh..wh..opq", b"")
        .file(".wh.never-existed", b"")
        .tar();
    run(&env, vec![lower, upper]).unwrap();
    let r = &env.root;
    assert!(!exists(r, "a/x") && exists(r, "a/y"));
    assert!(!exists(r, "b"));
    assert!(!exists(r, "a/.wh.x"), "whiteouts are not materialized");
    let mut names: Vec<_> = fs::read_dir(r.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["new"],
        "opaque dir keeps only this layer's entries"
    );
}

#[test]
fn hard_links_within_and_across_layers() {
    let env = new_env();
    let l1 = L::new().file("bin/busybox", b"bb").tar();
    let l2 = L::new()
        .hardlink("bin/ls", "bin/busybox")
        .file("etc/a", b"a")
        .hardlink("etc/b", "/etc/a")
        .tar();
    run(&env, vec![l1, l2]).unwrap();
    let ino = |p: &str| fs::metadata(env.root.join(p)).unwrap().ino();
    assert_eq!(ino("bin/ls"), ino("bin/busybox"));
    assert_eq!(ino("etc/b"), ino("etc/a"));
    assert_eq!(fs::metadata(env.root.join("etc/a")).unwrap().nlink(), 2);

    let env = new_env();
    let e = run(&env, vec![L::new().hardlink("x", "missing").tar()]).unwrap_err();
    assert_eq!(e.code(), "bad_archive", "{e}");
}

#[test]
fn dot_dot_paths_and_link_targets_refused() {
    let outside = tempfile::tempdir().unwrap();
    for layer in [
        L::new()
            .raw(tar::EntryType::Regular, b"../escape", b"", b"x")
            .tar(),
        L::new()
            .raw(tar::EntryType::Regular, b"a/../../escape", b"", b"x")
            .tar(),
        L::new()
            .raw(tar::EntryType::Link, b"h", b"../../etc/passwd", b"")
            .tar(),
    ] {
        let env = new_env();
        let e = run(&env, vec![layer]).unwrap_err();
        assert_eq!(e.code(), "bad_archive", "{e}");
        assert!(e.to_string().contains(".."), "{e}");
    }
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn symlinks_never_lead_writes_out_of_the_root() {
    let outside = tempfile::tempdir().unwrap();
    let out = outside.path().to_str().unwrap().to_string();
    fs::write(outside.path().join("victim"), b"original").unwrap();
    // An absolute symlink to an existing host directory, then a file through it.
    let env = new_env();
    let l1 = L::new().symlink("evil", &out).tar();
    let l2 = L::new().file("evil/pwned", b"x").tar();
    let e = run(&env, vec![l1, l2]).unwrap_err();
    assert_eq!(e.code(), "bad_archive", "{e}");
    // A relative climb resolves inside the root (like a chroot), not above it.
    let env = new_env();
    let l1 = L::new()
        .dir("etc", 0o755)
        .symlink("up", "../../../../../../..")
        .tar();
    let l2 = L::new()
        .file("up/etc/hello", b"inside")
        .file("up/rootfile", b"r")
        .tar();
    run(&env, vec![l1, l2]).unwrap();
    assert_eq!(read(&env.root, "etc/hello"), "inside");
    assert_eq!(read(&env.root, "rootfile"), "r");
    // A symlink to a host file, replaced by a regular file: the host file is untouched.
    let env = new_env();
    let victim = format!("{out}/victim");
    let l1 = L::new()
        .symlink("target", &victim)
        .hardlink("hl", "target")
        .tar();
    let l2 = L::new()
        .file("target", b"new")
        .file("hl", b"also new")
        .tar();
    run(&env, vec![l1, l2]).unwrap();
    assert_eq!(read(&env.root, "target"), "new");
    assert_eq!(
        fs::read(outside.path().join("victim")).unwrap(),
        b"original"
    );
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
}

#[test]
fn merged_usr_symlinked_parents_resolve_inside() {
    let env = new_env();
    let l1 = L::new()
        .dir("usr/lib", 0o755)
        .symlink("lib", "usr/lib")
        .tar();
    let l2 = L::new().file("lib/libx.so", b"so").tar();
    run(&env, vec![l1, l2]).unwrap();
    assert_eq!(read(&env.root, "usr/lib/libx.so"), "so");
    assert!(
        fs::symlink_metadata(env.root.join("lib"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn files_and_directories_replace_each_other() {
    let env = new_env();
    let l1 = L::new().file("p/c", b"c").file("q", b"q").tar();
    let l2 = L::new()
        .file("p", b"now a file")
        .dir("q", 0o750)
        .file("q/c", b"in dir")
        .tar();
    let l3 = L::new().dir("q", 0o755).file("q/d", b"merged").tar();
    run(&env, vec![l1, l2, l3]).unwrap();
    assert_eq!(read(&env.root, "p"), "now a file");
    assert_eq!(read(&env.root, "q/c"), "in dir");
    assert_eq!(read(&env.root, "q/d"), "merged");
    assert_eq!(
        fs::metadata(env.root.join("q")).unwrap().mode() & 0o777,
        0o755
    );
}

#[test]
fn diff_id_mismatch_and_corrupt_layers() {
    let env = new_env();
    let mut img = image(&env, vec![L::new().file("a", b"a").tar()]);
    img.layers[0].diff_id = Some(sha(b"something else"));
    let e = unpack(&img, &env.blobs, &env.root, &UnpackLimits::default()).unwrap_err();
    assert_eq!(e.code(), "digest_mismatch", "{e}");

    let env = new_env();
    let tar = L::new().file("big", &[5u8; 100_000]).tar();
    let gz = compress(&tar, Compression::Gzip);
    let cut = &gz[..gz.len() / 2];
    let (digest, size) = env
        .blobs
        .ingest("t", &mut &cut[..], None, None, u64::MAX)
        .unwrap();
    let img = Fetched {
        layers: vec![Layer {
            digest,
            size,
            media_type: String::new(),
            compression: Compression::Gzip,
            diff_id: None,
        }],
        ..image(&env, vec![])
    };
    let e = unpack(&img, &env.blobs, &env.root, &UnpackLimits::default()).unwrap_err();
    assert_eq!(e.code(), "bad_archive", "{e}");
}

#[test]
fn limits_stop_a_bomb() {
    let env = new_env();
    let img = image(
        &env,
        vec![
            L::new()
                .file("a", &[0u8; 50_000])
                .file("b", &[0u8; 50_000])
                .tar(),
        ],
    );
    let limits = UnpackLimits {
        max_bytes: 60_000,
        max_entries: 100,
    };
    let e = unpack(&img, &env.blobs, &env.root, &limits).unwrap_err();
    assert_eq!(e.code(), "too_large", "{e}");
    assert!(!exists(&env.root, "b"), "refused before writing");
}

#[test]
fn root_must_be_new_or_empty_and_private() {
    let env = new_env();
    fs::create_dir(&env.root).unwrap();
    fs::write(env.root.join("junk"), b"").unwrap();
    let e = run(&env, vec![]).unwrap_err();
    assert_eq!(e.code(), "invalid_input", "{e}");

    let env = new_env();
    let parent = env.root.parent().unwrap();
    fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).unwrap();
    let e = run(&env, vec![]).unwrap_err();
    assert_eq!(e.code(), "invalid_input", "{e}");
    assert!(e.to_string().contains("private"), "{e}");
}
