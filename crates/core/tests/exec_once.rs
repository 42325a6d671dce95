//! An exec whose connection breaks after the request was sent is not sent
//! again: the guest may already have run it. The "agent" is a real tonic
//! server on a unix socket that counts Exec requests; the connection is cut
//! by shutting its runtime down while a request is in flight, and a fresh
//! server takes the socket (so a retry would reach it and count).

use forkvm_core::agent::{AgentError, AgentLinks, CallPolicy, GuestAgent};
use forkvm_proto::agent::agent_server::{Agent, AgentServer};
use forkvm_proto::agent::{
    CopyInRequest, CopyInResult, CopyOutMessage, CopyOutRequest, ExecInput, ExecOutput,
    ExecRequest, ExecResponse, HealthRequest, HealthResponse, NetworkConfig, ReconfigureResponse,
    SetClockRequest, SetClockResponse, StatRequest, StatResponse, WorkloadSpec, WorkloadStatus,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

/// Counts Exec requests; when `hang` is set, tells the test a request
/// arrived and never answers it.
struct Counting {
    runs: Arc<AtomicUsize>,
    arrived: Option<mpsc::UnboundedSender<()>>,
}

fn nope<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not here"))
}

#[tonic::async_trait]
impl Agent for Counting {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse::default()))
    }
    async fn exec(&self, _: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = &self.arrived {
            let _ = tx.send(());
            std::future::pending::<()>().await;
        }
        Ok(Response::new(ExecResponse::default()))
    }
    type ExecStreamStream = ReceiverStream<Result<ExecOutput, Status>>;
    async fn exec_stream(
        &self,
        _: Request<ExecRequest>,
    ) -> Result<Response<Self::ExecStreamStream>, Status> {
        nope()
    }
    type ExecSessionStream = ReceiverStream<Result<ExecOutput, Status>>;
    async fn exec_session(
        &self,
        _: Request<tonic::Streaming<ExecInput>>,
    ) -> Result<Response<Self::ExecSessionStream>, Status> {
        nope()
    }
    async fn stat(&self, _: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        nope()
    }
    async fn copy_in(
        &self,
        _: Request<tonic::Streaming<CopyInRequest>>,
    ) -> Result<Response<CopyInResult>, Status> {
        nope()
    }
    type CopyOutStream = ReceiverStream<Result<CopyOutMessage, Status>>;
    async fn copy_out(
        &self,
        _: Request<CopyOutRequest>,
    ) -> Result<Response<Self::CopyOutStream>, Status> {
        nope()
    }
    async fn reconfigure_network(
        &self,
        _: Request<NetworkConfig>,
    ) -> Result<Response<ReconfigureResponse>, Status> {
        nope()
    }
    async fn set_clock(
        &self,
        _: Request<SetClockRequest>,
    ) -> Result<Response<SetClockResponse>, Status> {
        nope()
    }
    async fn start_workload(
        &self,
        _: Request<WorkloadSpec>,
    ) -> Result<Response<WorkloadStatus>, Status> {
        nope()
    }
}

/// Serves `agent` at `path` on a runtime of its own, until `stop` fires;
/// the runtime is then dropped, which cuts every open connection.
fn serve(path: &Path, agent: Counting) -> oneshot::Sender<()> {
    let _ = std::fs::remove_file(path);
    let (stop, stopped) = oneshot::channel::<()>();
    let (ready, is_ready) = std::sync::mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::bind(&path).expect("bind");
            let _ = ready.send(());
            let server = tonic::transport::Server::builder()
                .add_service(AgentServer::new(agent))
                .serve_with_incoming(UnixListenerStream::new(listener));
            tokio::select! {
                _ = server => {}
                _ = stopped => {}
            }
        });
        rt.shutdown_background();
    });
    let _ = is_ready.recv();
    stop
}

fn socket() -> PathBuf {
    std::env::temp_dir().join(format!("fvt-exec-once-{}.sock", std::process::id()))
}

fn policy() -> CallPolicy {
    CallPolicy::within(Duration::from_secs(20), Duration::from_secs(20))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_cut_off_after_sending_is_not_sent_again() {
    let path = socket();
    let runs = Arc::new(AtomicUsize::new(0));
    let (tx, mut arrived) = mpsc::unbounded_channel();
    let first = serve(
        &path,
        Counting {
            runs: runs.clone(),
            arrived: Some(tx),
        },
    );
    let links = Arc::new(AgentLinks::default());
    let call = {
        let (links, path) = (links.clone(), path.clone());
        tokio::spawn(async move {
            links
                .exec("vm", &path, ExecRequest::default(), policy())
                .await
        })
    };
    arrived.recv().await.expect("the request reached the agent");
    // Cut the connection mid-request; a healthy agent takes the socket over.
    let _ = first.send(());
    let _second = serve(
        &path,
        Counting {
            runs: runs.clone(),
            arrived: None,
        },
    );
    let r = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the call ends")
        .expect("the task ran");
    assert!(
        matches!(r, Err(AgentError::Interrupted { op: "Exec", .. })),
        "{r:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the exec ran exactly once");
    // The link recovers: the next exec reaches the new agent, once.
    links
        .exec("vm", &path, ExecRequest::default(), policy())
        .await
        .expect("a later exec works");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_waits_for_an_agent_that_is_not_up_yet() {
    let path = socket().with_extension("late");
    let _ = std::fs::remove_file(&path);
    let runs = Arc::new(AtomicUsize::new(0));
    let links = AgentLinks::default();
    let late = {
        let (path, runs) = (path.clone(), runs.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            serve(
                &path,
                Counting {
                    runs,
                    arrived: None,
                },
            )
        })
    };
    links
        .exec("vm", &path, ExecRequest::default(), policy())
        .await
        .expect("reaching the agent is retried");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    drop(late);
    let _ = std::fs::remove_file(&path);
}
