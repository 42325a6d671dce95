//! Reading an instance's console log.

use serde::Deserialize;
use utoipa::IntoParams;

/// Query of `GET /instances/{id}/logs`.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Number of lines to return from the end.
    pub tail: Option<usize>,
    /// Streaming new lines is not supported yet: `true` is answered with 400 `unsupported`.
    pub follow: Option<bool>,
    /// Log source: only "app" (serial console) is available.
    pub source: Option<String>,
}
