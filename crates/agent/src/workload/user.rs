//! The workload's uid and gid from the OCI `user` field ([`UserSpec`]): ids
//! as given, names looked up in the image's `/etc/passwd` and `/etc/group`.
//! The files come from the image, so reading is bounded (size, line length)
//! and refuses symbolic links, which would resolve against the agent's root
//! rather than the image's.

use std::io::Read;
use std::path::Path;

use forkvm_proto::{IdOrName, UserSpec};

/// Largest passwd or group file read.
pub const MAX_DB_BYTES: u64 = 1 << 20;
/// Longer lines are skipped (no real entry is this long).
const MAX_LINE_BYTES: usize = 4096;

/// The identity the workload runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
    #[error("{path} is larger than {MAX_DB_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path} is a symbolic link; refusing to follow it outside the image")]
    Symlink { path: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Resolves `spec` against the databases under `root` (the image's root, or
/// `/` for the agent's own). Numeric user and group need no file; a numeric
/// user without a group takes its passwd entry's group, else 0 (as runc).
pub fn resolve(spec: &UserSpec, root: &Path) -> Result<Ids, UserError> {
    let passwd = match (&spec.user, &spec.group) {
        (IdOrName::Id(_), Some(IdOrName::Id(_))) => String::new(),
        _ => read_db(root, "passwd")?.unwrap_or_default(),
    };
    let (uid, primary_gid) = match &spec.user {
        IdOrName::Id(uid) => {
            let gid = passwd_entries(&passwd)
                .find(|e| e.1 == *uid)
                .map_or(0, |e| e.2);
            (*uid, gid)
        }
        IdOrName::Name(name) => {
            let e = passwd_entries(&passwd)
                .find(|e| e.0 == name)
                .ok_or_else(|| UserError::UnknownUser(name.clone()))?;
            (e.1, e.2)
        }
    };
    let gid = match &spec.group {
        None => primary_gid,
        Some(IdOrName::Id(gid)) => *gid,
        Some(IdOrName::Name(name)) => {
            let group = read_db(root, "group")?.unwrap_or_default();
            group_entries(&group)
                .find(|e| e.0 == name)
                .map(|e| e.1)
                .ok_or_else(|| UserError::UnknownGroup(name.clone()))?
        }
    };
    Ok(Ids { uid, gid })
}

/// `root/etc/<name>`, at most [`MAX_DB_BYTES`]; `None` if absent.
fn read_db(root: &Path, name: &str) -> Result<Option<String>, UserError> {
    let etc = root.join("etc");
    let path = etc.join(name);
    for p in [&etc, &path] {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UserError::Symlink {
                    path: p.display().to_string(),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(UserError::Io {
                    path: p.display().to_string(),
                    source,
                });
            }
        }
    }
    let io = |source| UserError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .map_err(io)?
        .take(MAX_DB_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_DB_BYTES {
        return Err(UserError::TooLarge {
            path: path.display().to_string(),
        });
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Lines of a colon-separated database worth parsing: bounded length, no
/// comments or blanks.
fn db_lines(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| l.len() <= MAX_LINE_BYTES && !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
}

/// `(name, uid, gid)` of each well-formed passwd line
/// (`name:password:uid:gid:gecos:home:shell`).
pub fn passwd_entries(text: &str) -> impl Iterator<Item = (&str, u32, u32)> {
    db_lines(text).filter_map(|f| {
        if f.len() < 4 {
            return None;
        }
        Some((f[0], f[2].parse().ok()?, f[3].parse().ok()?))
    })
}

/// `(name, gid)` of each well-formed group line (`name:password:gid:members`).
pub fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32)> {
    db_lines(text).filter_map(|f| {
        if f.len() < 3 {
            return None;
        }
        Some((f[0], f[2].parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkvm_proto::workload::parse_user;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        broken:x:notanumber:1::/:/bin/false\n\
        short:x\n\
        app:x:1000:1001:App:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1001:\n";

    fn image() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(d.path().join("etc/group"), GROUP).unwrap();
        d
    }

    fn ids(user: &str, root: &Path) -> Result<Ids, UserError> {
        resolve(&parse_user(user).unwrap(), root)
    }

    #[test]
    fn parses_well_formed_lines_only() {
        let p: Vec<_> = passwd_entries(PASSWD).collect();
        assert_eq!(p, [("root", 0, 0), ("app", 1000, 1001)]);
        let long = format!("{}:x:5:5::/:/bin/sh\n", "a".repeat(MAX_LINE_BYTES));
        assert_eq!(passwd_entries(&long).count(), 0);
        let g: Vec<_> = group_entries(GROUP).collect();
        assert_eq!(g, [("root", 0), ("staff", 50), ("app", 1001)]);
    }

    #[test]
    fn resolves_every_user_form() {
        let d = image();
        let r = d.path();
        let id = |uid, gid| Ids { uid, gid };
        assert_eq!(ids("", r).unwrap(), id(0, 0));
        assert_eq!(ids("app", r).unwrap(), id(1000, 1001));
        assert_eq!(ids("1000", r).unwrap(), id(1000, 1001));
        assert_eq!(ids("4242", r).unwrap(), id(4242, 0));
        assert_eq!(ids("app:staff", r).unwrap(), id(1000, 50));
        assert_eq!(ids("app:7", r).unwrap(), id(1000, 7));
        assert_eq!(ids("5:6", r).unwrap(), id(5, 6));
        assert!(matches!(ids("nobody", r), Err(UserError::UnknownUser(_))));
        assert!(matches!(
            ids("app:wheel", r),
            Err(UserError::UnknownGroup(_))
        ));
    }

    #[test]
    fn missing_symlinked_or_huge_databases() {
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(ids("5", empty.path()).unwrap(), Ids { uid: 5, gid: 0 });
        assert!(matches!(
            ids("app", empty.path()),
            Err(UserError::UnknownUser(_))
        ));

        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("etc/passwd")).unwrap();
        assert!(matches!(
            ids("root", d.path()),
            Err(UserError::Symlink { .. })
        ));

        let d = image();
        let big = "x".repeat(MAX_DB_BYTES as usize + 1);
        std::fs::write(d.path().join("etc/passwd"), big).unwrap();
        assert!(matches!(
            ids("app", d.path()),
            Err(UserError::TooLarge { .. })
        ));
        // Both ids numeric: the databases are not read at all.
        assert_eq!(ids("1:2", d.path()).unwrap(), Ids { uid: 1, gid: 2 });
    }
}
