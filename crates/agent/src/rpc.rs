//! The `forkvm.agent.v1.Agent` gRPC service and the per-connection server loop.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use forkvm_proto::agent::agent_server::{Agent, AgentServer};
use forkvm_proto::agent::{
    CopyInRequest, CopyInResult, CopyOutMessage, CopyOutRequest, ExecExit, ExecInput, ExecOutput,
    ExecRequest, ExecResponse, HealthRequest, HealthResponse, NetworkConfig, ReconfigureResponse,
    SetClockRequest, SetClockResponse, StatRequest, StatResponse, WorkloadSpec, WorkloadStatus,
    copy_in_request, exec_input, exec_output,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use nix::time::{ClockId, clock_gettime, clock_settime};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::exec::{self, ExecError, ExecEvent, ExecSpec, Reaper};
use crate::files;
use crate::mailbox::Mailbox;
use crate::netconf::{self, ApplyReport, LinkHint, NetApplyError, NetDesired, NetRequest};
use crate::port::{MAX_FRAME_SIZE, Port};
use crate::workload::{Workload, mounts};

/// Boot env flag that makes ReconfigureNetwork answer `Unimplemented`, so hosts
/// can test their fallback path.
pub const DECLINE_RECONFIGURE_ENV: &str = "FORKVM_AGENT_DECLINE_RECONFIGURE";

/// Boot env flag enabling the agent's test hooks (see `hang_if_asked`).
pub const TEST_HOOKS_ENV: &str = "FORKVM_AGENT_TEST_HOOKS";
/// While this file exists (and hooks are enabled) RPCs never answer.
pub const TEST_HANG_FILE: &str = "/run/forkvm-test-hang";
/// While this file exists (and hooks are enabled) the guest kernel is made to
/// panic the moment a mailbox payload is seen, before anything is applied:
/// a fork whose guest dies mid-handoff, for host tests.
pub const TEST_CRASH_ON_PAYLOAD_FILE: &str = "/run/forkvm-test-crash-on-payload";

/// Pause before waiting for a host again after the port reported an error.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Shared state of the agent service.
pub struct AgentState {
    pub boot_id: String,
    pub started: Instant,
    pub boot_env: BTreeMap<String, String>,
    pub reaper: Arc<Reaper>,
    pub netlink: rtnetlink::Handle,
    /// The armed mailbox page; `None` if setting it up failed.
    pub mailbox: Option<Arc<Mailbox>>,
    /// The OCI workload (StartWorkload).
    pub workload: Workload,
    counts: Mutex<BTreeMap<String, u64>>,
    // Serialises re-addressing: two concurrent plans would interleave steps.
    net_lock: tokio::sync::Mutex<()>,
}

impl AgentState {
    pub fn new(
        boot_env: BTreeMap<String, String>,
        reaper: Arc<Reaper>,
        netlink: rtnetlink::Handle,
        mailbox: Option<Arc<Mailbox>>,
    ) -> Self {
        AgentState {
            boot_id: new_boot_id(),
            started: Instant::now(),
            boot_env,
            reaper,
            netlink,
            mailbox,
            workload: Workload::default(),
            counts: Mutex::new(BTreeMap::new()),
            net_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The single re-addressing entry point for the RPC and the mailbox
    /// handoff: serialised, then plan + apply via netlink.
    pub async fn configure_network(
        &self,
        desired: &NetDesired,
    ) -> Result<ApplyReport, NetApplyError> {
        let _guard = self.net_lock.lock().await;
        netconf::configure(&self.netlink, desired).await
    }

    /// The mailbox's split of [`AgentState::configure_network`]: applies what
    /// the new address needs and returns; the caller acks, then runs
    /// [`AgentState::finish_network`] with the report.
    /// `netlink` is the caller's connection (the resume watcher has its own).
    pub async fn configure_network_part(
        &self,
        netlink: &rtnetlink::Handle,
        desired: &NetDesired,
        hint: Option<&LinkHint>,
    ) -> Result<ApplyReport, NetApplyError> {
        let _guard = self.net_lock.lock().await;
        netconf::configure_network_part(netlink, desired, hint).await
    }

    /// Applies the steps [`AgentState::configure_network_part`] deferred.
    pub async fn finish_network(
        &self,
        netlink: &rtnetlink::Handle,
        report: &mut ApplyReport,
    ) -> Result<(), NetApplyError> {
        let _guard = self.net_lock.lock().await;
        netconf::apply_deferred(netlink, report).await
    }

    fn count(&self, method: &str) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        *c.entry(method.to_owned()).or_default() += 1;
    }

    /// Test hook, honoured only when the boot env sets
    /// `FORKVM_AGENT_TEST_HOOKS=1`: while `/run/forkvm-test-hang` exists every
    /// RPC is accepted and never answered (a hung agent, for host tests).
    async fn hang_if_asked(&self) {
        if self.boot_env.get(TEST_HOOKS_ENV).map(String::as_str) != Some("1") {
            return;
        }
        while std::path::Path::new(TEST_HANG_FILE).exists() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Test hook (see [`TEST_CRASH_ON_PAYLOAD_FILE`]): panics the guest
    /// kernel through sysrq. Does nothing unless hooks are enabled.
    pub fn crash_if_asked(&self) {
        if self.boot_env.get(TEST_HOOKS_ENV).map(String::as_str) != Some("1")
            || !std::path::Path::new(TEST_CRASH_ON_PAYLOAD_FILE).exists()
        {
            return;
        }
        tracing::error!("test hook: crashing the guest kernel");
        if let Err(e) = std::fs::write("/proc/sysrq-trigger", b"c") {
            warn!(error = %e, "test hook: sysrq crash failed");
        }
    }

    fn decline_reconfigure(&self) -> bool {
        self.boot_env
            .get(DECLINE_RECONFIGURE_ENV)
            .map(String::as_str)
            == Some("1")
    }

    /// The command of an Exec. With `image_root` it runs chrooted in the
    /// workload's root, which must be the overlay StartWorkload mounted
    /// (FAILED_PRECONDITION otherwise), with the request's env over a
    /// default PATH: the boot env is the agent's, not the image's.
    fn exec_spec(&self, req: ExecRequest) -> Result<ExecSpec, Status> {
        let (chroot, env) = if req.image_root {
            match mounts::image_root_mounted() {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Status::failed_precondition(format!(
                        "no image root is mounted at {} (StartWorkload of an OCI image mounts it)",
                        mounts::ROOT_DIR
                    )));
                }
                Err(e) => return Err(Status::internal(e.to_string())),
            }
            let env = exec::merge_env(&BTreeMap::new(), req.env);
            (Some(mounts::ROOT_DIR.into()), env)
        } else {
            (None, exec::merge_env(&self.boot_env, req.env))
        };
        Ok(ExecSpec {
            argv: req.argv,
            env,
            stdin: req.stdin,
            timeout: (req.timeout_ms > 0).then(|| Duration::from_millis(u64::from(req.timeout_ms))),
            cwd: (!req.cwd.is_empty()).then_some(req.cwd),
            chroot,
        })
    }
}

/// 128 random bits from the kernel, hex; falls back to time+pid if unreadable.
fn new_boot_id() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/random/uuid") {
        Ok(u) => u.trim().replace('-', ""),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            format!("{t:032x}")
        }
    }
}

fn exec_status(e: ExecError) -> Status {
    match &e {
        ExecError::EmptyArgv => Status::invalid_argument(e.to_string()),
        ExecError::Spawn { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => Status::not_found(e.to_string()),
            std::io::ErrorKind::PermissionDenied => Status::permission_denied(e.to_string()),
            std::io::ErrorKind::InvalidInput => Status::invalid_argument(e.to_string()),
            _ => Status::internal(e.to_string()),
        },
        _ => Status::internal(e.to_string()),
    }
}

/// The tonic service implementation.
#[derive(Clone)]
pub struct AgentService {
    state: Arc<AgentState>,
}

impl AgentService {
    pub fn new(state: Arc<AgentState>) -> Self {
        AgentService { state }
    }
}

type ExecStreamOut = Pin<Box<dyn futures::Stream<Item = Result<ExecOutput, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        self.state.count("Health");
        self.state.hang_if_asked().await;
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let rpc_counts = self
            .state
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mb = self
            .state
            .mailbox
            .as_ref()
            .map(|m| m.status())
            .unwrap_or_default();
        Ok(Response::new(HealthResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            boot_id: self.state.boot_id.clone(),
            uptime_ms: u64::try_from(self.state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            hostname,
            rpc_counts,
            mailbox_marker: mb.marker.map(|m| m.0.to_vec()).unwrap_or_default(),
            mailbox_gpa: mb.gpa,
            mailbox_applied_generation: mb.applied_generation,
            mailbox_applied: mb.applied,
            mailbox_rejected: mb.rejected,
            workload: Some(self.state.workload.status()),
        }))
    }

    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        self.state.count("Exec");
        self.state.hang_if_asked().await;
        let spec = self.state.exec_spec(req.into_inner())?;
        let (outcome, out) = exec::run_collect(&self.state.reaper, spec)
            .await
            .map_err(exec_status)?;
        Ok(Response::new(ExecResponse {
            exit_code: outcome.exit.code,
            stdout: out.stdout,
            stderr: out.stderr,
            timed_out: outcome.timed_out,
            signal: outcome.exit.signal,
        }))
    }

    type ExecStreamStream = ExecStreamOut;

    async fn exec_stream(
        &self,
        req: Request<ExecRequest>,
    ) -> Result<Response<Self::ExecStreamStream>, Status> {
        self.state.count("ExecStream");
        self.state.hang_if_asked().await;
        let spec = self.state.exec_spec(req.into_inner())?;
        if spec.argv.is_empty() {
            return Err(exec_status(ExecError::EmptyArgv));
        }
        let (ev_tx, ev_rx) = mpsc::channel::<ExecEvent>(16);
        let state = self.state.clone();
        let run = async move { exec::run(&state.reaper, spec, ev_tx).await };
        Ok(Response::new(output_stream(ev_rx, run)))
    }

    type ExecSessionStream = ExecStreamOut;

    async fn exec_session(
        &self,
        req: Request<Streaming<ExecInput>>,
    ) -> Result<Response<Self::ExecSessionStream>, Status> {
        self.state.count("ExecSession");
        self.state.hang_if_asked().await;
        let mut inbound = req.into_inner();
        let Some(ExecInput {
            kind: Some(exec_input::Kind::Start(start)),
        }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument(
                "the first message must be `start`",
            ));
        };
        let mut spec = self.state.exec_spec(start.request.unwrap_or_default())?;
        if spec.argv.is_empty() {
            return Err(exec_status(ExecError::EmptyArgv));
        }
        spec.stdin.clear();
        let (ev_tx, ev_rx) = mpsc::channel::<ExecEvent>(16);
        let state = self.state.clone();
        if start.tty {
            let size = start
                .size
                .map_or((0, 0), |w| (clamp16(w.rows), clamp16(w.cols)));
            let (in_tx, in_rx) = mpsc::channel(16);
            tokio::spawn(pump_tty_input(inbound, in_tx));
            let run = async move {
                crate::session::run_tty(&state.reaper, spec, size, in_rx, ev_tx).await
            };
            return Ok(Response::new(output_stream(ev_rx, run)));
        }
        let (in_tx, in_rx) = mpsc::channel(16);
        tokio::spawn(pump_stdin(inbound, in_tx));
        let feed = exec::StdinFeed::Channel(in_rx);
        let run = async move { exec::run_fed(&state.reaper, spec, feed, ev_tx).await };
        Ok(Response::new(output_stream(ev_rx, run)))
    }

    async fn stat(&self, req: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        self.state.count("Stat");
        let req = req.into_inner();
        let resp = tokio::task::spawn_blocking(move || {
            let root = files::root(req.image_root)?;
            Ok::<_, files::FileError>(files::stat(&root, &req.path, req.follow_links))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| e.status())?;
        Ok(Response::new(resp))
    }

    async fn copy_in(
        &self,
        req: Request<Streaming<CopyInRequest>>,
    ) -> Result<Response<CopyInResult>, Status> {
        self.state.count("CopyIn");
        let mut inbound = req.into_inner();
        let Some(CopyInRequest {
            kind: Some(copy_in_request::Kind::Start(start)),
        }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument(
                "the first message must be `start`",
            ));
        };
        let image_root = start.image_root;
        let blocking =
            |f: Box<dyn FnOnce() -> Result<files::Incoming, files::FileError> + Send>| async move {
                tokio::task::spawn_blocking(f)
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| e.status())
            };
        let mut file = blocking(Box::new(move || {
            files::begin(&files::root(image_root)?, start)
        }))
        .await?;
        loop {
            match inbound.message().await? {
                Some(CopyInRequest {
                    kind: Some(copy_in_request::Kind::Data(d)),
                }) => {
                    file = blocking(Box::new(move || file.write(&d).map(|()| file))).await?;
                }
                Some(CopyInRequest {
                    kind: Some(copy_in_request::Kind::End(_)),
                }) => break,
                Some(_) => return Err(Status::invalid_argument("unexpected message")),
                None => return Err(Status::cancelled("the copy ended before `end`")),
            }
        }
        let written = tokio::task::spawn_blocking(move || file.finish(&files::root(image_root)?))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| e.status())?;
        Ok(Response::new(CopyInResult {
            bytes_written: written,
        }))
    }

    type CopyOutStream =
        Pin<Box<dyn futures::Stream<Item = Result<CopyOutMessage, Status>> + Send>>;

    async fn copy_out(
        &self,
        req: Request<CopyOutRequest>,
    ) -> Result<Response<Self::CopyOutStream>, Status> {
        self.state.count("CopyOut");
        let req = req.into_inner();
        let root = tokio::task::spawn_blocking(move || files::root(req.image_root))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| e.status())?;
        let (tx, rx) = mpsc::channel(16);
        tokio::task::spawn_blocking(move || {
            files::copy_out(&root, &req.path, req.follow_links, &tx)
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }

    async fn reconfigure_network(
        &self,
        req: Request<NetworkConfig>,
    ) -> Result<Response<ReconfigureResponse>, Status> {
        self.state.count("ReconfigureNetwork");
        self.state.hang_if_asked().await;
        if self.state.decline_reconfigure() {
            return Err(Status::unimplemented(
                "ReconfigureNetwork declined by boot env",
            ));
        }
        let mut cfg = req.into_inner();
        let seed = std::mem::take(&mut cfg.rng_seed);
        let seed: Option<[u8; 32]> = match seed.len() {
            0 => None,
            _ => Some(seed.try_into().map_err(|s: Vec<u8>| {
                Status::invalid_argument(format!("rng_seed is {} bytes, not 32", s.len()))
            })?),
        };
        let desired = NetRequest::from(cfg)
            .validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let report = self
            .state
            .configure_network(&desired)
            .await
            .map_err(|e| match e {
                NetApplyError::NoSuchInterface(_) => Status::not_found(e.to_string()),
                _ => Status::internal(e.to_string()),
            })?;
        info!(steps = ?report.steps, applied_us = report.elapsed_us, "ReconfigureNetwork applied");
        // A new identity: this machine's RNG and machine id diverge too.
        if let Some(mut seed) = seed {
            if let Err(e) = crate::identity::feed_rng(&seed) {
                warn!(error = %e, "feeding the RNG seed to the kernel failed");
            }
            seed.fill(0);
        }
        crate::identity::renew_machine_id();
        Ok(Response::new(ReconfigureResponse {
            applied_us: report.elapsed_us,
        }))
    }

    async fn set_clock(
        &self,
        req: Request<SetClockRequest>,
    ) -> Result<Response<SetClockResponse>, Status> {
        self.state.count("SetClock");
        self.state.hang_if_asked().await;
        let want = req.into_inner().unix_time_ns;
        if want <= 0 {
            return Err(Status::invalid_argument("unix_time_ns must be positive"));
        }
        let before = clock_gettime(ClockId::CLOCK_REALTIME)
            .map_err(|e| Status::internal(format!("clock_gettime: {e}")))?;
        let ts = nix::sys::time::TimeSpec::new(want / 1_000_000_000, want % 1_000_000_000);
        clock_settime(ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| Status::internal(format!("clock_settime: {e}")))?;
        let before_ns = before.tv_sec() as i64 * 1_000_000_000 + before.tv_nsec() as i64;
        let stepped_ns = want - before_ns;
        info!(stepped_ns, "clock stepped");
        Ok(Response::new(SetClockResponse { stepped_ns }))
    }

    async fn start_workload(
        &self,
        req: Request<WorkloadSpec>,
    ) -> Result<Response<WorkloadStatus>, Status> {
        self.state.count("StartWorkload");
        self.state.hang_if_asked().await;
        let spec = req.into_inner();
        match self.state.workload.start(&self.state.reaper, &spec).await {
            Ok(status) => Ok(Response::new(status)),
            Err(e) => Err(Status::new(e.code(), e.to_string())),
        }
    }
}

fn clamp16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// Output events as they come, then the exit (or the error) as the last
/// message. A caller that goes away closes the events channel, which kills
/// the command.
fn output_stream(
    mut ev_rx: mpsc::Receiver<ExecEvent>,
    run: impl Future<Output = Result<exec::ExecOutcome, ExecError>> + Send + 'static,
) -> ExecStreamOut {
    let (tx, rx) = mpsc::channel::<Result<ExecOutput, Status>>(16);
    let fwd_tx = tx.clone();
    let forward = async move {
        while let Some(ev) = ev_rx.recv().await {
            let kind = match ev {
                ExecEvent::Stdout(b) => exec_output::Kind::Stdout(b),
                ExecEvent::Stderr(b) => exec_output::Kind::Stderr(b),
            };
            if fwd_tx
                .send(Ok(ExecOutput { kind: Some(kind) }))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    tokio::spawn(async move {
        let (res, ()) = tokio::join!(run, forward);
        let last = match res {
            Ok(o) => Ok(ExecOutput {
                kind: Some(exec_output::Kind::Exit(ExecExit {
                    exit_code: o.exit.code,
                    timed_out: o.timed_out,
                    signal: o.exit.signal,
                })),
            }),
            Err(e) => Err(exec_status(e)),
        };
        // Receiver gone means the client left; nothing to report to.
        let _ = tx.send(last).await;
    });
    Box::pin(ReceiverStream::new(rx))
}

/// A session's later messages to a piped stdin: chunks, then EOF at
/// `stdin_close` (or when the caller's stream ends).
async fn pump_stdin(mut inbound: Streaming<ExecInput>, tx: mpsc::Sender<Vec<u8>>) {
    while let Ok(Some(msg)) = inbound.message().await {
        let go_on = match msg.kind {
            Some(exec_input::Kind::Stdin(b)) => tx.send(b).await.is_ok(),
            Some(exec_input::Kind::StdinClose(_)) => false,
            _ => true,
        };
        if !go_on {
            return;
        }
    }
}

/// A terminal session's later messages. The end of the caller's stream
/// ends the session (a terminal has no EOF to pass on).
async fn pump_tty_input(
    mut inbound: Streaming<ExecInput>,
    tx: mpsc::Sender<crate::session::TtyInput>,
) {
    use crate::session::TtyInput;
    while let Ok(Some(msg)) = inbound.message().await {
        let input = match msg.kind {
            Some(exec_input::Kind::Stdin(b)) => TtyInput::Stdin(b),
            Some(exec_input::Kind::Resize(w)) => TtyInput::Resize {
                rows: clamp16(w.rows),
                cols: clamp16(w.cols),
            },
            _ => continue,
        };
        if tx.send(input).await.is_err() {
            return;
        }
    }
}

/// Serves the agent on `port` forever: one HTTP/2 connection per host
/// connection, then waits for the next host.
pub async fn serve_port(mut port: Port, service: AgentService) -> std::io::Result<()> {
    let svc = TowerToHyperService::new(AgentServer::new(service));
    loop {
        // A read error on the port must not end the agent (as PID 1 that
        // halts the guest): log it and keep waiting for the next host.
        let conn = match port.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "waiting for a host on the agent port failed; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let t0 = Instant::now();
        info!("host connected; serving");
        let mut io = TokioIo::new(conn);
        let res = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_frame_size(MAX_FRAME_SIZE)
            .serve_connection(&mut io, svc.clone())
            .await;
        match res {
            Ok(()) => info!(secs = t0.elapsed().as_secs_f64(), "host connection closed"),
            Err(e) => info!(error = ?e, secs = t0.elapsed().as_secs_f64(), "host connection ended"),
        }
        port.give_back(io.into_inner());
    }
}
