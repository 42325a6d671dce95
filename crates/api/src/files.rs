//! A guest's files: `GET /instances/{id}/stat` and the `GET
//! /instances/{id}/cp` WebSocket, in hypeman's protocol (its server's
//! `cp.go` was read to match it):
//!
//! - the client's first message is text, a JSON [`CpRequest`];
//! - direction `to` (one file, or one directory made, per connection): the
//!   client sends the file's bytes as binary messages, then text
//!   `{"type":"end"}`; the server answers `{"type":"result","success":…,
//!   "bytes_written":…,"error":…}`;
//! - direction `from`: the server sends, per entry, text `{"type":"header",
//!   "path","mode","is_dir","is_symlink","link_target","size","mtime","uid",
//!   "gid"}`, the bytes as binary messages, text `{"type":"end","final":
//!   false}`; the last end has `"final": true`; a failure is text
//!   `{"type":"error","message","path"}`.

use crate::error::ApiError;
use crate::routes::{ApiPath, ApiQuery, AppState};
use crate::wire::ErrorBody;
use axum::Json;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use forkvm_core::files::{CopyInStart, CopyOutItem, PathInfo as CorePathInfo};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

/// `GET /instances/{id}/stat` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatQuery {
    /// Path in the guest (in the image's root for an OCI instance).
    pub path: String,
    /// Follow a symbolic link at the end (stat rather than lstat).
    #[serde(default)]
    pub follow_links: bool,
}

/// hypeman's PathInfo.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PathInfo {
    pub exists: bool,
    pub is_dir: bool,
    pub is_file: bool,
    pub is_symlink: bool,
    pub link_target: Option<String>,
    pub mode: u32,
    pub size: u64,
    pub error: Option<String>,
}

impl From<CorePathInfo> for PathInfo {
    fn from(p: CorePathInfo) -> Self {
        Self {
            exists: p.exists,
            is_dir: p.is_dir,
            is_file: p.is_file,
            is_symlink: p.is_symlink,
            link_target: p.link_target,
            mode: p.mode,
            size: p.size,
            error: p.error,
        }
    }
}

/// What is at a path in the guest's filesystem.
#[utoipa::path(get, path = "/instances/{id}/stat", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name"), StatQuery),
    responses((status = 200, body = PathInfo), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn stat(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<StatQuery>,
) -> Result<Json<PathInfo>, ApiError> {
    Ok(Json(m.stat(&id, &q.path, q.follow_links).await?.into()))
}

/// The first message of a cp connection (hypeman's CpRequest).
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct CpRequest {
    /// `to` (client → guest) or `from` (guest → client).
    pub direction: String,
    pub guest_path: String,
    /// `to`: make a directory rather than write a file.
    #[serde(default)]
    pub is_dir: bool,
    /// `to`: permission bits (default 0644, directories 0755).
    #[serde(default)]
    pub mode: u32,
    /// `from`: follow a symbolic link at `guest_path`.
    #[serde(default)]
    pub follow_links: bool,
    /// hypeman's; the client resolves the target itself.
    #[serde(default)]
    pub src_basename: Option<String>,
    /// `to`: owner (set when either is not 0).
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

/// Copy files into or out of the guest (WebSocket, hypeman's protocol).
///
/// See docs/exec.md ("cp and stat") for the framing.
#[utoipa::path(get, path = "/instances/{id}/cp", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
              (status = 400, body = ErrorBody, description = "Not a WebSocket upgrade"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn cp(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (id, ws) = crate::exec_ws::upgrade_running(&m, &id, ws, "cp").await?;
    Ok(ws.on_upgrade(move |socket| serve(m, id, socket)))
}

fn text(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}

fn error(message: &str, path: &str) -> Message {
    text(json!({"type": "error", "message": message, "path": path}))
}

async fn serve(m: AppState, id: String, mut ws: WebSocket) {
    let req = match ws.recv().await {
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<CpRequest>(t.as_str()) {
            Ok(r) => r,
            Err(e) => {
                let _ = ws.send(error(&format!("invalid JSON: {e}"), "")).await;
                return;
            }
        },
        _ => {
            let _ = ws.send(error("first message must be JSON text", "")).await;
            return;
        }
    };
    match req.direction.as_str() {
        "to" => copy_to(&m, &id, req, &mut ws).await,
        "from" => copy_from(&m, &id, req, &mut ws).await,
        d => {
            let msg = format!("invalid direction {d:?} (must be \"to\" or \"from\")");
            let _ = ws.send(error(&msg, "")).await;
        }
    }
    let _ = ws.send(Message::Close(None)).await;
}

async fn copy_to(m: &AppState, id: &str, req: CpRequest, ws: &mut WebSocket) {
    let start = CopyInStart {
        path: req.guest_path,
        mode: req.mode,
        is_dir: req.is_dir,
        owner: (req.uid != 0 || req.gid != 0).then_some((req.uid, req.gid)),
        mtime: None,
    };
    let result = async {
        let mut copy = m.copy_in(id, start).await?;
        loop {
            match ws.recv().await {
                Some(Ok(Message::Binary(b))) => {
                    if !copy.data(b.to_vec()).await {
                        // The agent refused; finish() says why.
                        return copy.finish().await;
                    }
                }
                Some(Ok(Message::Text(t))) if is_end(t.as_str()) => return copy.finish().await,
                Some(Ok(_)) => {}
                // Gone before `end`: the file is incomplete; dropping the
                // copy ends the agent's stream without its `end`.
                _ => {
                    return Err(forkvm_core::CoreError::Invalid(
                        "the client left before completing the transfer".into(),
                    ));
                }
            }
        }
    }
    .await;
    let msg = match result {
        Ok(n) => json!({"type": "result", "success": true, "bytes_written": n}),
        Err(e) => json!({"type": "result", "success": false, "error": e.to_string()}),
    };
    let _ = ws.send(text(msg)).await;
}

fn is_end(t: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| v["type"] == "end")
}

async fn copy_from(m: &AppState, id: &str, req: CpRequest, ws: &mut WebSocket) {
    let mut copy = match m.copy_out(id, &req.guest_path, req.follow_links).await {
        Ok(c) => c,
        Err(e) => {
            let _ = ws.send(error(&e.to_string(), &req.guest_path)).await;
            return;
        }
    };
    while let Some(item) = copy.next().await {
        let msg = match item {
            Ok(CopyOutItem::Header(h)) => text(json!({
                "type": "header", "path": h.path, "mode": h.mode, "is_dir": h.is_dir,
                "is_symlink": h.is_symlink, "link_target": h.link_target, "size": h.size,
                "mtime": h.mtime, "uid": h.uid, "gid": h.gid,
            })),
            Ok(CopyOutItem::Data(d)) => Message::Binary(d.into()),
            Ok(CopyOutItem::End { last }) => text(json!({"type": "end", "final": last})),
            Ok(CopyOutItem::Error { message, path }) => error(&message, &path),
            Err(e) => error(&e.to_string(), &req.guest_path),
        };
        if ws.send(msg).await.is_err() {
            return;
        }
    }
}
