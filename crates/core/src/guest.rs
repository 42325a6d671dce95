//! Talking to a running guest on a user's behalf: exec, the serial console,
//! and what the agent reports about itself.

use crate::agent::{CallPolicy, mailbox_of};
use crate::error::{CoreError, Result};
use crate::model::{ExecRequest, ExecResult, Instance, InstanceState, MailboxInfo};
use crate::services::Services;
use forkvm_proto::agent as pb;
use std::collections::HashMap;
use std::time::Duration;

pub(crate) fn require_running(inst: &Instance, what: &str) -> Result<()> {
    if inst.state == InstanceState::Running {
        return Ok(());
    }
    Err(CoreError::Conflict(format!(
        "instance {} is {}; {what}",
        inst.name,
        inst.state.as_str()
    )))
}

/// An exec without a timeout is killed after this long.
pub const DEFAULT_EXEC_TIMEOUT_S: u32 = 600;
/// Execs one instance may run at once; more are refused (409).
pub const MAX_EXECS_PER_INSTANCE: usize = 16;

/// Execs running now, per instance.
#[derive(Default)]
pub(crate) struct ExecSlots(std::sync::Mutex<HashMap<String, usize>>);

fn full(inst: &Instance) -> CoreError {
    CoreError::Exhausted(format!(
        "instance {} already runs {MAX_EXECS_PER_INSTANCE} execs; wait for one to finish",
        inst.name
    ))
}

/// One running exec; its slot is freed when dropped.
pub(crate) struct ExecSlot<'a> {
    slots: &'a ExecSlots,
    id: String,
}

impl ExecSlots {
    /// A slot for `id`, or the error a full instance answers.
    pub(crate) fn claim(&self, inst: &Instance) -> Result<ExecSlot<'_>> {
        self.take(&inst.id).ok_or_else(|| full(inst))
    }

    fn release(&self, id: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(id);
            }
        }
    }

    /// Counts one more exec of `id` unless it runs the most already.
    fn acquire(&self, id: &str) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(id.to_string()).or_insert(0);
        if *n >= MAX_EXECS_PER_INSTANCE {
            return false;
        }
        *n += 1;
        true
    }

    fn take(&self, id: &str) -> Option<ExecSlot<'_>> {
        self.acquire(id).then(|| ExecSlot {
            slots: self,
            id: id.to_string(),
        })
    }
}

impl Drop for ExecSlot<'_> {
    fn drop(&mut self) {
        self.slots.release(&self.id);
    }
}

/// An [`ExecSlot`] that outlives the call taking it (a streaming session).
pub(crate) struct OwnedExecSlot {
    svc: std::sync::Arc<Services>,
    id: String,
}

impl OwnedExecSlot {
    pub(crate) fn claim(svc: &std::sync::Arc<Services>, inst: &Instance) -> Result<Self> {
        if !svc.execs.acquire(&inst.id) {
            return Err(full(inst));
        }
        Ok(Self {
            svc: svc.clone(),
            id: inst.id.clone(),
        })
    }
}

impl Drop for OwnedExecSlot {
    fn drop(&mut self) {
        self.svc.execs.release(&self.id);
    }
}

pub(crate) async fn exec(svc: &Services, id_or_name: &str, req: ExecRequest) -> Result<ExecResult> {
    let inst = svc.find(id_or_name)?;
    require_running(&inst, "exec needs a Running instance")?;
    if req.command.first().is_none_or(|p| p.is_empty()) {
        return Err(CoreError::Invalid("command must name a program".into()));
    }
    let _slot = svc.execs.claim(&inst)?;
    let timeout_s = req.timeout_s.unwrap_or(DEFAULT_EXEC_TIMEOUT_S);
    // The agent kills the command at its timeout; the call waits a little
    // longer for the answer.
    let per_try = Duration::from_secs(u64::from(timeout_s) + 10);
    let msg = exec_message(&inst, req, timeout_s);
    let t0 = std::time::Instant::now();
    let resp = svc
        .agent
        .exec(
            &inst.id,
            &svc.paths(&inst).agent_socket,
            msg,
            CallPolicy::within(per_try, per_try),
        )
        .await?;
    Ok(ExecResult {
        exit_code: resp.exit_code,
        stdout: resp.stdout,
        stderr: resp.stderr,
        timed_out: resp.timed_out,
        duration_ms: t0.elapsed().as_millis() as u64,
    })
}

/// The agent's request for a user's exec: in an OCI image's instance (one
/// with a workload) it runs in the image's root, as `docker exec` does; in
/// the `default` image's, in the agent's own.
pub(crate) fn exec_message(inst: &Instance, req: ExecRequest, timeout_s: u32) -> pb::ExecRequest {
    pb::ExecRequest {
        argv: req.command,
        env: req.env.into_iter().collect(),
        stdin: req.stdin.unwrap_or_default(),
        timeout_ms: timeout_s.saturating_mul(1000),
        cwd: String::new(),
        image_root: inst.workload.is_some(),
    }
}

/// What the guest agent says about itself (forkvm extra, for operators and
/// tests: RPC counters prove which handoff path a fork took).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AgentHealth {
    pub version: String,
    pub boot_id: String,
    pub uptime_ms: u64,
    pub hostname: String,
    pub rpc_counts: std::collections::BTreeMap<String, u64>,
    pub mailbox: Option<MailboxInfo>,
    pub mailbox_applied: u64,
    pub mailbox_rejected: u64,
    pub mailbox_applied_generation: u64,
}

pub(crate) async fn agent_health(svc: &Services, id_or_name: &str) -> Result<AgentHealth> {
    let inst = svc.find(id_or_name)?;
    require_running(&inst, "its agent is not reachable")?;
    let h = svc
        .agent
        .health(
            &inst.id,
            &svc.paths(&inst).agent_socket,
            CallPolicy::within(Duration::from_secs(10), Duration::from_secs(3)),
        )
        .await?;
    Ok(AgentHealth {
        mailbox: mailbox_of(&h),
        version: h.version,
        boot_id: h.boot_id,
        uptime_ms: h.uptime_ms,
        hostname: h.hostname,
        rpc_counts: h.rpc_counts.into_iter().collect(),
        mailbox_applied: h.mailbox_applied,
        mailbox_rejected: h.mailbox_rejected,
        mailbox_applied_generation: h.mailbox_applied_generation,
    })
}

/// Step the guest clock to the host's (a restored guest resumes at snapshot
/// time). Best effort: a guest without the RPC keeps running.
pub(crate) async fn set_clock(svc: &Services, inst: &Instance) {
    let now = svc.now().timestamp_nanos_opt().unwrap_or_default();
    let policy = CallPolicy::within(Duration::from_secs(5), Duration::from_secs(2));
    let socket = svc.paths(inst).agent_socket;
    let t = std::time::Instant::now();
    match svc.agent.set_clock(&inst.id, &socket, now, policy).await {
        Ok(()) => tracing::debug!(instance = %inst.id,
            took_ms = t.elapsed().as_secs_f64() * 1000.0, "guest clock stepped"),
        Err(e) => tracing::warn!(instance = %inst.id, error = %e, "setting the guest clock failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Workload;

    #[test]
    fn exec_runs_in_the_image_root_of_oci_instances_only() {
        let now = chrono::Utc::now();
        let mut inst = Instance::created("i1".into(), "web".into(), "default".into(), 1, 128, now);
        let req = ExecRequest {
            command: vec!["cat".into(), "/etc/os-release".into()],
            env: [("K".to_string(), "v".to_string())].into(),
            stdin: Some(b"in".to_vec()),
            timeout_s: Some(3),
        };
        let msg = exec_message(&inst, req.clone(), 3);
        assert!(!msg.image_root);
        assert_eq!(msg.argv, ["cat", "/etc/os-release"]);
        assert_eq!(msg.env["K"], "v");
        assert_eq!((msg.stdin.as_slice(), msg.timeout_ms), (&b"in"[..], 3000));
        assert!(msg.cwd.is_empty());
        inst.workload = Some(Workload {
            argv: vec!["httpd".into()],
            ..Default::default()
        });
        let msg = exec_message(&inst, req, 3);
        assert!(msg.image_root);
        assert_eq!(msg.argv, ["cat", "/etc/os-release"]);
    }
}
