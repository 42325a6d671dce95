//! The error body every non-2xx response carries.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Error body of every non-2xx response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `invalid_request`, `not_found`.
    #[schema(example = "not_found")]
    pub code: String,
    /// Human-readable description.
    pub message: String,
}
