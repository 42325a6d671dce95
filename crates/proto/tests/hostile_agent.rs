//! A broken or hostile agent can't make the host allocate without bound or
//! hang: replies over [`MAX_REPLY_BYTES`] fail the call with a clear error,
//! replies under it arrive whole, and bytes that are not HTTP/2 fail the call
//! at once. The "agent" here is a tonic server on a unix socket.

use forkvm_proto::agent::agent_server::{Agent, AgentServer};
use forkvm_proto::agent::{
    ExecOutput, ExecRequest, ExecResponse, HealthRequest, HealthResponse, NetworkConfig,
    ReconfigureResponse, SetClockRequest, SetClockResponse, WorkloadSpec, WorkloadStatus,
};
use forkvm_proto::{MAX_REPLY_BYTES, connect_unix};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

/// Answers every Exec with `reply` bytes of stdout.
struct Bloated {
    reply: usize,
}

#[tonic::async_trait]
impl Agent for Bloated {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse::default()))
    }
    async fn exec(&self, _: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        Ok(Response::new(ExecResponse {
            stdout: vec![b'a'; self.reply],
            ..Default::default()
        }))
    }
    type ExecStreamStream = ReceiverStream<Result<ExecOutput, Status>>;
    async fn exec_stream(
        &self,
        _: Request<ExecRequest>,
    ) -> Result<Response<Self::ExecStreamStream>, Status> {
        Err(Status::unimplemented("not here"))
    }
    type ExecSessionStream = ReceiverStream<Result<ExecOutput, Status>>;
    async fn exec_session(
        &self,
        _: Request<tonic::Streaming<forkvm_proto::agent::ExecInput>>,
    ) -> Result<Response<Self::ExecSessionStream>, Status> {
        Err(Status::unimplemented("not here"))
    }
    async fn stat(
        &self,
        _: Request<forkvm_proto::agent::StatRequest>,
    ) -> Result<Response<forkvm_proto::agent::StatResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
    async fn copy_in(
        &self,
        _: Request<tonic::Streaming<forkvm_proto::agent::CopyInRequest>>,
    ) -> Result<Response<forkvm_proto::agent::CopyInResult>, Status> {
        Err(Status::unimplemented("not here"))
    }
    type CopyOutStream = ReceiverStream<Result<forkvm_proto::agent::CopyOutMessage, Status>>;
    async fn copy_out(
        &self,
        _: Request<forkvm_proto::agent::CopyOutRequest>,
    ) -> Result<Response<Self::CopyOutStream>, Status> {
        Err(Status::unimplemented("not here"))
    }
    async fn reconfigure_network(
        &self,
        _: Request<NetworkConfig>,
    ) -> Result<Response<ReconfigureResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
    async fn set_clock(
        &self,
        _: Request<SetClockRequest>,
    ) -> Result<Response<SetClockResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
    async fn start_workload(
        &self,
        _: Request<WorkloadSpec>,
    ) -> Result<Response<WorkloadStatus>, Status> {
        Err(Status::unimplemented("not here"))
    }
}

fn socket_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("fvt-hostile-{tag}-{}.sock", std::process::id()))
}

async fn serve(reply: usize, tag: &str) -> std::path::PathBuf {
    let path = socket_path(tag);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(Bloated { reply }))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    path
}

async fn exec(path: &std::path::Path) -> Result<ExecResponse, Status> {
    let mut c = connect_unix(path).await.expect("connect");
    tokio::time::timeout(Duration::from_secs(30), c.exec(ExecRequest::default()))
        .await
        .expect("the call must end, not hang")
        .map(Response::into_inner)
}

#[tokio::test]
async fn reply_over_the_limit_fails_the_call_and_one_under_arrives_whole() {
    let over = serve(MAX_REPLY_BYTES + 1, "over").await;
    let err = exec(&over)
        .await
        .expect_err("an oversized reply was accepted");
    assert!(err.message().contains("too large"), "{err:?}");

    let under = serve(MAX_REPLY_BYTES - (1 << 20), "under").await;
    let ok = exec(&under).await.expect("a reply under the limit failed");
    assert_eq!(ok.stdout.len(), MAX_REPLY_BYTES - (1 << 20));
    for p in [over, under] {
        let _ = std::fs::remove_file(p);
    }
}

#[tokio::test]
async fn garbage_instead_of_http2_fails_the_call_at_once() {
    let path = socket_path("garbage");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Not a SETTINGS frame: a frame header claiming 16 MiB.
                let _ = s.write_all(&[0xff; 64 << 10]).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = connect_unix(&path).await.map_err(|e| e.to_string())?;
        c.exec(ExecRequest::default())
            .await
            .map_err(|s| s.to_string())
    })
    .await
    .expect("a garbage-speaking agent hung the call");
    assert!(r.is_err(), "garbage produced a reply: {r:?}");
    let _ = std::fs::remove_file(path);
}
