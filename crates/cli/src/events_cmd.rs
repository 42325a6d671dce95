//! `forkvm events`: the daemon's event stream (`GET /events`), one line per
//! event as it happens, or the JSON objects with `--json`.

use crate::client::{Client, ClientError};
use anyhow::{Context, Result};
use forkvm_core::observe::events::{Event, EventKind};
use http_body_util::BodyExt;

/// Server-sent events, parsed incrementally. Hand-rolled: forkvm's stream
/// uses three fields (`event`, `id`, `data`) on single lines, ~30 lines here
/// against a dependency.
#[derive(Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    data: String,
}

impl SseParser {
    /// Feeds bytes; returns the `data` of every event they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(std::mem::take(&mut self.data));
                }
            } else if let Some(d) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        out
    }
}

pub async fn events(
    c: &Client,
    json: bool,
    instance: Option<&str>,
) -> Result<std::process::ExitCode> {
    let path = match instance {
        Some(i) => format!("/events?instance={}", crate::client::seg(i)),
        None => "/events".to_string(),
    };
    let (mut body, _conn) = c
        .stream(&path, "text/event-stream")
        .await
        .map_err(|e: ClientError| anyhow::anyhow!(e))?;
    let mut sse = SseParser::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the event stream")?;
        let Some(bytes) = frame.data_ref() else {
            continue;
        };
        for data in sse.feed(bytes) {
            if json {
                println!("{data}");
                continue;
            }
            match serde_json::from_str::<Event>(&data) {
                Ok(ev) => println!("{}", line(&ev)),
                // `lost` events and anything newer than this CLI.
                Err(_) => println!("{data}"),
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// One human-readable line per event.
fn line(ev: &Event) -> String {
    let at = ev.at.format("%H:%M:%S%.3f");
    let what = match &ev.kind {
        EventKind::InstanceState {
            instance_name,
            from,
            to,
            error,
            ..
        } => {
            let from = from.as_deref().unwrap_or("-");
            let err = error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            format!("instance {instance_name}: {from} -> {to}{err}")
        }
        EventKind::InstanceDeleted { instance_name, .. } => {
            format!("instance {instance_name}: deleted")
        }
        EventKind::Handoff {
            instance_name,
            path,
            outcome,
            fallback_reason,
            error,
            ..
        } => {
            let path = path.as_deref().unwrap_or("-");
            let why = fallback_reason
                .as_deref()
                .map(|r| format!(" (fell back: {r})"))
                .unwrap_or_default();
            let err = error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            format!("instance {instance_name}: handoff {outcome} via {path}{why}{err}")
        }
        EventKind::SnapshotCreated {
            snapshot_id,
            instance_id,
            ..
        } => format!("snapshot {snapshot_id}: created from {instance_id}"),
        EventKind::SnapshotDeleted { snapshot_id } => format!("snapshot {snapshot_id}: deleted"),
    };
    // Names and errors can carry guest text; print them inert.
    format!("{at}  {}", what.escape_debug())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_at_blank_lines_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.feed(b"event: handoff\nid: 1\ndata: {\"a\"").is_empty());
        let got = p.feed(b":1}\n\n: keep-alive\n\nevent: x\r\ndata: two\r\n\r\n");
        assert_eq!(got, ["{\"a\":1}", "two"]);
    }
}
