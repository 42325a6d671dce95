//! An instance's logs: its serial console (`app`, what the guest prints)
//! and its VMM's own log (`vmm`, QEMU's messages), read whole (bounded) or
//! followed as they grow until the instance stops.

use crate::console::{self, Follower};
use crate::error::{CoreError, Result};
use crate::services::Services;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Which log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogSource {
    /// The serial console (guest output).
    #[default]
    App,
    /// QEMU's own log (its warnings and errors).
    Vmm,
}

/// How often a followed log is looked at.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// The most one read of a followed log returns (a guest may write fast).
const FOLLOW_CHUNK: u64 = 64 * 1024;

fn path_of(svc: &Services, id_or_name: &str, source: LogSource) -> Result<(String, PathBuf)> {
    let inst = svc.find(id_or_name)?;
    let paths = svc.paths(&inst);
    let path = match source {
        LogSource::App => paths.console_log.clone(),
        LogSource::Vmm => paths.handle(&inst.id, 0).qemu_log,
    };
    Ok((inst.id, path))
}

/// The log's text; `tail` = last N lines. Read off the async threads: a
/// console can be megabytes.
pub(crate) async fn read(
    svc: &Services,
    id_or_name: &str,
    tail: Option<usize>,
    source: LogSource,
) -> Result<String> {
    let (_, path) = path_of(svc, id_or_name, source)?;
    let max = svc.cfg.console_max_bytes;
    let text = tokio::task::spawn_blocking(move || console::read(&path, max))
        .await
        .map_err(|e| CoreError::Internal(format!("log reader: {e}")))?
        .map_err(CoreError::io("reading a log"))?;
    Ok(match tail {
        Some(n) => last_lines(&text, n),
        None => text,
    })
}

/// The log so far (as [`read`]) and a follower of what comes next.
pub(crate) async fn follow(
    svc: &Arc<Services>,
    id_or_name: &str,
    tail: Option<usize>,
    source: LogSource,
) -> Result<(String, LogFollow)> {
    let (id, path) = path_of(svc, id_or_name, source)?;
    // From the end as it is now: a line written between this and the read
    // below may show twice, never not at all.
    let follower = Follower::from_end(&path);
    let text = read(svc, &id, tail, source).await?;
    Ok((
        text,
        LogFollow {
            svc: svc.clone(),
            id,
            follower,
        },
    ))
}

/// New output of one instance's log as it is written.
pub struct LogFollow {
    svc: Arc<Services>,
    id: String,
    follower: Follower,
}

impl LogFollow {
    /// The next bytes written; `None` once the instance has no VMM any more
    /// (stopped, in Standby, deleted) and all it wrote was returned.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            let alive = self
                .svc
                .store
                .find_instance(&self.id)?
                .is_some_and(|i| i.state.has_vmm());
            let mut f = self.follower.clone();
            let (f, bytes) = tokio::task::spawn_blocking(move || {
                let r = f.read_new(FOLLOW_CHUNK);
                (f, r)
            })
            .await
            .map_err(|e| CoreError::Internal(format!("log follower: {e}")))?;
            self.follower = f;
            let bytes = bytes.map_err(CoreError::io("following a log"))?;
            if !bytes.is_empty() {
                return Ok(Some(bytes));
            }
            if !alive {
                return Ok(None);
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = lines[start..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(last_lines("a\nb", 5), "a\nb\n");
        assert_eq!(last_lines("", 3), "");
    }
}
