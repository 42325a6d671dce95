//! The API's error type: every failure leaves as JSON `{code, message}` with a
//! fitting status, including axum's own extractor rejections.

use crate::wire::ErrorBody;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use forkvm_core::{CoreError, ErrorKind};

/// An error answer of the API.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    /// The request asks for an option this server does not offer (a hypeman
    /// feature forkvm lacks): the caller's to change, so a 4xx.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "unsupported", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
    }
}

impl From<CoreError> for ApiError {
    /// The one place a core error becomes an HTTP status.
    fn from(e: CoreError) -> Self {
        let status = match e.kind() {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            // 409 rather than 507 for Exhausted: hypeman clients know 409,
            // and it is the caller's request that cannot be satisfied now.
            ErrorKind::Conflict | ErrorKind::Exhausted => StatusCode::CONFLICT,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            // axum answers type mismatches with 422; hypeman (and our contract) say 400.
            JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
                Self::invalid(r.body_text())
            }
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                r.body_text(),
            ),
            other => Self::new(other.status(), "invalid_request", other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        let status = r.status();
        let code = if status.is_server_error() {
            "internal_error"
        } else {
            "invalid_request"
        };
        Self::new(status, code, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::invalid(r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), code = self.code, message = %self.message, "request rejected");
        }
        let body = ErrorBody {
            code: self.code.to_string(),
            message: self.message,
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        // The hypeman (Stainless) client retries 409 and 5xx by default; our
        // errors are deterministic, and retrying a failed create or fork would
        // only repeat the failure (or clash on the name).
        if self.status != StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}
