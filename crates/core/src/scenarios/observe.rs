//! Metrics and events as operations really run: every fork counted once
//! in the stage histograms, every transition published.

use super::*;
use crate::observe::events::EventKind;
use crate::testkit::World;

fn count(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn forks_are_counted_once_per_stage_and_labelled_by_path() {
    let w = World::new().await;
    w.running("src").await;
    for r in w
        .mgr
        .fork("src", from_running("copy", Some(3)))
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let text = w.mgr.metrics_text().unwrap();
    let total = r#"forkvm_fork_stage_duration_seconds_count{kind="fork",stage="total",path="rpc"}"#;
    assert_eq!(count(&text, total), Some(3.0), "{text}");
    assert_eq!(
        count(&text, r#"forkvm_handoffs_total{path="rpc",outcome="ok"}"#),
        Some(3.0)
    );
    assert_eq!(
        count(
            &text,
            r#"forkvm_handoff_fallbacks_total{reason="no_armed_mailbox"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        count(&text, r#"forkvm_instances{state="Running"}"#),
        Some(4.0)
    );
    assert!(count(&text, "forkvm_memory_budget_mib").unwrap() > 0.0);
}

#[tokio::test]
async fn a_fork_publishes_its_transitions_and_handoff_in_order() {
    let w = World::new().await;
    w.running("src").await;
    let mut rx = w.mgr.observer().events.subscribe();
    fork_one(&w, "src", from_running("f", None)).await.unwrap();
    let mut seen = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev.kind {
            EventKind::InstanceState {
                instance_name, to, ..
            } if instance_name == "f" => seen.push(to),
            EventKind::Handoff {
                instance_name,
                path,
                outcome,
                ..
            } if instance_name == "f" => seen.push(format!("handoff {path:?} {outcome}")),
            _ => {}
        }
    }
    assert_eq!(seen.last().map(String::as_str), Some("Running"), "{seen:?}");
    assert!(
        seen.contains(&"handoff Some(\"rpc\") ok".to_string()),
        "{seen:?}"
    );
    w.mgr.delete("f").await.unwrap();
    let deleted = std::iter::from_fn(|| rx.try_recv().ok())
        .any(|e| matches!(e.kind, EventKind::InstanceDeleted { ref instance_name, .. } if instance_name == "f"));
    assert!(deleted);
}
