//! HTTP handlers, the router and the OpenAPI document generated from them.

use crate::error::ApiError;
use crate::wire::*;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::StatusCode;

use axum::routing::{get, post};
use axum::{Json, Router};
use forkvm_core::Manager;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use tower_http::trace::{DefaultMakeSpan, DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// Shared handler state.
pub type AppState = Arc<Manager>;

/// JSON body extractor whose rejections are `{code, message}` (400/415/413).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Path extractor with JSON rejections.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Query extractor with JSON rejections (400).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// A JSON body that may be absent: hypeman's client POSTs `stop`/`restore`
/// with no body (and no content type) but `start`/`standby` with one (at
/// least `{}`).
pub struct OptionalJson<T>(pub Option<T>);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| ApiError::new(r.status(), "invalid_request", r.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        serde_json::from_slice(&bytes)
            .map(|v| Self(Some(v)))
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "forkvm",
        description = "forkvm microVM manager. Compatible with the hypeman API where concepts overlap; forkvm additions are extra fields and endpoints."
    ),
    paths(
        health,
        openapi_json,
        list_instances,
        create_instance,
        get_instance,
        delete_instance,
        start_instance,
        stop_instance,
        standby_instance,
        restore_instance,
        fork_instance,
        crate::logs::instance_logs,
        wait_instance,
        instance_agent,
        exec_instance,
        crate::exec_ws::exec_ws,
        crate::files::stat,
        crate::stats::stats,
        crate::files::cp,
        create_snapshot,
        restore_snapshot,
        list_snapshots,
        get_snapshot,
        delete_snapshot,
        fork_snapshot,
        crate::images::create_image,
        crate::images::import_image,
        crate::images::list_images,
        crate::images::get_image,
        crate::images::delete_image,
        crate::observe::metrics,
        crate::observe::events,
    ),
    components(schemas(ErrorBody, AgentHealth, ExecEncoding, Instance, InstanceNetwork, PublishedPort, PortProtocol, EgressParam, InstanceState, Handoff, HandoffPath,
        ForkOutcome, ForkFailure, Snapshot, SnapshotNetwork, WaitForStateResponse, Image, ImageStatus, PullCredentials, PullProgress)),
    modifiers(&BearerAuth, &CommonErrors),
    security(("bearerAuth" = [])),
    tags(
        (name = "instances", description = "VM instances"),
        (name = "snapshots", description = "Snapshots and forks from them"),
        (name = "images", description = "OCI images: pulled or imported, converted to read-only root disks"),
        (name = "health", description = "Liveness, metrics and events"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The daemon's API token (FORKVM_API_TOKEN, at least 32 characters), \
                         required on the TCP listener (TLS, or plain HTTP on loopback only) on \
                         every route but /health; the unix socket needs none.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Documents the error answers any operation can give, so the document
/// lists every status a client can see: 400 (malformed path, query or body,
/// or an unsupported option), 401 (TCP listener without the bearer token;
/// not on the public `/health` and `/openapi.json`), 415 (a body that is not
/// JSON) and 500. Each operation lists its own 404/409/504 itself.
struct CommonErrors;

impl utoipa::Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let public = path == "/health" || path == "/openapi.json";
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                let mut add = |code: &str, what: &str| {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| error(what).into());
                };
                add("500", "Internal error");
                if public {
                    continue;
                }
                add("400", "Malformed request or unsupported option");
                add("401", "Missing or wrong bearer token (TCP listener)");
                if op.request_body.is_some() {
                    add("415", "Body is not JSON");
                }
            }
        }
    }
}

/// The generated OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The API router (no authentication; see [`crate::server::tcp_router`]).
pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(crate::observe::metrics))
        .route("/events", get(crate::observe::events))
        .route("/instances", get(list_instances).post(create_instance))
        .route("/instances/{id}", get(get_instance).delete(delete_instance))
        .route("/instances/{id}/start", post(start_instance))
        .route("/instances/{id}/stop", post(stop_instance))
        .route("/instances/{id}/standby", post(standby_instance))
        .route("/instances/{id}/restore", post(restore_instance))
        .route("/instances/{id}/fork", post(fork_instance))
        .route("/instances/{id}/logs", get(crate::logs::instance_logs))
        .route("/instances/{id}/wait", get(wait_instance))
        .route("/instances/{id}/agent", get(instance_agent))
        .route("/instances/{id}/stat", get(crate::files::stat))
        .route("/instances/{id}/stats", get(crate::stats::stats))
        .route("/instances/{id}/cp", get(crate::files::cp))
        .route(
            "/instances/{id}/exec",
            post(exec_instance).get(crate::exec_ws::exec_ws),
        )
        .route("/instances/{id}/snapshots", post(create_snapshot))
        .route(
            "/instances/{id}/snapshots/{snapshot_id}/restore",
            post(restore_snapshot),
        )
        .route("/snapshots", get(list_snapshots))
        .route(
            "/snapshots/{snapshot_id}",
            get(get_snapshot).delete(delete_snapshot),
        )
        .route("/snapshots/{snapshot_id}/fork", post(fork_snapshot))
        .route(
            "/images",
            get(crate::images::list_images).post(crate::images::create_image),
        )
        .route("/images/import", post(crate::images::import_image))
        .route(
            "/images/{*name}",
            get(crate::images::get_image).delete(crate::images::delete_image),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            manager.clone(),
            crate::observe::time_requests,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO))
                // ApiError already logs 5xx with its code and message.
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        .with_state(manager)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// Liveness and version.
#[utoipa::path(get, path = "/health", tag = "health", security(()),
    responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "OpenAPI document", content_type = "application/json")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// List instances.
#[utoipa::path(get, path = "/instances", tag = "instances", params(ListQuery),
    responses((status = 200, body = Vec<Instance>), (status = 400, body = ErrorBody)))]
async fn list_instances(
    State(m): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<Instance>>, ApiError> {
    let tags = crate::wire::tag_filter(&q.tags)?;
    let list = m.list().await?;
    Ok(Json(
        list.iter()
            .map(Instance::from)
            .filter(|i| q.state.is_none_or(|s| s == i.state))
            .filter(|i| crate::wire::has_tags(&i.tags, &tags))
            .collect(),
    ))
}

/// Create and start an instance.
#[utoipa::path(post, path = "/instances", tag = "instances", request_body = InstanceCreateParams,
    responses((status = 201, body = Instance), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 415, body = ErrorBody)))]
async fn create_instance(
    State(m): State<AppState>,
    ApiJson(p): ApiJson<InstanceCreateParams>,
) -> Result<(StatusCode, Json<Instance>), ApiError> {
    let req = p.into_core()?;
    tracing::info!(name = %req.name, vcpus = ?req.vcpus, memory_mb = ?req.memory_mb, "creating instance");
    let inst = m.create(req).await?;
    Ok((StatusCode::CREATED, Json(inst.into())))
}

/// Get an instance by id or name.
#[utoipa::path(get, path = "/instances/{id}", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody)))]
async fn get_instance(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Instance>, ApiError> {
    Ok(Json(m.get(&id).await?.into()))
}

/// Stop (if needed) and delete an instance.
#[utoipa::path(delete, path = "/instances/{id}", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name"), DeleteQuery),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)))]
async fn delete_instance(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(_q): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    m.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start a stopped instance.
#[utoipa::path(post, path = "/instances/{id}/start", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")),
    request_body(content = Option<InstanceStartParams>),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn start_instance(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    OptionalJson(p): OptionalJson<InstanceStartParams>,
) -> Result<Json<Instance>, ApiError> {
    if let Some(p) = &p {
        p.unsupported.refuse("start")?;
    }
    if let Some(p) = p
        && (p.cmd.is_some() || p.entrypoint.is_some())
    {
        return Err(ApiError::unsupported(
            "overriding cmd/entrypoint on start is not supported",
        ));
    }
    Ok(Json(m.start(&id).await?.into()))
}

/// Stop an instance.
#[utoipa::path(post, path = "/instances/{id}/stop", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn stop_instance(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Instance>, ApiError> {
    Ok(Json(m.stop(&id).await?.into()))
}

/// Wait until the instance reaches `state`, fails, or `timeout` passes
/// (hypeman's `instances.wait`).
#[utoipa::path(get, path = "/instances/{id}/wait", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name"), WaitQuery),
    responses((status = 200, body = WaitForStateResponse), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn wait_instance(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<WaitForStateResponse>, ApiError> {
    let timeout = q.timeout()?;
    let outcome = m.wait(&id, q.state.into(), timeout).await?;
    Ok(Json(outcome.into()))
}

/// Put a Running instance into standby: snapshot its memory and device
/// state, then stop its VMM. The snapshot is kept until the instance is
/// restored.
#[utoipa::path(post, path = "/instances/{id}/standby", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")),
    request_body(content = Option<InstanceStandbyParams>),
    responses((status = 200, body = Instance), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn standby_instance(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    OptionalJson(p): OptionalJson<InstanceStandbyParams>,
) -> Result<Json<Instance>, ApiError> {
    if let Some(p) = &p {
        p.unsupported.refuse("standby")?;
        reject_compression(p.compression.as_ref())?;
    }
    tracing::info!(instance = %id, "standby");
    Ok(Json(m.standby(&id).await?.into()))
}

/// Restore a Standby instance to Running on its own address.
#[utoipa::path(post, path = "/instances/{id}/restore", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn restore_instance(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    // hypeman's client sends no body; tolerate one (e.g. `{}`) all the same.
    OptionalJson(_p): OptionalJson<serde_json::Value>,
) -> Result<Json<Instance>, ApiError> {
    tracing::info!(instance = %id, "restore");
    Ok(Json(m.restore(&id).await?.into()))
}

/// Fork an instance.
///
/// Without `count`: 201 with the new instance (or the fork's error, as any
/// other error). With `count` (1–64): 201 with an array, one entry per fork
/// named `name-1` … `name-N`, each either the instance or
/// `{name, error: {code, message}}`; check every entry.
#[utoipa::path(post, path = "/instances/{id}/fork", tag = "instances",
    params(("id" = String, Path, description = "Source instance id or name")),
    request_body = InstanceForkParams,
    responses((status = 201, body = ForkResponse,
               description = "The fork (without `count`) or one entry per fork (with `count`)"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn fork_instance(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(p): ApiJson<InstanceForkParams>,
) -> Result<(StatusCode, Json<ForkResponse>), ApiError> {
    let req = p.into_core()?;
    tracing::info!(source = %id, name = %req.name, count = ?req.count, from_running = req.from_running,
        target_state = ?req.target_state, wait_for_network = ?req.wait_for_network, "forking instance");
    let batch = req.count.is_some();
    let name = req.name.clone();
    let results = m.fork(&id, req).await?;
    fork_response(&name, batch, results)
}

/// Shape the core's per-fork results into the response body.
///
/// The core returns batch results in order, for the names `name-1..N`; that
/// order is how a failed entry gets its name back.
fn fork_response(
    name: &str,
    batch: bool,
    results: Vec<forkvm_core::Result<forkvm_core::Instance>>,
) -> Result<(StatusCode, Json<ForkResponse>), ApiError> {
    if !batch {
        let one = results.into_iter().next().ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the fork produced no result",
            )
        })??;
        return Ok((
            StatusCode::CREATED,
            Json(ForkResponse::One(Box::new(one.into()))),
        ));
    }
    let outcomes = results
        .into_iter()
        .enumerate()
        .map(|(k, r)| match r {
            Ok(i) => ForkOutcome::Created(Box::new(i.into())),
            Err(e) => {
                let fork_name = format!("{name}-{}", k + 1);
                let e = ApiError::from(e);
                tracing::warn!(fork = %fork_name, code = e.code, message = %e.message, "fork failed");
                ForkOutcome::Failed(ForkFailure {
                    name: fork_name,
                    error: ErrorBody {
                        code: e.code.to_string(),
                        message: e.message,
                    },
                })
            }
        })
        .collect();
    Ok((StatusCode::CREATED, Json(ForkResponse::Many(outcomes))))
}

/// The guest agent's own report (forkvm extra): version, uptime, RPC
/// counters and its armed mailbox.
#[utoipa::path(get, path = "/instances/{id}/agent", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")),
    responses((status = 200, body = AgentHealth),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn instance_agent(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AgentHealth>, ApiError> {
    Ok(Json(m.agent_health(&id).await?.into()))
}

/// forkvm: run a command in the guest through its agent.
#[utoipa::path(post, path = "/instances/{id}/exec", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")),
    request_body = ExecParams,
    responses((status = 200, body = ExecResponse), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 504, body = ErrorBody)))]
async fn exec_instance(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(p): ApiJson<ExecParams>,
) -> Result<Json<ExecResponse>, ApiError> {
    p.unsupported.refuse("exec")?;
    let encoding = p.encoding;
    let req = p.into_core()?;
    Ok(Json(ExecResponse::new(m.exec(&id, req).await?, encoding)))
}

/// Snapshot an instance (kind `Standby`: memory and device state; a Running
/// source is paused briefly).
#[utoipa::path(post, path = "/instances/{id}/snapshots", tag = "snapshots",
    params(("id" = String, Path, description = "Instance id or name")),
    request_body = SnapshotCreateParams,
    responses((status = 201, body = Snapshot), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_snapshot(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(p): ApiJson<SnapshotCreateParams>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let (name, tags) = p.validate()?;
    tracing::info!(instance = %id, name = ?name, "creating snapshot");
    let snap = m.create_snapshot_tagged(&id, name, tags).await?;
    Ok((StatusCode::CREATED, Json(Snapshot::from(&snap))))
}

/// Restore an instance in place to one of its own snapshots.
///
/// The instance's current VM goes; it runs on from the snapshot's memory,
/// device state and disks with its own id, name and address. The snapshot
/// stays (restore to it again, or fork from it). `target_state` may only be
/// `Running` (the default); `target_hypervisor` only `qemu`.
#[utoipa::path(post, path = "/instances/{id}/snapshots/{snapshot_id}/restore", tag = "snapshots",
    params(("id" = String, Path, description = "Instance id or name"),
           ("snapshot_id" = String, Path, description = "Snapshot id or name")),
    request_body(content = Option<SnapshotRestoreParams>, description = "Optional"),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 504, body = ErrorBody)))]
async fn restore_snapshot(
    State(m): State<AppState>,
    ApiPath((id, snapshot_id)): ApiPath<(String, String)>,
    OptionalJson(p): OptionalJson<SnapshotRestoreParams>,
) -> Result<Json<Instance>, ApiError> {
    let target = p.unwrap_or_default().validate()?;
    let inst = m.restore_snapshot(&id, &snapshot_id, target).await?;
    Ok(Json(Instance::from(&inst)))
}

/// List snapshots.
#[utoipa::path(get, path = "/snapshots", tag = "snapshots", params(SnapshotListQuery),
    responses((status = 200, body = Vec<Snapshot>), (status = 400, body = ErrorBody)))]
async fn list_snapshots(
    State(m): State<AppState>,
    ApiQuery(q): ApiQuery<SnapshotListQuery>,
) -> Result<Json<Vec<Snapshot>>, ApiError> {
    let keep = q.filter()?;
    let list = m.list_snapshots().await?;
    Ok(Json(list.iter().map(Snapshot::from).filter(keep).collect()))
}

/// Get a snapshot by id or name.
#[utoipa::path(get, path = "/snapshots/{snapshot_id}", tag = "snapshots",
    params(("snapshot_id" = String, Path, description = "Snapshot id or name")),
    responses((status = 200, body = Snapshot), (status = 404, body = ErrorBody)))]
async fn get_snapshot(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(Snapshot::from(&m.get_snapshot(&id).await?)))
}

/// Delete a snapshot. A Standby instance's own snapshot can't be deleted
/// (409): restore or delete the instance instead.
#[utoipa::path(delete, path = "/snapshots/{snapshot_id}", tag = "snapshots",
    params(("snapshot_id" = String, Path, description = "Snapshot id or name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn delete_snapshot(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    tracing::info!(snapshot = %id, "deleting snapshot");
    m.delete_snapshot(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Fork new instances from a snapshot. Response as for instance forks:
/// one instance without `count`, an array of outcomes with it.
#[utoipa::path(post, path = "/snapshots/{snapshot_id}/fork", tag = "snapshots",
    params(("snapshot_id" = String, Path, description = "Snapshot id or name")),
    request_body = SnapshotForkParams,
    responses((status = 201, body = ForkResponse,
               description = "The fork (without `count`) or one entry per fork (with `count`)"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn fork_snapshot(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(p): ApiJson<SnapshotForkParams>,
) -> Result<(StatusCode, Json<ForkResponse>), ApiError> {
    let req = p.into_core()?;
    tracing::info!(snapshot = %id, name = %req.name, count = ?req.count,
        target_state = ?req.target_state, wait_for_network = ?req.wait_for_network, "forking snapshot");
    let batch = req.count.is_some();
    let name = req.name.clone();
    let results = m.fork_snapshot(&id, req).await?;
    fork_response(&name, batch, results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core_instance(name: &str) -> forkvm_core::Instance {
        serde_json::from_value(serde_json::json!({
            "id": format!("id-{name}"), "name": name, "image": "default", "state": "Running",
            "state_error": null, "vcpus": 1, "memory_mb": 256, "env": {}, "entrypoint": [],
            "network": {"enabled": false, "ip": null, "mac": null, "tap": null,
                        "gateway": null, "prefix_len": null, "bridge": null},
            "created_at": "2026-01-01T00:00:00Z", "started_at": null, "stopped_at": null,
            "pid": null, "accel": null
        }))
        .expect("core::Instance JSON")
    }

    #[test]
    fn batch_fork_results_keep_order_and_names() {
        use forkvm_core::CoreError;
        let (status, Json(body)) = fork_response(
            "w",
            true,
            vec![
                Ok(core_instance("w-1")),
                Err(CoreError::Exhausted("no free address".into())),
                Ok(core_instance("w-3")),
            ],
        )
        .unwrap();
        assert_eq!(status, StatusCode::CREATED);
        let v = serde_json::to_value(body).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 3);
        assert_eq!(v[0]["name"], "w-1");
        assert_eq!(v[1]["name"], "w-2");
        assert_eq!(v[1]["error"]["code"], "exhausted");
        assert_eq!(v[1]["error"]["message"], "no free address");
        assert_eq!(v[2]["id"], "id-w-3");
    }

    #[test]
    fn single_fork_error_keeps_its_status() {
        use forkvm_core::CoreError;
        let e = fork_response(
            "w",
            false,
            vec![Err(CoreError::Conflict("name taken".into()))],
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert_eq!(e.code, "conflict");
        let e = fork_response("w", false, vec![]).unwrap_err();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        let (s, Json(body)) = fork_response("w", false, vec![Ok(core_instance("w"))]).unwrap();
        assert_eq!(s, StatusCode::CREATED);
        assert_eq!(serde_json::to_value(body).unwrap()["name"], "w");
    }
}
