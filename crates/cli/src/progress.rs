//! Progress while a long request runs: `run` shows what its instance goes
//! through, `fork --count` how many forks run so far — both read from the
//! daemon's event stream (`GET /events`) while the request is in flight.
//! Drawn on stderr, and only when it is a terminal (indicatif hides itself
//! otherwise), so scripts and `--json` output are untouched.

use crate::client::Client;
use crate::events_cmd::SseParser;
use forkvm_core::observe::events::{Event, EventKind};
use http_body_util::BodyExt;
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

/// Follows the events of the instances `names` on `bar` until dropped.
pub struct Watch {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}

/// A spinner with the instance's state transitions (`run`).
pub async fn boot(c: &Client, name: &str) -> Watch {
    let bar = ProgressBar::new_spinner().with_message(format!("{name}: creating"));
    bar.enable_steady_tick(Duration::from_millis(120));
    let names = vec![name.to_string()];
    let b = bar.clone();
    let task = follow(c, names, move |ev| {
        if let EventKind::InstanceState {
            instance_name, to, ..
        } = &ev.kind
        {
            b.set_message(format!("{instance_name}: {to}"));
        }
    })
    .await;
    Watch { bar, task }
}

/// A bar of forks Running out of `names.len()` (`fork --count`).
pub async fn forks(c: &Client, names: Vec<String>) -> Watch {
    let bar = ProgressBar::new(names.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} forks running {pos}/{len} [{elapsed}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let b = bar.clone();
    let task = follow(c, names, move |ev| match &ev.kind {
        EventKind::InstanceState { to, .. } if to == "Running" => b.inc(1),
        EventKind::Handoff {
            instance_name,
            path: Some(p),
            ..
        } => b.set_message(format!("{instance_name} via {p}")),
        _ => {}
    })
    .await;
    Watch { bar, task }
}

/// Subscribes (before returning, so nothing of the request is missed) and
/// calls `f` with each event about one of `names`.
async fn follow(
    c: &Client,
    names: Vec<String>,
    f: impl Fn(&Event) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let stream = c.stream("/events", "text/event-stream").await;
    tokio::spawn(async move {
        // No events (an older daemon): no progress, the request goes on.
        let Ok((mut body, _conn)) = stream else {
            return;
        };
        let mut sse = SseParser::default();
        while let Some(Ok(frame)) = body.frame().await {
            let Some(bytes) = frame.data_ref() else {
                continue;
            };
            for data in sse.feed(bytes) {
                if let Ok(ev) = serde_json::from_str::<Event>(&data)
                    && ev
                        .kind
                        .instance_name()
                        .is_some_and(|n| names.iter().any(|x| x == n))
                {
                    f(&ev);
                }
            }
        }
    })
}
