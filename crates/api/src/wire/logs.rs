//! Reading an instance's console log.

use serde::Deserialize;
use utoipa::IntoParams;

/// Query of `GET /instances/{id}/logs`.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Number of lines to return from the end.
    pub tail: Option<usize>,
    /// Keep the response open and send new output as it is written, until
    /// the instance stops (or the client leaves).
    pub follow: Option<bool>,
    /// `app` (default): the serial console; `vmm`: QEMU's own log.
    pub source: Option<String>,
}
