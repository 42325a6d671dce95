//! `GET /metrics` (Prometheus), `GET /events` (server-sent events) and the
//! middleware that times every request.

use crate::error::ApiError;
use crate::routes::{ApiQuery, AppState};
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use forkvm_core::observe::events::Event;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use std::convert::Infallible;
use std::time::Instant;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use utoipa::IntoParams;

/// Prometheus metrics (OpenMetrics text format).
///
/// Fork and restore stage durations by handoff path
/// (`forkvm_fork_stage_duration_seconds`), handoff outcomes and fallbacks,
/// forged acks, instances by state and their transitions, API request
/// durations by route and status, and memory/capacity gauges. The series
/// are listed in docs/operations.md.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Metrics",
               content((String = "application/openmetrics-text")))))]
pub(crate) async fn metrics(State(m): State<AppState>) -> Result<Response, ApiError> {
    let text = tokio::task::spawn_blocking(move || m.metrics_text())
        .await
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("metrics task: {e}"),
            )
        })??;
    Ok((
        [(
            header::CONTENT_TYPE,
            forkvm_core::observe::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

/// `GET /events` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only events about this instance (id or name).
    pub instance: Option<String>,
}

/// A stream of what happens, as server-sent events.
///
/// One event per instance state transition (`instance_state`), deleted
/// instance (`instance_deleted`), handoff outcome (`handoff`), snapshot
/// created or deleted (`snapshot_created`, `snapshot_deleted`): the SSE
/// event name is the `type`, the id its `seq`, the data the JSON object. No
/// replay: a client sees what happens while it is connected. A client that
/// falls behind by more than 1024 events gets a `lost` event with the count
/// (`{"lost": n}`) and the stream goes on.
#[utoipa::path(get, path = "/events", tag = "health", params(EventsQuery),
    responses((status = 200, description = "Event stream",
               content((String = "text/event-stream")))))]
pub(crate) async fn events(
    State(m): State<AppState>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = m.observer().events.subscribe();
    let filter = q.instance;
    let stream = BroadcastStream::new(rx).filter_map(move |item| {
        let out = match item {
            Ok(ev) if matches(&ev, filter.as_deref()) => Some(sse_event(&ev)),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(
                SseEvent::default()
                    .event("lost")
                    .data(format!("{{\"lost\":{n}}}")),
            ),
        };
        std::future::ready(out.map(Ok))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn matches(ev: &Event, instance: Option<&str>) -> bool {
    let Some(want) = instance else { return true };
    ev.kind.instance_id() == Some(want) || ev.kind.instance_name() == Some(want)
}

fn sse_event(ev: &Event) -> SseEvent {
    let e = SseEvent::default()
        .event(ev.kind.name())
        .id(ev.seq.to_string());
    // An Event always serialises (strings, numbers, a timestamp).
    e.json_data(ev)
        .unwrap_or_else(|_| SseEvent::default().event("error"))
}

/// Times every request into `forkvm_api_request_duration_seconds`, labelled
/// with the route template (bounded), never the raw path.
pub(crate) async fn time_requests(State(m): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().as_str().to_string();
    let t = Instant::now();
    let resp = next.run(req).await;
    m.observer().metrics.request(
        &method,
        &route,
        resp.status().as_u16(),
        t.elapsed().as_secs_f64(),
    );
    resp
}
