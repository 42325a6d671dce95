//! HTTP-layer tests against the router with a Manager over temporary
//! directories. No VM is started: the assertions are about validation,
//! status codes, error bodies, authentication and the OpenAPI document.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use forkvm_api::{router, tcp_router};
use forkvm_core::{Config, Manager};
use http_body_util::BodyExt;
use serde_json::Value;
use std::sync::Arc;
use tower::ServiceExt;

async fn manager(dir: &tempfile::TempDir) -> Arc<Manager> {
    Manager::open(Config::new(
        dir.path().join("data"),
        dir.path().join("mem"),
        "fvt-none",
        "10.250.0.0/24",
        "qemu-system-x86_64",
    ))
    .await
    .expect("open manager")
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {:?} (status {})",
                String::from_utf8_lossy(&self.body),
                self.status
            )
        })
    }
    /// Assert an error response: status, JSON `{code, message}`, code.
    fn assert_error(&self, status: StatusCode, code: &str) -> String {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        let ct = self
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap());
        assert_eq!(ct, Some("application/json"));
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        let msg = v["message"].as_str().expect("message is a string");
        assert!(!msg.is_empty());
        msg.to_string()
    }
}

async fn call(app: &Router, req: Request<Body>) -> Resp {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

fn req(method: Method, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap()
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn app() -> (tempfile::TempDir, Router) {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(&dir).await;
    (dir, router(m))
}

#[tokio::test]
async fn health_and_list() {
    let (_d, app) = app().await;
    let r = call(&app, req(Method::GET, "/health")).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));

    let r = call(&app, req(Method::GET, "/instances")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().is_array());

    let r = call(&app, req(Method::GET, "/instances?state=Running&tags[a]=b")).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(&app, req(Method::GET, "/instances?state=Bogus")).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn create_validation() {
    let (_d, app) = app().await;

    // malformed JSON
    let r = call(&app, post_json("/instances", "{\"name\": ")).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    // wrong type (axum would say 422)
    let r = call(
        &app,
        post_json("/instances", r#"{"name":"a","vcpus":"two"}"#),
    )
    .await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    // missing name
    let r = call(&app, post_json("/instances", r#"{"image":"x"}"#)).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    // no JSON content type
    let r = call(
        &app,
        Request::builder()
            .method(Method::POST)
            .uri("/instances")
            .body(Body::from(r#"{"name":"a"}"#))
            .unwrap(),
    )
    .await;
    r.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    // invalid name
    let r = call(&app, post_json("/instances", r#"{"name":"Bad_Name"}"#)).await;
    let msg = r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert!(msg.contains("Bad_Name"), "{msg}");
    // nonsense size, and size/memory_mb disagreeing
    for body in [
        r#"{"name":"a","size":"lots"}"#,
        r#"{"name":"a","size":"1.5GB"}"#,
        r#"{"name":"a","size":"256MB","memory_mb":512}"#,
        r#"{"name":"a","vcpus":0}"#,
        r#"{"name":"a","hypervisor":"firecracker"}"#,
    ] {
        let r = call(&app, post_json("/instances", body)).await;
        r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    // hypeman fields forkvm does not implement are refused by name, not
    // dropped (and nothing is created: the 404 below shows no image lookup
    // happened for this body).
    let r = call(
        &app,
        post_json(
            "/instances",
            r#"{"name":"web-1","image":"alpine","size":"512MB","vcpus":1,
                "ttl":"1h","volumes":[],"cmd":["sleep","1"],"skip_guest_agent":false}"#,
        ),
    )
    .await;
    let msg = r.assert_error(StatusCode::BAD_REQUEST, "unsupported");
    assert!(
        msg.contains(r#""skip_guest_agent", "ttl", "volumes""#),
        "{msg}"
    );
    for (uri, body, field) in [
        (
            "/instances",
            r#"{"name":"a","network":{"bandwidth_upload":"1Gbps"}}"#,
            "bandwidth_upload",
        ),
        (
            "/instances/x/exec",
            r#"{"command":["true"],"tty":true}"#,
            "tty",
        ),
        (
            "/snapshots/s/fork",
            r#"{"name":"f","restore_policy":1}"#,
            "restore_policy",
        ),
        ("/images", r#"{"name":"alpine","mirror":"x"}"#, "mirror"),
    ] {
        let r = call(&app, post_json(uri, body)).await;
        let msg = r.assert_error(StatusCode::BAD_REQUEST, "unsupported");
        assert!(msg.contains(field), "{uri}: {msg}");
    }
    let r = call(
        &app,
        post_json("/instances/x/fork", r#"{"name":"f","gpu":{}}"#),
    )
    .await;
    let msg = r.assert_error(StatusCode::BAD_REQUEST, "unsupported");
    assert!(msg.contains("\"gpu\""), "{msg}");
    // A valid hypeman-style body passes validation and reaches the manager,
    // which has no images in this temporary data dir: the answer is the
    // manager's 404 for the image, not a 400 from parsing.
    let r = call(
        &app,
        post_json(
            "/instances",
            r#"{"name":"web-1","image":"alpine","size":"512MB","vcpus":1,
                "network":{"enabled":true},"cmd":["sleep","1"]}"#,
        ),
    )
    .await;
    let msg = r.assert_error(StatusCode::NOT_FOUND, "not_found");
    assert!(msg.contains("alpine"), "{msg}");
    assert_eq!(r.headers.get("x-should-retry").unwrap(), "false");
}

#[tokio::test]
async fn unknown_instance_is_json_404() {
    let (_d, app) = app().await;
    for (m, uri) in [
        (Method::GET, "/instances/nope"),
        (Method::DELETE, "/instances/nope"),
        (Method::POST, "/instances/nope/stop"),
        (Method::POST, "/instances/nope/start"),
        (Method::POST, "/instances/nope/standby"),
        (Method::POST, "/instances/nope/restore"),
        (Method::GET, "/instances/nope/logs"),
        (Method::GET, "/instances/nope/logs?tail=5"),
    ] {
        let r = call(&app, req(m.clone(), uri)).await;
        let msg = r.assert_error(StatusCode::NOT_FOUND, "not_found");
        assert!(msg.contains("nope"), "{m} {uri}: {msg}");
        assert_eq!(r.headers.get("x-should-retry").unwrap(), "false");
    }
    // start with the body the hypeman client sends
    let r = call(&app, post_json("/instances/nope/start", "{}")).await;
    r.assert_error(StatusCode::NOT_FOUND, "not_found");
    let r = call(&app, post_json("/instances/nope/start", "{")).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let r = call(
        &app,
        post_json("/instances/nope/exec", r#"{"command":["true"]}"#),
    )
    .await;
    r.assert_error(StatusCode::NOT_FOUND, "not_found");
    let r = call(&app, post_json("/instances/nope/fork", r#"{"name":"f-1"}"#)).await;
    r.assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn request_validation_before_lookup() {
    let (_d, app) = app().await;
    let r = call(&app, post_json("/instances/x/exec", r#"{"command":[]}"#)).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let r = call(&app, post_json("/instances/x/exec", r#"{"command":"ls"}"#)).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let r = call(&app, post_json("/instances/x/fork", r#"{"name":"NO"}"#)).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let r = call(
        &app,
        post_json(
            "/instances/x/fork",
            r#"{"name":"ok","target_state":"Flying"}"#,
        ),
    )
    .await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let r = call(&app, req(Method::GET, "/instances/x/logs?tail=-1")).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let r = call(&app, req(Method::GET, "/instances/x/logs?source=hypeman")).await;
    r.assert_error(StatusCode::BAD_REQUEST, "unsupported");
    let r = call(&app, req(Method::GET, "/instances/x/logs?source=nonsense")).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
}

/// Fork bodies are validated (400) before the source is looked up (404).
#[tokio::test]
async fn fork_validation() {
    let (_d, app) = app().await;
    let long = format!(r#"{{"name":"{}","count":10}}"#, "a".repeat(61));
    for body in [
        r#"{"name":"ok","count":0}"#,
        r#"{"name":"ok","count":65}"#,
        r#"{"name":"ok","count":-1}"#,
        r#"{"name":"ok","count":"many"}"#,
        r#"{"name":"ok","target_state":"Flying"}"#,
        r#"{"name":"ok","target_state":"running"}"#,
        r#"{"name":"ok","from_running":"yes"}"#,
        r#"{"name":"ok","wait_for_network":1}"#,
        r#"{"from_running":true}"#,
        r#"{"name":""}"#,
        long.as_str(),
    ] {
        let r = call(&app, post_json("/instances/x/fork", body)).await;
        let msg = r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
        if body.contains("count\":6") || body.contains("count\":0") {
            assert!(msg.contains("count"), "{body}: {msg}");
        }
    }
    // Valid bodies, hypeman's and forkvm's, reach the lookup.
    for body in [
        r#"{"name":"f-1"}"#,
        r#"{"name":"f-1","from_running":true,"target_state":"Running"}"#,
        r#"{"name":"f","count":64,"wait_for_network":false,"target_state":"Standby"}"#,
        r#"{"name":"f","count":1}"#,
    ] {
        let r = call(&app, post_json("/instances/ghost/fork", body)).await;
        let msg = r.assert_error(StatusCode::NOT_FOUND, "not_found");
        assert!(msg.contains("ghost"), "{body}: {msg}");
    }
    // no body at all is a 415 (JSON required), not a crash
    let r = call(&app, req(Method::POST, "/instances/x/fork")).await;
    r.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
}

#[tokio::test]
async fn standby_and_restore_bodies() {
    let (_d, app) = app().await;
    // hypeman's client sends `{}` (or compression settings) to standby and
    // nothing to restore; all are accepted up to the lookup.
    for (uri, body) in [
        ("/instances/ghost/standby", "{}"),
        (
            "/instances/ghost/standby",
            r#"{"compression":{"enabled":false}}"#,
        ),
        ("/instances/ghost/standby", r#"{"compression_delay":"30s"}"#),
        ("/instances/ghost/restore", "{}"),
    ] {
        let r = call(&app, post_json(uri, body)).await;
        r.assert_error(StatusCode::NOT_FOUND, "not_found");
    }
    let r = call(
        &app,
        post_json(
            "/instances/ghost/standby",
            r#"{"compression":{"enabled":true,"algorithm":"zstd"}}"#,
        ),
    )
    .await;
    let msg = r.assert_error(StatusCode::BAD_REQUEST, "unsupported");
    assert!(msg.contains("compression"), "{msg}");
    let r = call(&app, post_json("/instances/ghost/standby", "[")).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let r = call(
        &app,
        post_json(
            "/instances/ghost/standby",
            r#"{"compression":"x","compression_delay":5}"#,
        ),
    )
    .await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn snapshot_routes() {
    let (_d, app) = app().await;
    // create: body checks first
    for body in [
        r#"{}"#,
        r#"{"kind":"Bogus"}"#,
        r#"{"kind":"Standby","name":"Bad_Name"}"#,
    ] {
        let r = call(&app, post_json("/instances/ghost/snapshots", body)).await;
        r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    for body in [
        r#"{"kind":"Stopped"}"#,
        r#"{"kind":"Standby","compression":{"enabled":true}}"#,
    ] {
        let r = call(&app, post_json("/instances/ghost/snapshots", body)).await;
        r.assert_error(StatusCode::BAD_REQUEST, "unsupported");
    }
    for body in [
        r#"{"kind":"Standby"}"#,
        r#"{"kind":"Standby","name":"warm","tags":{}}"#,
        r#"{"kind":"Standby","tags":{"team":"a"}}"#,
    ] {
        let r = call(&app, post_json("/instances/ghost/snapshots", body)).await;
        r.assert_error(StatusCode::NOT_FOUND, "not_found");
    }

    // list: empty array, filters parse, bad filter is 400
    for uri in [
        "/snapshots",
        "/snapshots?kind=Standby",
        "/snapshots?source_instance_id=i-1&name=warm",
        "/snapshots?tags[a]=b",
    ] {
        let r = call(&app, req(Method::GET, uri)).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert_eq!(r.json(), serde_json::json!([]), "{uri}");
    }
    let r = call(&app, req(Method::GET, "/snapshots?kind=Nope")).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");

    // unknown snapshot
    for m in [Method::GET, Method::DELETE] {
        let r = call(&app, req(m.clone(), "/snapshots/nope")).await;
        let msg = r.assert_error(StatusCode::NOT_FOUND, "not_found");
        assert!(msg.contains("nope"), "{m}: {msg}");
    }

    // fork from a snapshot
    for body in [
        r#"{"name":"ok","target_hypervisor":"firecracker"}"#,
        r#"{"name":"ok","count":0}"#,
        r#"{"name":"NO"}"#,
        r#"{"target_state":"Running"}"#,
        r#"{"name":"ok","target_state":"Paused"}"#,
    ] {
        let r = call(&app, post_json("/snapshots/nope/fork", body)).await;
        r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    for body in [
        r#"{"name":"ok"}"#,
        r#"{"name":"ok","target_hypervisor":"qemu","target_state":"Running","count":3,"wait_for_network":true}"#,
    ] {
        let r = call(&app, post_json("/snapshots/nope/fork", body)).await;
        r.assert_error(StatusCode::NOT_FOUND, "not_found");
    }
    // restore-from-snapshot stays unimplemented, but unknown instances are 404
    let r = call(
        &app,
        req(Method::POST, "/instances/ghost/snapshots/s1/restore"),
    )
    .await;
    r.assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn routing_errors_are_json() {
    let (_d, app) = app().await;
    let r = call(&app, req(Method::GET, "/no/such/route")).await;
    r.assert_error(StatusCode::NOT_FOUND, "not_found");
    let r = call(&app, req(Method::PUT, "/instances")).await;
    r.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let r = call(&app, req(Method::GET, "/instances/x/stop")).await;
    r.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn tcp_router_requires_token() {
    let dir = tempfile::tempdir().unwrap();
    let app = tcp_router(manager(&dir).await, "s3cret-token-0123456789abcdef-xyz").unwrap();

    let r = call(&app, req(Method::GET, "/instances")).await;
    r.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(r.headers.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");

    for auth in [
        "Bearer wrong",
        "Bearer s3cret-token-0123456789abcdef-xy",
        "Bearer s3cret-token-0123456789abcdef-xyz-",
        "Bearer S3cret-token-0123456789abcdef-xyz",
        "s3cret-token-0123456789abcdef-xyz",
        "Basic s3cret-token-0123456789abcdef-xyz",
    ] {
        let mut rq = req(Method::GET, "/instances");
        rq.headers_mut()
            .insert(header::AUTHORIZATION, auth.parse().unwrap());
        call(&app, rq)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // unknown routes are not revealed without a token either
    call(&app, req(Method::GET, "/nope"))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");

    let mut rq = req(Method::GET, "/instances");
    rq.headers_mut().insert(
        header::AUTHORIZATION,
        "Bearer s3cret-token-0123456789abcdef-xyz".parse().unwrap(),
    );
    let r = call(&app, rq).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().is_array());

    let r = call(&app, req(Method::GET, "/health")).await;
    assert_eq!(r.status, StatusCode::OK);

    assert!(tcp_router(manager(&dir).await, "").is_err());
    // Short tokens are refused when the router is built.
    let e = tcp_router(manager(&dir).await, "s3cret-token").unwrap_err();
    assert!(e.to_string().contains("at least 32"), "{e}");
}

#[tokio::test]
async fn openapi_document() {
    let (_d, app) = app().await;
    let r = call(&app, req(Method::GET, "/openapi.json")).await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (p, m) in [
        ("/health", "get"),
        ("/instances", "get"),
        ("/instances", "post"),
        ("/instances/{id}", "get"),
        ("/instances/{id}", "delete"),
        ("/instances/{id}/start", "post"),
        ("/instances/{id}/stop", "post"),
        ("/instances/{id}/standby", "post"),
        ("/instances/{id}/restore", "post"),
        ("/instances/{id}/fork", "post"),
        ("/instances/{id}/logs", "get"),
        ("/instances/{id}/exec", "post"),
        ("/instances/{id}/snapshots", "post"),
        ("/snapshots", "get"),
        ("/snapshots/{snapshot_id}", "get"),
        ("/snapshots/{snapshot_id}", "delete"),
        ("/snapshots/{snapshot_id}/fork", "post"),
    ] {
        assert!(paths.get(p).and_then(|x| x.get(m)).is_some(), "{m} {p}");
    }
    let schemas = &doc["components"]["schemas"];
    let required: Vec<&str> = schemas["Instance"]["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for f in ["id", "name", "image", "state", "created_at"] {
        assert!(required.contains(&f), "Instance.{f} not required");
    }
    let states = schemas["InstanceState"]["enum"].as_array().unwrap();
    assert_eq!(states.len(), 8);
    // issue 13: published ports and the egress switch are documented
    assert!(schemas["PublishedPort"]["properties"]["host_port"].is_object());
    assert!(schemas["InstanceCreateParams"]["properties"]["ports"].is_object());
    assert!(schemas["Instance"]["properties"]["ports"].is_object());
    assert!(schemas["NetworkParams"]["properties"]["egress"].is_object());
    assert!(schemas["ErrorBody"].is_object());
    // fork: 201 is one instance or an array of outcomes; each outcome is an
    // instance or a named failure
    let fork201 = &paths["/instances/{id}/fork"]["post"]["responses"]["201"];
    assert_eq!(
        fork201["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ForkResponse"
    );
    assert_eq!(
        schemas["ForkResponse"]["oneOf"].as_array().unwrap().len(),
        2
    );
    assert_eq!(schemas["ForkOutcome"]["oneOf"].as_array().unwrap().len(), 2);
    assert!(schemas["ForkFailure"]["properties"]["error"].is_object());
    assert!(schemas["InstanceForkParams"]["properties"]["count"].is_object());
    assert!(schemas["Instance"]["properties"]["handoff"].is_object());
    let snap_required: Vec<&str> = schemas["Snapshot"]["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for f in [
        "id",
        "created_at",
        "kind",
        "size_bytes",
        "source_hypervisor",
        "source_instance_id",
        "source_instance_name",
    ] {
        assert!(snap_required.contains(&f), "Snapshot.{f} not required");
    }
    assert!(schemas["InstanceCreateParams"]["properties"]["size"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    // the same document is available without HTTP
    assert_eq!(
        serde_json::to_value(forkvm_api::openapi()).unwrap()["paths"]
            .as_object()
            .unwrap()
            .len(),
        paths.len()
    );
}
