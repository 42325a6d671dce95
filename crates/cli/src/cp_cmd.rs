//! `forkvm cp` as `docker cp`: `LOCAL NAME:PATH` or `NAME:PATH LOCAL`, files
//! and directories, over the cp WebSocket (`GET /instances/{id}/cp`,
//! hypeman's protocol: one connection per file or directory written into
//! the guest, one stream of headers and bytes out of it).
//!
//! What comes out of the guest is the guest's to choose, so it is checked
//! before it touches this host: entry paths must stay below the target
//! (no `..`, no absolute path), nothing is written through a symbolic link
//! (every parent is looked at without following links; files are opened
//! with O_NOFOLLOW), set-id bits are dropped, and the total is bounded
//! (`--max-bytes`).

use crate::client::{Client, seg};
use crate::exec_stream::{Ws, connect};
use anyhow::{Context, Result, bail, ensure};
use futures::{SinkExt, StreamExt};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, clap::Args)]
pub struct CpArgs {
    /// LOCAL or NAME:PATH.
    pub src: String,
    /// NAME:PATH or LOCAL.
    pub dst: String,
    /// Follow a symbolic link at the guest path being copied out.
    #[arg(short = 'L', long)]
    pub follow_link: bool,
    /// Most bytes a copy out of the guest may write here.
    #[arg(long, default_value_t = 16 << 30)]
    pub max_bytes: u64,
}

/// `NAME:PATH` → (name, path); a local path (`/…`, `./…`, no colon) → None.
fn remote(s: &str) -> Option<(&str, &str)> {
    if s.starts_with('/') || s.starts_with('.') {
        return None;
    }
    let (name, path) = s.split_once(':')?;
    (!name.is_empty() && !name.contains('/') && !path.is_empty()).then_some((name, path))
}

pub async fn cp(c: &Client, a: &CpArgs) -> Result<ExitCode> {
    match (remote(&a.src), remote(&a.dst)) {
        (None, Some((name, path))) => to_guest(c, Path::new(&a.src), name, path).await?,
        (Some((name, path)), None) => from_guest(c, name, path, Path::new(&a.dst), a).await?,
        _ => bail!("one of SRC and DST must be NAME:PATH and the other a local path"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn open(c: &Client, name: &str, req: serde_json::Value) -> Result<Ws> {
    let mut ws = connect(c, &format!("/instances/{}/cp", seg(name))).await?;
    ws.send(Message::Text(req.to_string().into())).await?;
    Ok(ws)
}

async fn to_guest(c: &Client, local: &Path, name: &str, path: &str) -> Result<()> {
    let md = fs::symlink_metadata(local).with_context(|| format!("{}", local.display()))?;
    let base = local
        .file_name()
        .context("the local path has no name to copy")?
        .to_string_lossy()
        .into_owned();
    // As docker cp: into an existing directory, else as the path itself.
    let stat: serde_json::Value = c
        .get_json(&format!("/instances/{}/stat?path={}", seg(name), seg(path)))
        .await?;
    let target = if stat["is_dir"] == true {
        format!("{}/{base}", path.trim_end_matches('/'))
    } else {
        path.to_string()
    };
    if md.is_dir() {
        send_tree(c, name, local, &target).await
    } else {
        send_file(c, name, local, &target, md.permissions().mode()).await
    }
}

async fn send_tree(c: &Client, name: &str, dir: &Path, target: &str) -> Result<()> {
    let mode = fs::metadata(dir)?.permissions().mode();
    let req = serde_json::json!({"direction": "to", "guest_path": target, "is_dir": true,
                                 "mode": mode & 0o7777});
    let mut ws = open(c, name, req).await?;
    ws.send(Message::Text(r#"{"type":"end"}"#.into())).await?;
    finish(ws, target).await?;
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let t = format!("{target}/{}", e.file_name().to_string_lossy());
        let md = fs::symlink_metadata(&p)?;
        if md.is_dir() {
            Box::pin(send_tree(c, name, &p, &t)).await?;
        } else if md.is_file() {
            send_file(c, name, &p, &t, md.permissions().mode()).await?;
        } else {
            eprintln!("skipping {} (not a file or directory)", p.display());
        }
    }
    Ok(())
}

async fn send_file(c: &Client, name: &str, local: &Path, target: &str, mode: u32) -> Result<()> {
    let req = serde_json::json!({"direction": "to", "guest_path": target, "mode": mode & 0o7777});
    let mut ws = open(c, name, req).await?;
    let mut f = tokio::fs::File::open(local).await?;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut f, &mut buf).await?;
        if n == 0 {
            break;
        }
        ws.send(Message::Binary(buf[..n].to_vec().into())).await?;
    }
    ws.send(Message::Text(r#"{"type":"end"}"#.into())).await?;
    finish(ws, target).await
}

/// The `result` of a copy into the guest.
async fn finish(mut ws: Ws, target: &str) -> Result<()> {
    while let Some(msg) = ws.next().await {
        if let Message::Text(t) = msg? {
            let v: serde_json::Value = serde_json::from_str(t.as_str())?;
            match v["type"].as_str() {
                Some("result") if v["success"] == true => return Ok(()),
                Some("result") | Some("error") => bail!(
                    "{target}: {}",
                    v["error"]
                        .as_str()
                        .or(v["message"].as_str())
                        .unwrap_or("failed")
                ),
                _ => {}
            }
        }
    }
    bail!("{target}: the daemon closed the copy without a result")
}

/// Where the entries of a copy out land: `dir` joined with each entry's
/// path, its first component replaced by `rename` when set.
struct Landing {
    dir: PathBuf,
    rename: Option<String>,
}

impl Landing {
    fn new(local: &Path) -> Result<Self> {
        if local.is_dir() {
            return Ok(Self {
                dir: local.to_path_buf(),
                rename: None,
            });
        }
        let name = local.file_name().context("the local path has no name")?;
        let dir = match local.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Self {
            dir,
            rename: Some(name.to_string_lossy().into_owned()),
        })
    }

    /// The local path of a guest entry, or an error for one that would
    /// leave the target or go through a symbolic link.
    fn place(&self, entry: &str) -> Result<PathBuf> {
        let mut rel = PathBuf::new();
        for (i, comp) in Path::new(entry).components().enumerate() {
            let Component::Normal(c) = comp else {
                bail!("the guest sent an entry outside the copy: {entry:?}");
            };
            match (i, &self.rename) {
                (0, Some(r)) => rel.push(r),
                _ => rel.push(c),
            }
        }
        ensure!(
            !rel.as_os_str().is_empty(),
            "the guest sent an empty entry path"
        );
        let mut at = self.dir.clone();
        let parents: Vec<_> = rel
            .parent()
            .into_iter()
            .flat_map(Path::components)
            .collect();
        for c in parents {
            at.push(c);
            if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                bail!(
                    "refusing to write through the symbolic link {}",
                    at.display()
                );
            }
        }
        Ok(self.dir.join(rel))
    }
}

async fn from_guest(c: &Client, name: &str, path: &str, local: &Path, a: &CpArgs) -> Result<()> {
    let req =
        serde_json::json!({"direction": "from", "guest_path": path, "follow_links": a.follow_link});
    let mut ws = open(c, name, req).await?;
    let landing = Landing::new(local)?;
    let mut file: Option<(fs::File, PathBuf)> = None;
    let mut total = 0u64;
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Binary(b) => {
                total += b.len() as u64;
                ensure!(
                    total <= a.max_bytes,
                    "the copy is over --max-bytes ({})",
                    a.max_bytes
                );
                let (f, p) = file
                    .as_mut()
                    .context("the guest sent data before a header")?;
                f.write_all(&b).with_context(|| p.display().to_string())?;
            }
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                match v["type"].as_str() {
                    Some("header") => file = entry(&landing, &v)?,
                    Some("end") if v["final"] == true => return Ok(()),
                    Some("end") => file = None,
                    Some("error") => bail!(
                        "{}: {}",
                        v["path"].as_str().unwrap_or(path),
                        v["message"].as_str().unwrap_or("failed")
                    ),
                    _ => {}
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    bail!("the copy ended before its last entry")
}

/// Makes what a header describes; a regular file is returned open.
fn entry(landing: &Landing, h: &serde_json::Value) -> Result<Option<(fs::File, PathBuf)>> {
    let p = landing.place(h["path"].as_str().unwrap_or_default())?;
    // Permission bits only: no set-id from a guest.
    let mode = u32::try_from(h["mode"].as_u64().unwrap_or(0o644)).unwrap_or(0o644) & 0o777;
    if h["is_dir"] == true {
        fs::create_dir_all(&p).with_context(|| p.display().to_string())?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode | 0o700))?;
        return Ok(None);
    }
    if h["is_symlink"] == true {
        let _ = fs::remove_file(&p);
        std::os::unix::fs::symlink(h["link_target"].as_str().unwrap_or_default(), &p)
            .with_context(|| p.display().to_string())?;
        return Ok(None);
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
        .with_context(|| p.display().to_string())?;
    Ok(Some((f, p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_specs_are_told_from_local_paths() {
        assert_eq!(remote("web:/etc/hosts"), Some(("web", "/etc/hosts")));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("/tmp/x:y"), None);
        assert_eq!(remote("file.txt"), None);
        assert_eq!(remote("a/b:c"), None);
    }

    #[test]
    fn guest_entries_stay_inside_and_never_go_through_links() {
        let t = tempfile::tempdir().unwrap();
        let into = Landing::new(t.path()).unwrap();
        assert_eq!(into.place("d/f").unwrap(), t.path().join("d/f"));
        for bad in ["../x", "/etc/passwd", "d/../../x", ""] {
            assert!(into.place(bad).is_err(), "{bad}");
        }
        std::os::unix::fs::symlink("/etc", t.path().join("l")).unwrap();
        assert!(into.place("l/passwd").is_err());
        let renamed = Landing::new(&t.path().join("new")).unwrap();
        assert_eq!(renamed.place("orig/f").unwrap(), t.path().join("new/f"));
    }
}
