//! Network re-addressing in three stages with one code path that touches
//! the interface:
//!
//! 1. **validate** ([`request`]): text from the boot config or the
//!    ReconfigureNetwork RPC ([`NetRequest::validate`]), or the mailbox's
//!    already-typed payload ([`NetDesired::from_payload`]), becomes a
//!    [`NetDesired`] under one set of agent rules;
//! 2. **plan** ([`plan`](mod@plan)): [`plan::plan`], a pure function from the
//!    desired identity and the observed [`plan::LinkState`] (read by
//!    [`link`]) to an ordered list of [`NetStep`]s — no I/O, so the ordering
//!    rules are unit tests;
//! 3. **apply** ([`apply`](mod@apply)): the executor that carries the steps
//!    out over netlink, plus the gratuitous ARP ([`arp`]).
//!
//! [`configure`](mod@configure) chains the three for each caller: everything
//! at once (boot, RPC), or split around the ack (the mailbox handoff).

mod apply;
mod arp;
mod configure;
mod link;
mod plan;
mod request;

use std::time::Instant;

pub use apply::{NetApplyError, apply};
pub use configure::{
    ApplyReport, apply_deferred, configure, configure_network_part, log_configured,
};
pub use link::{link_state, read_hint};
pub use plan::{LinkHint, NetStep};
pub use request::{NetDesired, NetRequest, valid_hostname};

/// Microseconds since `t`, saturating (the timings in [`ApplyReport`]).
fn us_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}
