//! Image references, normalized by Docker's rules: no registry means `docker.io`,
//! a single-component name on Docker Hub gets `library/`, no tag and no digest
//! means `latest`.

use std::fmt;
use std::str::FromStr;

use crate::OciError;

/// The registry assumed when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag assumed when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
const MAX_NAME: usize = 255;

/// A normalized image reference: `docker.io/library/nginx:latest`,
/// `127.0.0.1:5000/py:1`, `reg/x@sha256:…`. `Display` prints the normalized form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`, `docker.io` for Docker Hub.
    pub registry: String,
    /// Path components joined by `/`, e.g. `library/nginx`.
    pub repository: String,
    /// The tag; `None` only when a digest is given.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`, when pinned.
    pub digest: Option<String>,
}

impl Reference {
    /// What a registry is asked for: the digest if pinned, else the tag.
    pub fn tag_or_digest(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// The same repository pinned to `digest` (tag kept for display).
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// The registry host without its port.
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }
}

/// `host` of `host[:port]`, brackets of an IPv6 literal removed.
pub(crate) fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = OciError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| OciError::InvalidReference {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() || input.len() > 4096 || input.trim() != input {
            return Err(bad("empty, too long or surrounded by whitespace"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => (r, Some(parse_digest(d).map_err(|r| bad(&r))?)),
            None => (input, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return Err(bad(
                "tag must be 1-128 of [A-Za-z0-9_.-], not starting with . or -",
            ));
        }
        let (registry, repository) = split_registry(name);
        if !registry.is_empty() && !valid_registry(registry) {
            return Err(bad("registry must be host[:port]"));
        }
        let registry = match registry {
            "" | "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY,
            r => r,
        };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        if repository.len() > MAX_NAME || !repository.split('/').all(valid_component) {
            return Err(bad(
                "repository components must be lowercase letters and digits, separated by . _ __ or -",
            ));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference {
            registry: registry.to_string(),
            repository,
            tag,
            digest,
        })
    }
}

/// Splits `name` into (registry, repository); the registry is the first component
/// when it looks like a host (has `.` or `:`, or is `localhost`).
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest)
        }
        _ => ("", name),
    }
}

/// Checks `sha256:<64 lowercase hex>`; other algorithms are refused (the blob store
/// addresses content by sha256 only).
pub(crate) fn parse_digest(d: &str) -> Result<String, String> {
    match d.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 && hex.bytes().all(is_lower_hex) => {
            Ok(d.to_string())
        }
        Some(("sha256", _)) => Err("a sha256 digest is 64 lowercase hex digits".into()),
        Some((alg, _)) => Err(format!(
            "digest algorithm {alg:?} is not supported, only sha256"
        )),
        None => Err("a digest is algorithm:hex, e.g. sha256:<64 hex>".into()),
    }
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum_lower(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = if let Some(rest) = r.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':').map(Some).unwrap_or(None)),
            None => return false,
        }
    } else {
        match r.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (r, None),
        }
    };
    let host_ok = if r.starts_with('[') {
        host.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'))
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    host_ok && port_ok && (r.starts_with('[') || !r[host.len()..].starts_with(']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        s.parse::<Reference>()
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .to_string()
    }

    #[test]
    fn docker_hub_defaults() {
        assert_eq!(norm("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(norm("nginx:1.25"), "docker.io/library/nginx:1.25");
        assert_eq!(norm("bitnami/redis"), "docker.io/bitnami/redis:latest");
        assert_eq!(norm("docker.io/nginx"), "docker.io/library/nginx:latest");
        assert_eq!(
            norm("index.docker.io/library/nginx:x"),
            "docker.io/library/nginx:x"
        );
    }

    #[test]
    fn registries_with_ports_and_hosts() {
        assert_eq!(norm("127.0.0.1:5000/py:1"), "127.0.0.1:5000/py:1");
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(norm("localhost:5000/a/b/c:v2"), "localhost:5000/a/b/c:v2");
        assert_eq!(norm("ghcr.io/org/img"), "ghcr.io/org/img:latest");
        assert_eq!(norm("[::1]:5000/x:y"), "[::1]:5000/x:y");
        let r: Reference = "127.0.0.1:5000/py:1".parse().unwrap();
        assert_eq!(r.host(), "127.0.0.1");
        assert_eq!(host_of("[::1]:5000"), "::1");
        // A first component without '.' or ':' is a namespace, not a registry.
        assert_eq!(norm("team/app:v1"), "docker.io/team/app:v1");
    }

    #[test]
    fn digests() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let r: Reference = format!("reg.example/x@{d}").parse().unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.tag_or_digest(), d);
        assert_eq!(r.to_string(), format!("reg.example/x@{d}"));
        assert_eq!(
            norm(&format!("nginx:1@{d}")),
            format!("docker.io/library/nginx:1@{d}")
        );
        assert!(
            format!("x@sha512:{}", "ab".repeat(64))
                .parse::<Reference>()
                .is_err()
        );
        assert!("x@sha256:abc".parse::<Reference>().is_err());
        assert!(
            format!("x@sha256:{}", "AB".repeat(32))
                .parse::<Reference>()
                .is_err()
        );
    }

    #[test]
    fn invalid() {
        for s in [
            "",
            "Nginx",
            "a//b",
            "a/",
            "/a",
            "a:",
            "a:-x",
            "reg:99999/x",
            " a",
            "a b",
            "x@",
            "a/../b",
            "a..b",
            "-a",
            "a-",
            "a/B",
        ] {
            let e = s.parse::<Reference>().err();
            assert!(e.is_some(), "{s:?} should be invalid");
            assert_eq!(e.map(|e| e.code()), Some("invalid_reference"));
        }
    }
}
