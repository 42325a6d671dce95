//! A Running guest's files for API callers: `stat` and `cp` in both
//! directions (hypeman's `/instances/{id}/stat` and `/cp`), through the
//! agent's `Stat`, `CopyIn` and `CopyOut`. In an OCI image's instance paths
//! are the image's (resolved inside its root, as the workload sees them).
//! Copies take one of the instance's exec slots while they run and are
//! never re-sent.

use crate::agent::{CallPolicy, CopyOutStream};
use crate::error::{CoreError, Result};
use crate::guest::{OwnedExecSlot, require_running};
use crate::model::Instance;
use crate::services::Services;
use forkvm_proto::agent as pb;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const CONNECT: Duration = Duration::from_secs(10);

/// What is at a guest path.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PathInfo {
    pub exists: bool,
    pub is_dir: bool,
    pub is_file: bool,
    pub is_symlink: bool,
    pub link_target: Option<String>,
    pub mode: u32,
    pub size: u64,
    /// Why it could not be looked at (`exists` is then false).
    pub error: Option<String>,
}

/// One file or directory to write into the guest.
#[derive(Clone, Debug, Default)]
pub struct CopyInStart {
    pub path: String,
    /// 0: 0644 for files, 0755 for directories.
    pub mode: u32,
    pub is_dir: bool,
    pub owner: Option<(u32, u32)>,
    pub mtime: Option<i64>,
}

/// An entry of a copy out of the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyOutItem {
    Header(pb::FileHeader),
    Data(Vec<u8>),
    End { last: bool },
    Error { message: String, path: String },
}

fn running(svc: &Services, id_or_name: &str) -> Result<Instance> {
    let inst = svc.find(id_or_name)?;
    require_running(&inst, "its files are reachable while it runs")?;
    Ok(inst)
}

fn checked(path: &str) -> Result<()> {
    if path.is_empty() || path.contains('\0') || path.len() > 4096 {
        return Err(CoreError::Invalid(format!("bad guest path {path:?}")));
    }
    Ok(())
}

pub(crate) async fn stat(
    svc: &Services,
    id_or_name: &str,
    path: &str,
    follow_links: bool,
) -> Result<PathInfo> {
    checked(path)?;
    let inst = running(svc, id_or_name)?;
    let r = svc
        .agent
        .stat(
            &inst.id,
            &svc.paths(&inst).agent_socket,
            pb::StatRequest {
                path: path.to_string(),
                follow_links,
                image_root: inst.workload.is_some(),
            },
            CallPolicy::within(Duration::from_secs(10), Duration::from_secs(5)),
        )
        .await?;
    Ok(PathInfo {
        exists: r.exists,
        is_dir: r.is_dir,
        is_file: r.is_file,
        is_symlink: r.is_symlink,
        link_target: r.is_symlink.then_some(r.link_target),
        mode: r.mode,
        size: r.size,
        error: (!r.error.is_empty()).then_some(r.error),
    })
}

/// A file being written into the guest.
pub struct CopyIn {
    tx: mpsc::Sender<pb::CopyInRequest>,
    call: tokio::task::JoinHandle<std::result::Result<pb::CopyInResult, crate::agent::AgentError>>,
    _slot: OwnedExecSlot,
}

impl CopyIn {
    /// False once the agent stopped listening (`finish` says why).
    pub async fn data(&mut self, bytes: Vec<u8>) -> bool {
        let msg = pb::CopyInRequest {
            kind: Some(pb::copy_in_request::Kind::Data(bytes)),
        };
        self.tx.send(msg).await.is_ok()
    }

    /// Ends the file; the bytes the guest wrote.
    pub async fn finish(self) -> Result<u64> {
        let end = pb::CopyInRequest {
            kind: Some(pb::copy_in_request::Kind::End(true)),
        };
        let _ = self.tx.send(end).await;
        drop(self.tx);
        let r = self
            .call
            .await
            .map_err(|e| CoreError::Internal(format!("copy task: {e}")))??;
        Ok(r.bytes_written)
    }
}

pub(crate) async fn copy_in(
    svc: &Arc<Services>,
    id_or_name: &str,
    start: CopyInStart,
) -> Result<CopyIn> {
    checked(&start.path)?;
    let inst = running(svc, id_or_name)?;
    let slot = OwnedExecSlot::claim(svc, &inst)?;
    let (tx, rx) = mpsc::channel(8);
    let (uid, gid) = start.owner.unwrap_or_default();
    let first = pb::CopyInRequest {
        kind: Some(pb::copy_in_request::Kind::Start(pb::CopyInStart {
            path: start.path,
            mode: start.mode,
            is_dir: start.is_dir,
            image_root: inst.workload.is_some(),
            set_owner: start.owner.is_some(),
            uid,
            gid,
            mtime: start.mtime.unwrap_or(0),
        })),
    };
    // Room for it: this cannot fail.
    let _ = tx.try_send(first);
    let agent = svc.agent.clone();
    let socket = svc.paths(&inst).agent_socket;
    let id = inst.id.clone();
    let call = tokio::spawn(async move { agent.copy_in(&id, &socket, rx, CONNECT).await });
    Ok(CopyIn {
        tx,
        call,
        _slot: slot,
    })
}

/// A file or tree coming out of the guest.
pub struct CopyOut {
    stream: CopyOutStream,
    _slot: OwnedExecSlot,
}

impl CopyOut {
    pub async fn next(&mut self) -> Option<Result<CopyOutItem>> {
        use pb::copy_out_message::Kind;
        let msg = match self.stream.next().await? {
            Ok(m) => m,
            Err(e) => return Some(Err(e.into())),
        };
        Some(Ok(match msg.kind? {
            Kind::Header(h) => CopyOutItem::Header(h),
            Kind::Data(d) => CopyOutItem::Data(d),
            Kind::End(e) => CopyOutItem::End { last: e.r#final },
            Kind::Error(e) => CopyOutItem::Error {
                message: e.message,
                path: e.path,
            },
        }))
    }
}

pub(crate) async fn copy_out(
    svc: &Arc<Services>,
    id_or_name: &str,
    path: &str,
    follow_links: bool,
) -> Result<CopyOut> {
    checked(path)?;
    let inst = running(svc, id_or_name)?;
    let slot = OwnedExecSlot::claim(svc, &inst)?;
    let req = pb::CopyOutRequest {
        path: path.to_string(),
        follow_links,
        image_root: inst.workload.is_some(),
    };
    let stream = svc
        .agent
        .copy_out(&inst.id, &svc.paths(&inst).agent_socket, req, CONNECT)
        .await?;
    Ok(CopyOut {
        stream,
        _slot: slot,
    })
}
