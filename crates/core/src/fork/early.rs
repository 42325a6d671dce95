//! Forks that start during the capture of their running source.
//!
//! A fork needs its base only to load its device state: allocation, TAP and
//! QEMU's start-up (~40–60 ms under TCG here) need the source's settings and
//! the base file at its path and full size. So for a running source with its
//! own memory file and no writable disk (the fork's disk needs the frozen
//! layer, which the source writes until its pause), the capture and the
//! forks run side by side: each fork starts its VMM once the capture has
//! placed the base file ([`Gate::placed`]: the copy's target made, or the
//! handed-over file renamed, both before the pause) and loads its state once
//! the capture is done ([`Gate::wait`]).
//!
//! The forks' QEMUs map the base file copy-on-write while the capture fills
//! it: nothing reads guest RAM before the state load (QEMU waits for
//! incoming state; the vCPUs never ran), and a private mapping's untouched
//! pages show the file as it is when they are first read, so the forks see
//! the finished base.

use super::{Base, Origin, Plan, fork_all, transient_base};
use crate::capture::{self, CaptureMode, Planned};
use crate::error::{CoreError, Result};
use crate::model::{ForkRequest, HandoffRecord, Instance, InstanceState, Memory, Stage};
use crate::services::Services;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// Whether forks of `src` per `req` start during its capture (module docs).
pub(super) fn applies(src: &Instance, req: &ForkRequest, plan: &Plan) -> bool {
    req.from_running
        && src.state == InstanceState::Running
        && plan.target == InstanceState::Running
        && src.memory == Memory::Own
        && src.disk_top.is_none()
}

/// Capture `src` and fork it at the same time; the request's results (the
/// capture's error if it failed: its forks are removed).
pub(super) async fn fork_during_capture(
    svc: &Arc<Services>,
    src: &mut Instance,
    plan: &Plan,
    started: Instant,
) -> Result<Vec<Result<Instance>>> {
    let planned = Planned::new(svc)?;
    let origin = Origin {
        snap: planned.settings_of(svc, src),
        forked_from: src.id.clone(),
    };
    let (ready, gate) = Gate::pending(planned.placed.subscribe());
    let captured = async {
        let base = capture::capture_planned(svc, src, None, CaptureMode::Copy, planned)
            .await
            .and_then(|c| transient_base(svc, c, origin.forked_from.clone()))
            .map(|mut b| {
                b.snapshot_ms = started.elapsed().as_secs_f64() * 1000.0;
                Arc::new(b)
            });
        if base.is_ok() {
            svc.cfg.test_hooks.crash_point("fork:snapshot");
        }
        // Forks waiting for a failed capture fail (and remove themselves).
        ready.send_replace(Some(base.as_ref().ok().cloned()));
        base
    };
    let (base, results) = tokio::join!(captured, fork_all(svc, &origin, &gate, plan, started));
    // The channel holds the base too: released before the collection.
    drop((gate, ready));
    super::finish(svc, base?);
    Ok(results)
}

/// The state of a base being captured: `None` while it runs, then the base
/// or `None` for a failed capture.
type Progress = Option<Option<Arc<Base>>>;

/// The base forks load their device state from: ready, or being captured
/// while they start.
pub(super) struct Gate {
    /// The capture's `Planned::placed`.
    placed: watch::Receiver<bool>,
    done: watch::Receiver<Progress>,
}

impl Gate {
    pub fn ready(base: &Arc<Base>) -> Self {
        Self {
            placed: watch::channel(true).1,
            done: watch::channel(Some(Some(base.clone()))).1,
        }
    }

    fn pending(placed: watch::Receiver<bool>) -> (watch::Sender<Progress>, Self) {
        let (tx, done) = watch::channel(None);
        (tx, Self { placed, done })
    }

    /// Once a VMM may map the base file: placed, or the capture is over
    /// (an error if it failed).
    pub async fn placed(&self) -> Result<()> {
        if self.placed.clone().wait_for(|p| *p).await.is_ok() {
            return Ok(());
        }
        self.outcome().await.map(drop)
    }

    /// The capture's figures into `rec` if the base is ready.
    pub fn note(&self, rec: &mut HandoffRecord) {
        if let Some(Some(base)) = &*self.done.borrow() {
            rec.set(Stage::Snapshot, base.snapshot_ms);
            if let Some(p) = base.pause_ms {
                rec.set(Stage::SourcePause, p);
            }
        }
    }

    /// The base once ready; the time waited for it is `BaseWait`. The
    /// capture's figures are noted again: a fork that started during the
    /// capture may find it over without waiting.
    pub async fn wait(&self, rec: &mut HandoffRecord) -> Result<Arc<Base>> {
        let t = Instant::now();
        let waited = self.done.borrow().is_none();
        let base = self.outcome().await?;
        if waited {
            rec.record(Stage::BaseWait, t);
        }
        self.note(rec);
        Ok(base)
    }

    async fn outcome(&self) -> Result<Arc<Base>> {
        let mut rx = self.done.clone();
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|p| p.clone());
        outcome
            .flatten()
            .ok_or_else(|| CoreError::Conflict("the capture of the running source failed".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_capture_fails_its_waiting_forks() {
        let placed = watch::channel(false);
        let (tx, gate) = Gate::pending(placed.0.subscribe());
        drop(placed);
        tx.send_replace(Some(None));
        assert!(matches!(gate.placed().await, Err(CoreError::Conflict(_))));
        let mut rec = HandoffRecord::default();
        let waited = gate.wait(&mut rec).await;
        assert!(matches!(waited, Err(CoreError::Conflict(_))));
        assert_eq!(rec.get(Stage::BaseWait), None);
    }

    #[tokio::test]
    async fn a_dropped_capture_fails_its_waiting_forks() {
        let (placed, rx) = watch::channel(false);
        let (tx, gate) = Gate::pending(rx);
        placed.send_replace(true);
        assert!(
            gate.placed().await.is_ok(),
            "placed before the capture ends"
        );
        drop(tx);
        let mut rec = HandoffRecord::default();
        assert!(gate.wait(&mut rec).await.is_err());
    }
}
