use crate::agent::{AgentError, AgentFuture, CallPolicy, GuestAgent};
use crate::error::Result;
use forkvm_proto::agent as pb;
use std::path::Path;
use std::sync::Mutex;

/// How the fake agent answers one kind of call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    Ok,
    Unimplemented,
    Fail,
    /// Never answers (until the call's deadline).
    Silent,
}

struct AgentState {
    health: Answer,
    reconfigure: Answer,
    exec: Answer,
    exec_exit: i32,
    workload: Answer,
    /// Every exec request, in order.
    exec_requests: Vec<pb::ExecRequest>,
    /// The last workload spec per instance.
    workloads: Vec<(String, pb::WorkloadSpec)>,
    /// `(marker, gpa)` reported in Health.
    mailbox: Option<([u8; 16], u64)>,
    /// `(op, instance id)` of every call.
    calls: Vec<(&'static str, String)>,
}

pub(crate) struct FakeAgent {
    state: Mutex<AgentState>,
}

impl Default for FakeAgent {
    fn default() -> Self {
        Self {
            state: Mutex::new(AgentState {
                health: Answer::Ok,
                reconfigure: Answer::Ok,
                exec: Answer::Ok,
                exec_exit: 0,
                workload: Answer::Ok,
                exec_requests: vec![],
                workloads: vec![],
                mailbox: None,
                calls: vec![],
            }),
        }
    }
}

impl FakeAgent {
    fn st(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.state.lock().unwrap()
    }

    pub fn health(&self, a: Answer) {
        self.st().health = a;
    }

    pub fn reconfigure(&self, a: Answer) {
        self.st().reconfigure = a;
    }

    pub fn exec(&self, a: Answer, exit: i32) {
        let mut st = self.st();
        st.exec = a;
        st.exec_exit = exit;
    }

    /// The exec requests the agent got, in order.
    pub fn exec_requests(&self) -> Vec<pb::ExecRequest> {
        self.st().exec_requests.clone()
    }

    pub fn workload(&self, a: Answer) {
        self.st().workload = a;
    }

    /// The workloads started, `(instance id, spec)`, in order.
    pub fn workloads(&self) -> Vec<(String, pb::WorkloadSpec)> {
        self.st().workloads.clone()
    }

    pub fn report_mailbox(&self, marker: [u8; 16], gpa: u64) {
        self.st().mailbox = Some((marker, gpa));
    }

    /// How often `op` was called for instance `id`.
    pub fn calls(&self, op: &str, id: &str) -> usize {
        self.st()
            .calls
            .iter()
            .filter(|(o, i)| *o == op && i == id)
            .count()
    }

    fn answer(&self, op: &'static str, id: &str, which: fn(&AgentState) -> Answer) -> Answer {
        let mut st = self.st();
        st.calls.push((op, id.to_string()));
        which(&st)
    }
}

async fn respond<T>(
    op: &'static str,
    a: Answer,
    policy: CallPolicy,
    ok: T,
) -> Result<T, AgentError> {
    match a {
        Answer::Ok => Ok(ok),
        Answer::Unimplemented => Err(AgentError::Unimplemented {
            op,
            message: "fake".into(),
        }),
        Answer::Fail => Err(AgentError::Failed {
            op,
            message: "fake failure".into(),
        }),
        Answer::Silent => {
            tokio::time::sleep_until(policy.deadline).await;
            Err(AgentError::Timeout {
                op,
                last: "fake silence".into(),
            })
        }
    }
}

impl GuestAgent for FakeAgent {
    fn health<'a>(
        &'a self,
        id: &'a str,
        _socket: &'a Path,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::HealthResponse> {
        let a = self.answer("Health", id, |s| s.health.clone());
        let (marker, gpa) = self
            .st()
            .mailbox
            .map(|(m, g)| (m.to_vec(), g))
            .unwrap_or_default();
        let resp = pb::HealthResponse {
            version: "fake".into(),
            mailbox_marker: marker,
            mailbox_gpa: gpa,
            ..Default::default()
        };
        Box::pin(respond("Health", a, policy, resp))
    }

    fn reconfigure_network<'a>(
        &'a self,
        id: &'a str,
        _socket: &'a Path,
        _cfg: pb::NetworkConfig,
        policy: CallPolicy,
    ) -> AgentFuture<'a, ()> {
        let a = self.answer("ReconfigureNetwork", id, |s| s.reconfigure.clone());
        Box::pin(respond("ReconfigureNetwork", a, policy, ()))
    }

    fn exec<'a>(
        &'a self,
        id: &'a str,
        _socket: &'a Path,
        req: pb::ExecRequest,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::ExecResponse> {
        let a = self.answer("Exec", id, |s| s.exec.clone());
        self.st().exec_requests.push(req);
        let resp = pb::ExecResponse {
            exit_code: self.st().exec_exit,
            stderr: b"fake stderr".to_vec(),
            ..Default::default()
        };
        Box::pin(respond("Exec", a, policy, resp))
    }

    fn exec_session<'a>(
        &'a self,
        id: &'a str,
        _socket: &'a Path,
        _input: tokio::sync::mpsc::Receiver<pb::ExecInput>,
        _connect: std::time::Duration,
    ) -> AgentFuture<'a, crate::agent::ExecOutputStream> {
        let _ = self.answer("ExecSession", id, |_| Answer::Ok);
        Box::pin(async {
            Err(crate::agent::AgentError::Unimplemented {
                op: "ExecSession",
                message: "the fake agent has no sessions".into(),
            })
        })
    }

    fn stat<'a>(
        &'a self,
        id: &'a str,
        _socket: &'a Path,
        _req: pb::StatRequest,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::StatResponse> {
        let a = self.answer("Stat", id, |_| Answer::Ok);
        Box::pin(respond("Stat", a, policy, pb::StatResponse::default()))
    }

    fn copy_in<'a>(
        &'a self,
        _id: &'a str,
        _socket: &'a Path,
        _input: tokio::sync::mpsc::Receiver<pb::CopyInRequest>,
        _connect: std::time::Duration,
    ) -> AgentFuture<'a, pb::CopyInResult> {
        Box::pin(async {
            Err(crate::agent::AgentError::Unimplemented {
                op: "CopyIn",
                message: "the fake agent has no files".into(),
            })
        })
    }

    fn copy_out<'a>(
        &'a self,
        _id: &'a str,
        _socket: &'a Path,
        _req: pb::CopyOutRequest,
        _connect: std::time::Duration,
    ) -> AgentFuture<'a, crate::agent::CopyOutStream> {
        Box::pin(async {
            Err(crate::agent::AgentError::Unimplemented {
                op: "CopyOut",
                message: "the fake agent has no files".into(),
            })
        })
    }

    fn set_clock<'a>(
        &'a self,
        id: &'a str,
        _socket: &'a Path,
        _unix_time_ns: i64,
        policy: CallPolicy,
    ) -> AgentFuture<'a, ()> {
        let _ = self.answer("SetClock", id, |_| Answer::Ok);
        Box::pin(respond("SetClock", Answer::Ok, policy, ()))
    }

    fn start_workload<'a>(
        &'a self,
        id: &'a str,
        _socket: &'a Path,
        spec: pb::WorkloadSpec,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::WorkloadStatus> {
        let a = self.answer("StartWorkload", id, |s| s.workload.clone());
        if a == Answer::Ok {
            self.st().workloads.push((id.to_string(), spec));
        }
        let status = pb::WorkloadStatus {
            state: pb::workload_status::State::Running as i32,
            pid: 100,
            started: true,
            ..Default::default()
        };
        Box::pin(respond("StartWorkload", a, policy, status))
    }

    fn forget(&self, _id: &str) {}
}
