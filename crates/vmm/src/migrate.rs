//! Moving a machine's state between QEMUs: live migration into another
//! VMM and the polling both ends of any migration (also a save or load of
//! device state) need.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::VmmError;
use crate::qemu::{QemuHypervisor, file_tail, query_status};
use crate::qmp::QmpClient;
use crate::{MigrationReport, RunState, VmHandle};

/// Longest a save, load or live migration may take.
pub(crate) const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Parameters of a local migration: no bandwidth cap (QEMU's default
/// throttles to 128 MiB/s). No downtime limit: the source is stopped before
/// the copy (stop-and-copy), so there is no final round to bound.
fn local_migration_params() -> Value {
    json!({ "max-bandwidth": 64u64 << 30 })
}

/// Full-RAM migration; `pause-before-switchover` only when a disk is to be
/// frozen at the switchover (capabilities persist in a QEMU, so both are
/// always set).
fn caps_full_ram(pause_at_switchover: bool) -> Value {
    json!({ "capabilities": [
        { "capability": "x-ignore-shared", "state": false },
        { "capability": "pause-before-switchover", "state": pause_at_switchover },
    ] })
}

impl QemuHypervisor {
    pub(crate) async fn migrate_impl(
        &self,
        from: &VmHandle,
        to: &VmHandle,
        freeze_disk: Option<&Path>,
    ) -> Result<MigrationReport, VmmError> {
        let mut qt = self.qmp(to).await?;
        let st = query_status(&mut qt).await?;
        if st != RunState::InMigrate {
            return Err(VmmError::Migration(format!(
                "vm {} is {st:?}, not waiting for incoming state",
                to.id
            )));
        }
        // A socketpair, one end passed to each QEMU: no socket in a
        // directory either QEMU would need to write.
        let (rx, tx) =
            UnixStream::pair().map_err(|e| VmmError::io("socketpair", "migration", e))?;
        qt.execute("migrate-set-capabilities", Some(caps_full_ram(false)))
            .await?;
        qt.execute_with_fd("getfd", Some(json!({ "fdname": "forkvm-in" })), rx.as_fd())
            .await?;
        drop(rx);
        qt.execute("migrate-incoming", Some(json!({ "uri": "fd:forkvm-in" })))
            .await?;
        let mut qf = self.qmp(from).await?;
        let pause = freeze_disk.is_some();
        let top = match freeze_disk {
            Some(p) => Some(crate::disk::prepare_top(&self.qemu_img, &mut qf, p).await?),
            None => None,
        };
        qf.execute("migrate-set-capabilities", Some(caps_full_ram(pause)))
            .await?;
        qf.execute("migrate-set-parameters", Some(local_migration_params()))
            .await?;
        qf.execute_with_fd("getfd", Some(json!({ "fdname": "forkvm-out" })), tx.as_fd())
            .await?;
        drop(tx);
        // Stop-and-copy (see `Hypervisor::migrate`): QEMU's own downtime
        // figure would leave out the copy, so the pause is timed here.
        let stopped_at = Instant::now();
        qf.execute("stop", None).await?;
        qf.execute("migrate", Some(json!({ "uri": "fd:forkvm-out" })))
            .await?;
        let m = finish_migration(&mut qf, &from.id, top.as_ref()).await?;
        let downtime = stopped_at.elapsed();
        wait_loaded(&mut qt, to).await?;
        let report = MigrationReport {
            total_ms: m.get("total-time").and_then(Value::as_f64).unwrap_or(0.0),
            downtime_ms: downtime.as_secs_f64() * 1000.0,
            transferred_bytes: m
                .pointer("/ram/transferred")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        };
        tracing::info!(from = %from.id, to = %to.id, ?report, "live migration done");
        Ok(report)
    }
}

/// Waits for the migration to end; with `freeze_disk`, freezes the disk at
/// the switchover pause (vCPUs stopped, I/O drained, devices not yet
/// saved) and lets it continue. A failed freeze cancels the migration.
async fn finish_migration(
    q: &mut QmpClient,
    id: &str,
    freeze_disk: Option<&crate::disk::NewTop>,
) -> Result<Value, VmmError> {
    let Some(new_top) = freeze_disk else {
        return wait_migration(q, id).await;
    };
    let m = wait_status(q, id, &["pre-switchover"]).await?;
    if m.get("status").and_then(Value::as_str) == Some("pre-switchover") {
        if let Err(e) = crate::disk::snapshot_rw(q, new_top).await {
            let _ = q.execute("migrate_cancel", None).await;
            return Err(e);
        }
        q.execute(
            "migrate-continue",
            Some(json!({ "state": "pre-switchover" })),
        )
        .await?;
    }
    wait_migration(q, id).await
}

/// Polls `query-migrate` on the sending side until the migration ends;
/// returns its final status object.
pub(crate) async fn wait_migration(q: &mut QmpClient, id: &str) -> Result<Value, VmmError> {
    wait_status(q, id, &[]).await
}

/// Polls `query-migrate` until the migration completes or reaches one of
/// `stop_at`; returns that status object. Failure is an error.
async fn wait_status(q: &mut QmpClient, id: &str, stop_at: &[&str]) -> Result<Value, VmmError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let m = q.execute("query-migrate", None).await?;
        match m.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => return Ok(m),
            s if stop_at.contains(&s) => return Ok(m),
            "failed" | "cancelled" => {
                return Err(VmmError::Migration(format!(
                    "migration of {id} failed: {}",
                    m.get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given")
                )));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            let _ = q.execute("migrate_cancel", None).await;
            return Err(VmmError::Timeout {
                what: format!("migrating {id}"),
                timeout: MIGRATION_TIMEOUT,
            });
        }
        // QEMU 7.2 has no blocking "wait for migration" command; poll.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Polls the receiving side until it holds the loaded machine, paused.
pub(crate) async fn wait_loaded(q: &mut QmpClient, h: &VmHandle) -> Result<(), VmmError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        // QEMU 7.2 exits if loading fails: a closed QMP connection here.
        let st = query_status(q).await.map_err(|e| {
            VmmError::Migration(format!(
                "load of {} failed: {e}; qemu log: {}",
                h.id,
                file_tail(&h.qemu_log)
            ))
        })?;
        match st {
            RunState::Paused => return Ok(()),
            RunState::InMigrate => {}
            other => {
                return Err(VmmError::Migration(format!(
                    "load of {} ended in state {other:?}; qemu log: {}",
                    h.id,
                    file_tail(&h.qemu_log)
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(VmmError::Timeout {
                what: format!("loading state of {}", h.id),
                timeout: MIGRATION_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
