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
    Manager::open(Config {
        data_dir: dir.path().join("data"),
        mem_dir: dir.path().join("mem"),
        bridge: "fvt-none".into(),
        subnet: "10.250.0.0/24".into(),
        qemu_bin: "qemu-system-x86_64".into(),
    })
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
    // A valid hypeman-style body with extra fields passes validation and
    // reaches the manager (the stub answers 501 today; the real one 201).
    let r = call(
        &app,
        post_json(
            "/instances",
            r#"{"name":"web-1","image":"docker.io/library/alpine","size":"512MB","vcpus":1,
                "ttl":"1h","tags":{"a":"b"},"network":{"enabled":true,"egress":{"enabled":false}},
                "cmd":["sleep","1"],"skip_guest_agent":false}"#,
        ),
    )
    .await;
    assert!(
        r.status == StatusCode::CREATED || r.status == StatusCode::NOT_IMPLEMENTED,
        "{}",
        r.status
    );
    if r.status == StatusCode::CREATED {
        let v = r.json();
        for field in ["id", "name", "image", "state", "created_at"] {
            assert!(!v[field].is_null(), "{field} missing in {v}");
        }
        assert_eq!(v["size"], "512MB");
    } else {
        r.assert_error(StatusCode::NOT_IMPLEMENTED, "not_implemented");
        assert_eq!(r.headers.get("x-should-retry").unwrap(), "false");
    }
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
    let r = call(&app, req(Method::GET, "/instances/x/logs?follow=true")).await;
    r.assert_error(StatusCode::NOT_IMPLEMENTED, "not_implemented");
    let r = call(&app, req(Method::GET, "/instances/x/logs?source=nonsense")).await;
    r.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let r = call(&app, req(Method::GET, "/snapshots")).await;
    r.assert_error(StatusCode::NOT_IMPLEMENTED, "not_implemented");
    let r = call(&app, post_json("/snapshots/s1/fork", r#"{"name":"ok"}"#)).await;
    r.assert_error(StatusCode::NOT_IMPLEMENTED, "not_implemented");
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
    let app = tcp_router(manager(&dir).await, "s3cret-token").unwrap();

    let r = call(&app, req(Method::GET, "/instances")).await;
    r.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(r.headers.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");

    for auth in [
        "Bearer wrong",
        "Bearer s3cret-toke",
        "Bearer s3cret-token-",
        "s3cret-token",
        "Basic s3cret-token",
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
        "Bearer s3cret-token".parse().unwrap(),
    );
    let r = call(&app, rq).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().is_array());

    let r = call(&app, req(Method::GET, "/health")).await;
    assert_eq!(r.status, StatusCode::OK);

    assert!(tcp_router(manager(&dir).await, "").is_err());
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
        ("/snapshots", "get"),
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
    assert!(schemas["ErrorBody"].is_object());
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
