//! `GET /instances/{id}/logs`: an instance's console (or VMM) log, whole or
//! followed, as plain text or server-sent events.

use crate::error::ApiError;
use crate::routes::{ApiPath, ApiQuery, AppState};
use crate::wire::*;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use forkvm_core::{LogFollow, LogSource};

/// Serial console output of an instance (or, with `source=vmm`, QEMU's own
/// log).
///
/// Plain text by default; with `Accept: text/event-stream` (as the hypeman
/// client sends) one server-sent event per line whose data is the line as a
/// JSON string. With `follow=true` the response stays open and carries what
/// is written next, until the instance stops or the client leaves.
#[utoipa::path(get, path = "/instances/{id}/logs", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name"), LogsQuery),
    responses((status = 200, description = "Log lines",
               content((String = "text/plain"), (String = "text/event-stream"))),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn instance_logs(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let source = match q.source.as_deref() {
        None | Some("app") => LogSource::App,
        Some("vmm") => LogSource::Vmm,
        Some("hypeman") => {
            return Err(ApiError::unsupported(
                "log source \"hypeman\" does not exist in forkvm (\"app\" or \"vmm\")",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(format!("unknown log source {other:?}")));
        }
    };
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let content_type = if sse {
        "text/event-stream"
    } else {
        "text/plain; charset=utf-8"
    };
    if q.follow != Some(true) {
        let text = m.logs(&id, q.tail, source).await?;
        let body = if sse { sse_body(&text) } else { text };
        return Ok(([(header::CONTENT_TYPE, content_type)], body).into_response());
    }
    let (text, follow) = m.follow_logs(&id, q.tail, source).await?;
    let body = Body::from_stream(followed(text, follow, sse));
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// The text so far, then each new chunk; as events, cut at line ends (a
/// partial line waits for its end, or for the stream's end).
fn followed(
    text: String,
    follow: LogFollow,
    sse: bool,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let first = if sse { sse_body(&text) } else { text };
    let state = (Some(first), Some(follow), Vec::<u8>::new());
    futures::stream::unfold(state, move |(first, follow, mut partial)| async move {
        if let Some(f) = first {
            return Some((Ok(Bytes::from(f)), (None, follow, partial)));
        }
        let mut follow = follow?;
        loop {
            match follow.next().await {
                Ok(Some(bytes)) if !sse => {
                    return Some((Ok(Bytes::from(bytes)), (None, Some(follow), partial)));
                }
                Ok(Some(bytes)) => {
                    partial.extend_from_slice(&bytes);
                    let Some(end) = partial.iter().rposition(|&b| b == b'\n') else {
                        continue;
                    };
                    let lines: Vec<u8> = partial.drain(..=end).collect();
                    let out = sse_body(&String::from_utf8_lossy(&lines));
                    return Some((Ok(Bytes::from(out)), (None, Some(follow), partial)));
                }
                Ok(None) | Err(_) if partial.is_empty() => return None,
                Ok(None) | Err(_) => {
                    let out = sse_body(&String::from_utf8_lossy(&partial));
                    return Some((Ok(Bytes::from(out)), (None, None, Vec::new())));
                }
            }
        }
    })
}

/// One server-sent event per line, its data the line as a JSON string (the
/// hypeman client JSON-decodes each event's data into a `str`).
pub(crate) fn sse_body(text: &str) -> String {
    let mut body = String::with_capacity(text.len() + text.len() / 4);
    for line in text.lines() {
        // Serializing a &str cannot fail.
        let data = serde_json::to_string(line).unwrap_or_default();
        body.push_str("data: ");
        body.push_str(&data);
        body.push_str("\n\n");
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_are_json_strings() {
        let body = sse_body("boot ok\r\nsaid \"hi\"\n\nend");
        assert_eq!(
            body,
            "data: \"boot ok\"\n\ndata: \"said \\\"hi\\\"\"\n\ndata: \"\"\n\ndata: \"end\"\n\n"
        );
        assert_eq!(sse_body(""), "");
    }
}
