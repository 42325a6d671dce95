//! The entry points that chain observe → plan → apply, with timings: the
//! whole plan at once for boot and ReconfigureNetwork ([`configure`]), or
//! split around the ack for the mailbox handoff ([`configure_network_part`],
//! then [`apply_deferred`]).

use std::time::Instant;

use rtnetlink::Handle;
use tracing::{debug, info};

use super::apply::{NetApplyError, apply_timed};
use super::link::link_state;
use super::plan::{LinkHint, LinkState, NetStep, plan};
use super::request::NetDesired;
use super::us_since;

/// What [`configure_network_part`] did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// Every planned step, deferred ones included.
    pub steps: Vec<NetStep>,
    /// Time for the network steps (the deferred ones excluded).
    pub elapsed_us: u64,
    /// Steps not yet applied; run them with [`apply_deferred`].
    pub deferred: Vec<NetStep>,
    /// µs for reading the link state (when read), then for each applied
    /// step in order.
    pub step_us: Vec<u64>,
    /// Whether the link was read (false: planned against a [`LinkHint`]).
    pub link_read: bool,
    pub index: u32,
}

/// Reads the current state, plans, and applies everything: the single entry
/// point for boot and ReconfigureNetwork. Logs once done.
pub async fn configure(
    handle: &Handle,
    desired: &NetDesired,
) -> Result<ApplyReport, NetApplyError> {
    let mut report = configure_network_part(handle, desired, None).await?;
    apply_deferred(handle, &mut report).await?;
    log_configured(desired, &report);
    Ok(report)
}

/// The same plan as [`configure`] but applies only the steps the new address
/// needs; the rest stays in `deferred`. Does not log (hot path of a fork).
///
/// With a `hint` for the interface (and a MAC to set) the link is not read
/// first: the plan is made against [`LinkState::assumed`], which includes
/// every step. Should that fail (the hint was stale), the plan is made again
/// from the link as read.
pub async fn configure_network_part(
    handle: &Handle,
    desired: &NetDesired,
    hint: Option<&LinkHint>,
) -> Result<ApplyReport, NetApplyError> {
    if let Some(hint) = hint.filter(|h| h.interface == desired.interface && desired.mac.is_some()) {
        match configure_against(handle, desired, LinkState::assumed(hint)).await {
            Ok(r) => return Ok(r),
            Err(e) => debug!(error = %e, "apply against the link hint failed; reading the link"),
        }
    }
    let start = Instant::now();
    let current = link_state(handle, &desired.interface).await?;
    let mut report = configure_against(handle, desired, current).await?;
    report
        .step_us
        .insert(0, us_since(start).saturating_sub(report.elapsed_us));
    report.elapsed_us = us_since(start);
    report.link_read = true;
    Ok(report)
}

/// Plans against `current` and applies the non-deferrable steps.
async fn configure_against(
    handle: &Handle,
    desired: &NetDesired,
    current: LinkState,
) -> Result<ApplyReport, NetApplyError> {
    let start = Instant::now();
    let steps = plan(desired, &current);
    let (deferred, now): (Vec<NetStep>, Vec<NetStep>) =
        steps.iter().cloned().partition(NetStep::is_deferrable);
    let mut step_us = Vec::new();
    apply_timed(handle, current.index, &now, &mut step_us).await?;
    Ok(ApplyReport {
        steps,
        elapsed_us: us_since(start),
        deferred,
        step_us,
        link_read: false,
        index: current.index,
    })
}

/// Applies the steps [`configure_network_part`] left over.
pub async fn apply_deferred(
    handle: &Handle,
    report: &mut ApplyReport,
) -> Result<(), NetApplyError> {
    let deferred = std::mem::take(&mut report.deferred);
    apply_timed(handle, report.index, &deferred, &mut report.step_us).await
}

/// The one "network configured" log line (the mailbox path logs it after
/// its ack is out, so it is not part of [`configure_network_part`]).
pub fn log_configured(desired: &NetDesired, report: &ApplyReport) {
    info!(
        interface = %desired.interface,
        mac = desired.mac.map(tracing::field::display),
        ipv4 = %desired.ipv4,
        prefix_len = desired.prefix_len,
        steps = report.steps.len(),
        elapsed_us = report.elapsed_us,
        "network configured"
    );
}
