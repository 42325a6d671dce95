//! forkvm's REST API: an axum router over [`forkvm_core::Manager`], its
//! OpenAPI document (generated with utoipa) and the unix-socket and TCP
//! listeners.
//!
//! The API is wire-compatible with the hypeman VM manager where concepts
//! overlap (paths, field names, states, status codes), so hypeman's generated
//! clients work unchanged; forkvm's additions are extra fields and endpoints.
//! Every error is JSON `{code, message}`, including routing and extractor
//! rejections.

pub mod error;
pub mod exec_ws;
pub mod files;
mod images;
mod logs;
mod observe;
pub mod routes;
pub mod server;
mod stats;
pub mod tls;
pub mod wire;

pub use error::ApiError;
pub use routes::{ApiDoc, openapi, router};
pub use server::{
    MIN_TOKEN_LEN, ServeError, bind_unix, check_plain_addr, check_token, serve_tcp,
    serve_tcp_listener, serve_unix, serve_unix_listener, tcp_router,
};
pub use tls::{TlsError, load_server_config, serve_tls_listener};
