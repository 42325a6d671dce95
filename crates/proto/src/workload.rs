//! The checks of a [`WorkloadSpec`]: bounds, `KEY=VALUE` env entries, the
//! working directory and the OCI `user` forms. The agent validates every
//! StartWorkload with [`validate`] (the host is trusted, but a strict parser
//! turns a host bug into a clear error instead of a strange workload); hosts
//! may call it before sending to fail early with the same message.

use crate::agent::WorkloadSpec;

/// Most argv entries, and separately most env entries.
pub const MAX_ENTRIES: usize = 1024;
/// Longest argv or env entry, `working_dir` or `user`, in bytes.
pub const MAX_ENTRY_BYTES: usize = 4096;
/// Most bytes of all of a spec's strings together.
pub const MAX_TOTAL_BYTES: usize = 256 << 10;

/// A user or group as given: a number, or a name to look up in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdOrName {
    Id(u32),
    Name(String),
}

/// The OCI `user` field parsed: `""`, `uid`, `uid:gid`, `name`, `name:group`
/// (and mixes such as `name:gid`). An empty field means uid 0, looked up like
/// `"0"`. All-digit parts are ids, as in runc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: IdOrName,
    /// `None`: the user's primary group from the image's passwd (0 if none).
    pub group: Option<IdOrName>,
}

/// A spec that passed [`validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    pub argv: Vec<String>,
    /// Parsed `KEY=VALUE` entries in first-seen order; a repeated key keeps
    /// its last value (as Docker does).
    pub env: Vec<(String, String)>,
    /// Absolute; `/` when the spec left it empty.
    pub working_dir: String,
    pub user: UserSpec,
    /// Run in the agent's own root, mounting nothing.
    pub host_root: bool,
}

/// Why a spec was refused. Messages name the field and entry, never echo a
/// long value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("argv is empty")]
    EmptyArgv,
    #[error("argv[0] is empty")]
    EmptyProgram,
    #[error("{field} has {count} entries, at most {MAX_ENTRIES} allowed")]
    TooManyEntries { field: &'static str, count: usize },
    #[error("{field}[{index}] is {len} bytes, at most {MAX_ENTRY_BYTES} allowed")]
    EntryTooLong {
        field: &'static str,
        index: usize,
        len: usize,
    },
    #[error("{field} is {len} bytes, at most {MAX_ENTRY_BYTES} allowed")]
    FieldTooLong { field: &'static str, len: usize },
    #[error("the spec's strings are {total} bytes together, at most {MAX_TOTAL_BYTES} allowed")]
    TooLarge { total: usize },
    #[error("{field}[{index}] contains a NUL byte")]
    NulInEntry { field: &'static str, index: usize },
    #[error("{field} contains a NUL byte")]
    NulInField { field: &'static str },
    #[error("env[{index}] is not KEY=VALUE: {reason}")]
    BadEnv { index: usize, reason: &'static str },
    #[error("working_dir {0:?} is not an absolute path")]
    RelativeWorkingDir(String),
    #[error("user {user:?}: {reason}")]
    BadUser { user: String, reason: &'static str },
}

/// Checks `spec` against the bounds and parses its env and user.
pub fn validate(spec: &WorkloadSpec) -> Result<ValidSpec, SpecError> {
    check_bounds(spec)?;
    let program = spec.argv.first().ok_or(SpecError::EmptyArgv)?;
    if program.is_empty() {
        return Err(SpecError::EmptyProgram);
    }
    let env = parse_env(&spec.env)?;
    let working_dir = match spec.working_dir.as_str() {
        "" => "/".to_owned(),
        d if d.starts_with('/') => d.to_owned(),
        d => return Err(SpecError::RelativeWorkingDir(d.to_owned())),
    };
    Ok(ValidSpec {
        argv: spec.argv.clone(),
        env,
        working_dir,
        user: parse_user(&spec.user)?,
        host_root: spec.host_root,
    })
}

/// Counts, lengths, the total and NUL bytes, before anything is parsed.
fn check_bounds(spec: &WorkloadSpec) -> Result<(), SpecError> {
    let mut total = 0usize;
    for (field, list) in [("argv", &spec.argv), ("env", &spec.env)] {
        if list.len() > MAX_ENTRIES {
            return Err(SpecError::TooManyEntries {
                field,
                count: list.len(),
            });
        }
        for (index, e) in list.iter().enumerate() {
            if e.len() > MAX_ENTRY_BYTES {
                return Err(SpecError::EntryTooLong {
                    field,
                    index,
                    len: e.len(),
                });
            }
            if e.contains('\0') {
                return Err(SpecError::NulInEntry { field, index });
            }
            total += e.len();
        }
    }
    for (field, v) in [("working_dir", &spec.working_dir), ("user", &spec.user)] {
        if v.len() > MAX_ENTRY_BYTES {
            return Err(SpecError::FieldTooLong {
                field,
                len: v.len(),
            });
        }
        if v.contains('\0') {
            return Err(SpecError::NulInField { field });
        }
        total += v.len();
    }
    if total > MAX_TOTAL_BYTES {
        return Err(SpecError::TooLarge { total });
    }
    Ok(())
}

/// `KEY=VALUE` entries (the value may contain `=` or be empty) into pairs,
/// first-seen order, the last value of a repeated key winning.
pub fn parse_env(entries: &[String]) -> Result<Vec<(String, String)>, SpecError> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(entries.len());
    for (index, e) in entries.iter().enumerate() {
        let (k, v) = e.split_once('=').ok_or(SpecError::BadEnv {
            index,
            reason: "no '='",
        })?;
        if k.is_empty() {
            return Err(SpecError::BadEnv {
                index,
                reason: "empty key",
            });
        }
        match out.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.to_owned(),
            None => out.push((k.to_owned(), v.to_owned())),
        }
    }
    Ok(out)
}

/// Parses the OCI `user` field (see [`UserSpec`]).
pub fn parse_user(s: &str) -> Result<UserSpec, SpecError> {
    let bad = |reason| SpecError::BadUser {
        user: s.to_owned(),
        reason,
    };
    if s.is_empty() {
        return Ok(UserSpec {
            user: IdOrName::Id(0),
            group: None,
        });
    }
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    if user.is_empty() {
        return Err(bad("empty user before ':'"));
    }
    let user = id_or_name(user).map_err(bad)?;
    let group = match group {
        None => None,
        Some("") => return Err(bad("empty group after ':'")),
        Some(g) if g.contains(':') => return Err(bad("more than one ':'")),
        Some(g) => Some(id_or_name(g).map_err(bad)?),
    };
    Ok(UserSpec { user, group })
}

/// One part of `user`: all digits = an id (`u32`, not the reserved -1),
/// otherwise a name with no character passwd/group syntax gives meaning to.
fn id_or_name(part: &str) -> Result<IdOrName, &'static str> {
    if part.bytes().all(|b| b.is_ascii_digit()) {
        return match part.parse::<u32>() {
            Ok(u32::MAX) | Err(_) => Err("id out of range (0..4294967294)"),
            Ok(id) => Ok(IdOrName::Id(id)),
        };
    }
    if part.len() > 256 {
        return Err("name longer than 256 bytes");
    }
    if part
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == '/')
    {
        return Err("name contains whitespace, a control character, ',' or '/'");
    }
    Ok(IdOrName::Name(part.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str], env: &[&str]) -> WorkloadSpec {
        WorkloadSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn valid_spec_parses_env_and_defaults() {
        let mut s = spec(&["/bin/app", "--x"], &["A=1", "B=x=y", "C=", "A=2"]);
        s.user = "app:staff".into();
        s.host_root = true;
        let v = validate(&s).unwrap();
        assert!(v.host_root);
        assert_eq!(v.argv, ["/bin/app", "--x"]);
        assert_eq!(
            v.env,
            [
                ("A".to_owned(), "2".to_owned()),
                ("B".to_owned(), "x=y".to_owned()),
                ("C".to_owned(), String::new())
            ]
        );
        assert_eq!(v.working_dir, "/");
        assert_eq!(
            v.user,
            UserSpec {
                user: IdOrName::Name("app".into()),
                group: Some(IdOrName::Name("staff".into()))
            }
        );
    }

    #[test]
    fn argv_and_env_shape_is_checked() {
        assert_eq!(validate(&spec(&[], &[])), Err(SpecError::EmptyArgv));
        assert_eq!(validate(&spec(&[""], &[])), Err(SpecError::EmptyProgram));
        for (bad, reason) in [("NOEQUALS", "no '='"), ("=v", "empty key")] {
            assert_eq!(
                validate(&spec(&["x"], &["OK=1", bad])),
                Err(SpecError::BadEnv { index: 1, reason })
            );
        }
        assert_eq!(
            validate(&spec(&["x", "a\0b"], &[])),
            Err(SpecError::NulInEntry {
                field: "argv",
                index: 1
            })
        );
        let mut s = spec(&["x"], &[]);
        s.working_dir = "rel/dir".into();
        assert_eq!(
            validate(&s),
            Err(SpecError::RelativeWorkingDir("rel/dir".into()))
        );
        s.working_dir = "/srv/app".into();
        assert_eq!(validate(&s).unwrap().working_dir, "/srv/app");
    }

    #[test]
    fn bounds_are_enforced_at_the_edges() {
        // Exactly at each limit passes.
        let at = "a".repeat(MAX_ENTRY_BYTES);
        let mut s = spec(&["x"], &[]);
        s.argv = vec![at.clone(); 63];
        assert!(validate(&s).is_ok(), "63 x 4 KiB = 252 KiB");
        let many = WorkloadSpec {
            argv: vec!["x".into(); MAX_ENTRIES],
            env: vec!["K=v".into(); MAX_ENTRIES],
            ..Default::default()
        };
        assert!(validate(&many).is_ok());

        // One past each limit fails with the field named.
        let mut s = spec(&["x"], &[]);
        s.argv.push("a".repeat(MAX_ENTRY_BYTES + 1));
        assert_eq!(
            validate(&s),
            Err(SpecError::EntryTooLong {
                field: "argv",
                index: 1,
                len: MAX_ENTRY_BYTES + 1
            })
        );
        let s = WorkloadSpec {
            argv: vec!["x".into()],
            env: vec!["K=v".into(); MAX_ENTRIES + 1],
            ..Default::default()
        };
        assert_eq!(
            validate(&s),
            Err(SpecError::TooManyEntries {
                field: "env",
                count: MAX_ENTRIES + 1
            })
        );
        let s = WorkloadSpec {
            argv: vec![at.clone(); 64],
            env: vec!["K=v".into()],
            ..Default::default()
        };
        assert_eq!(
            validate(&s),
            Err(SpecError::TooLarge {
                total: 64 * MAX_ENTRY_BYTES + 3
            })
        );
        let mut s = spec(&["x"], &[]);
        s.user = "u".repeat(MAX_ENTRY_BYTES + 1);
        assert!(matches!(
            validate(&s),
            Err(SpecError::FieldTooLong { field: "user", .. })
        ));
        s.user = "a\0".into();
        assert_eq!(validate(&s), Err(SpecError::NulInField { field: "user" }));
    }

    #[test]
    fn user_forms() {
        let id = IdOrName::Id;
        let name = |n: &str| IdOrName::Name(n.into());
        let ok = |s: &str| parse_user(s).unwrap();
        assert_eq!(
            ok(""),
            UserSpec {
                user: id(0),
                group: None
            }
        );
        assert_eq!(
            ok("1000"),
            UserSpec {
                user: id(1000),
                group: None
            }
        );
        assert_eq!(
            ok("1000:50"),
            UserSpec {
                user: id(1000),
                group: Some(id(50))
            }
        );
        assert_eq!(
            ok("app"),
            UserSpec {
                user: name("app"),
                group: None
            }
        );
        assert_eq!(
            ok("app:50"),
            UserSpec {
                user: name("app"),
                group: Some(id(50))
            }
        );
        assert_eq!(
            ok("www-data:www-data"),
            UserSpec {
                user: name("www-data"),
                group: Some(name("www-data"))
            }
        );
        assert_eq!(ok("4294967294").user, id(u32::MAX - 1));
        for bad in [
            ":50",
            "app:",
            "a:b:c",
            "4294967295",
            "99999999999",
            "a b",
            "a,b",
            "../x",
            "tab\there",
        ] {
            assert!(
                matches!(parse_user(bad), Err(SpecError::BadUser { .. })),
                "{bad:?}: {:?}",
                parse_user(bad)
            );
        }
    }
}
