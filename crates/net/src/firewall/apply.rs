//! Applying a ruleset: `nft -f -` in the calling thread's network namespace
//! (a child process inherits it), and IPv4 forwarding.

use super::{Ruleset, TABLE};
use crate::NetError;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;
use tracing::debug;

/// The nftables command-line tool (Debian's `nftables` package).
pub const NFT_BIN: &str = "nft";

/// Replace forkvm's tables with `rules` (one transaction: all or nothing).
pub async fn apply(rules: &Ruleset) -> Result<(), NetError> {
    let script = rules.script();
    run_nft(&script).await?;
    debug!(bytes = script.len(), "nftables ruleset applied");
    Ok(())
}

/// Run an `nft -f` script of [`Ruleset`]'s making (e.g.
/// [`Ruleset::activation_from`]); one transaction.
pub async fn apply_script(script: &str) -> Result<(), NetError> {
    run_nft(script).await
}

/// Remove forkvm's tables (idempotent).
pub async fn remove_tables() -> Result<(), NetError> {
    let mut script = String::new();
    for family in ["bridge", "ip"] {
        script.push_str(&format!(
            "table {family} {TABLE}\ndelete table {family} {TABLE}\n"
        ));
    }
    run_nft(&script).await
}

/// Turn on IPv4 forwarding in the calling thread's namespace (guests'
/// egress and published ports are routed through it). Reads first: a
/// namespace that already forwards is left untouched.
pub fn enable_forwarding() -> Result<(), NetError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let io = |source| NetError::Sysctl {
        path: PATH.into(),
        source,
    };
    if std::fs::read_to_string(PATH).map_err(io)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(PATH, "1\n").map_err(io)
}

async fn run_nft(script: &str) -> Result<(), NetError> {
    let mut child = tokio::process::Command::new(NFT_BIN)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NetError::NftSpawn { source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|source| NetError::NftSpawn { source })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| NetError::NftSpawn { source })?;
    if !out.status.success() {
        return Err(NetError::Nft {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
