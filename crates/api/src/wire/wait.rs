//! `GET /instances/{id}/wait` (hypeman's `instances.wait`): the query and
//! the answer, and the Go duration syntax its `timeout` uses.

use super::InstanceState;
use crate::error::ApiError;
use forkvm_core as core;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};

/// The wait's parameters.
#[derive(Clone, Debug, Deserialize, IntoParams)]
pub struct WaitQuery {
    /// The state to wait for.
    pub state: InstanceState,
    /// Go duration (`30s`, `2m`, `1m30s`, `500ms`); default 60s, at most 5m.
    pub timeout: Option<String>,
}

impl WaitQuery {
    pub fn timeout(&self) -> Result<Duration, ApiError> {
        let d = match &self.timeout {
            None => Duration::from_secs(60),
            Some(t) => parse_go_duration(t).ok_or_else(|| {
                ApiError::invalid(format!("timeout {t:?}: expected e.g. 30s, 2m, 1m30s"))
            })?,
        };
        Ok(d.min(core::MAX_WAIT))
    }
}

/// Where the wait ended (hypeman's WaitForStateResponse).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct WaitForStateResponse {
    /// The instance's state when the wait ended.
    pub state: InstanceState,
    /// The time ran out before the state was reached.
    pub timed_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_error: Option<String>,
}

impl From<core::WaitOutcome> for WaitForStateResponse {
    fn from(o: core::WaitOutcome) -> Self {
        Self {
            state: o.instance.state.into(),
            timed_out: o.timed_out,
            state_error: o.instance.state_error,
        }
    }
}

/// A non-negative Go duration: numbers (decimals allowed) each with a unit
/// of `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`; `None` for anything else.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() || rest.len() > 64 {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let (unit, secs) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .into_iter()
        .filter(|(u, _)| rest.starts_with(u))
        .max_by_key(|(u, _)| u.len())?;
        rest = &rest[unit.len()..];
        total += n * secs;
    }
    (total.is_finite() && total <= 1e9).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let d = |s| parse_go_duration(s);
        assert_eq!(d("30s"), Some(Duration::from_secs(30)));
        assert_eq!(d("2m"), Some(Duration::from_secs(120)));
        assert_eq!(d("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(d("0"), Some(Duration::ZERO));
        for bad in ["", "30", "s", "-1s", "1x", "1m30", "1e3s"] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }
}
