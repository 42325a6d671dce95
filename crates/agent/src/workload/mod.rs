//! The OCI image's workload (StartWorkload, docs/guest-workload.md): mount
//! the image's root from the host's disks ([`mounts`]), resolve the user
//! ([`user`]), and spawn the command chrooted into that root with its env,
//! working directory and identity, stdout and stderr on the console.
//!
//! At most one workload per boot: a repeated start with the same spec returns
//! the current status, a different spec is refused, and a workload that
//! exited is logged and never restarted. The state lives in the agent's
//! memory, so a resumed fork reports its source's workload (the same pid,
//! which the fork's own copy of the process carries on as).

pub mod mounts;
pub mod resolv;
pub mod user;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use forkvm_proto::agent::{WorkloadSpec, WorkloadStatus, workload_status::State};
use forkvm_proto::workload::validate;
use forkvm_proto::{SpecError, ValidSpec};
use nix::errno::Errno;
use nix::unistd::{Gid, Uid};
use tracing::{error, info, warn};

use crate::exec::{Reaper, merge_env};
use user::{Ids, UserError};

/// Why a workload could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("invalid workload spec: {0}")]
    Spec(#[from] SpecError),
    #[error("a different workload was already started (pid {pid}); it is never replaced")]
    DifferentSpec { pid: u32 },
    #[error("no disk with serial {serial} in /sys/block after {waited_ms} ms")]
    NoDisk {
        serial: &'static str,
        waited_ms: u64,
    },
    #[error("mounting {what} on {target}: {errno}")]
    Mount {
        what: String,
        target: String,
        errno: Errno,
    },
    #[error("{path} is a symbolic link; refusing to mount over it")]
    Symlink { path: String },
    #[error("{path} exists and is not a directory")]
    NotADirectory { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    User(#[from] UserError),
    #[error("only root can run a workload as another user (agent uid {agent_uid})")]
    NotRoot { agent_uid: u32 },
    #[error("starting {program} (root {root}, working dir {working_dir}): {source}")]
    Spawn {
        program: String,
        root: String,
        working_dir: String,
        #[source]
        source: io::Error,
    },
    #[error("preparing the workload root: {0}")]
    Internal(String),
}

impl WorkloadError {
    /// The gRPC code a host sees for this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            WorkloadError::Spec(_) => Code::InvalidArgument,
            WorkloadError::DifferentSpec { .. } => Code::FailedPrecondition,
            WorkloadError::NoDisk { .. } => Code::FailedPrecondition,
            WorkloadError::Mount { errno, .. } if mounts::is_missing_fs(*errno) => {
                Code::FailedPrecondition
            }
            WorkloadError::User(UserError::UnknownUser(_) | UserError::UnknownGroup(_)) => {
                Code::InvalidArgument
            }
            WorkloadError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                Code::NotFound
            }
            WorkloadError::NotRoot { .. } => Code::PermissionDenied,
            _ => Code::Internal,
        }
    }
}

/// What was started and how it is doing.
#[derive(Default)]
struct Slot {
    /// The spec of the started workload (set once spawned).
    spec: Option<ValidSpec>,
    status: WorkloadStatus,
}

/// The agent's one workload.
#[derive(Default)]
pub struct Workload {
    /// Serialises starts (mounting and spawning), held across awaits.
    start: tokio::sync::Mutex<()>,
    slot: Arc<Mutex<Slot>>,
}

impl Workload {
    /// The current status (state NONE before any start).
    pub fn status(&self) -> WorkloadStatus {
        self.lock().status.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// StartWorkload: validates `spec`, and unless a workload was already
    /// started, mounts the root, spawns the command and watches for its exit.
    /// Must run on the runtime thread (spawning, see exec.rs).
    pub async fn start(
        &self,
        reaper: &Reaper,
        spec: &WorkloadSpec,
    ) -> Result<WorkloadStatus, WorkloadError> {
        let valid = validate(spec)?;
        let _serial = self.start.lock().await;
        {
            let slot = self.lock();
            if let Some(prev) = &slot.spec {
                if *prev == valid {
                    return Ok(slot.status.clone());
                }
                return Err(WorkloadError::DifferentSpec {
                    pid: slot.status.pid,
                });
            }
        }
        match self.mount_and_spawn(reaper, &valid).await {
            Ok(status) => Ok(status),
            Err(e) => {
                error!(error = %e, "workload failed to start");
                let mut slot = self.lock();
                slot.status = WorkloadStatus {
                    state: State::Failed as i32,
                    error: e.to_string(),
                    ..Default::default()
                };
                Err(e)
            }
        }
    }

    async fn mount_and_spawn(
        &self,
        reaper: &Reaper,
        valid: &ValidSpec,
    ) -> Result<WorkloadStatus, WorkloadError> {
        let host_root = valid.host_root;
        let user = valid.user.clone();
        let (root, ids) = tokio::task::spawn_blocking(move || {
            let root = if host_root {
                None
            } else {
                let root = mounts::prepare_root()?;
                // The guest's name servers inside the image too; a failure
                // leaves the image's own (logged, not fatal).
                if let Err(e) = resolv::copy_into(&root) {
                    warn!(error = %e, "writing the image root's resolv.conf failed");
                }
                crate::identity::fresh_machine_id_in(&root);
                Some(root)
            };
            let ids = user::resolve(&user, root.as_deref().unwrap_or(Path::new("/")))?;
            Ok::<_, WorkloadError>((root, ids))
        })
        .await
        .map_err(|e| WorkloadError::Internal(e.to_string()))??;

        let mut cmd = command(valid, root.as_deref(), ids)?;
        let spawn_err = |source| WorkloadError::Spawn {
            program: valid.argv[0].clone(),
            root: root
                .as_deref()
                .map_or("/".into(), |r| r.display().to_string()),
            working_dir: valid.working_dir.clone(),
            source,
        };
        let (child, exit) = reaper.spawn(&mut cmd).map_err(spawn_err)?;
        let pid = child.id();
        info!(pid, argv = ?valid.argv, uid = ids.uid, gid = ids.gid,
            root = ?root, "workload started");
        let status = WorkloadStatus {
            state: State::Running as i32,
            pid,
            uid: ids.uid,
            gid: ids.gid,
            started: true,
            ..Default::default()
        };
        {
            let mut slot = self.lock();
            slot.spec = Some(valid.clone());
            slot.status = status.clone();
        }
        let watched = self.slot.clone();
        tokio::spawn(async move {
            let Ok(e) = exit.await else {
                warn!(pid, "workload exit status lost");
                return;
            };
            info!(
                pid,
                code = e.code,
                signal = e.signal,
                "workload exited; not restarted"
            );
            let mut slot = watched.lock().unwrap_or_else(PoisonError::into_inner);
            slot.status.state = State::Exited as i32;
            slot.status.exit_code = e.code;
            slot.status.signal = e.signal;
        });
        Ok(status)
    }
}

/// The environment the workload gets: exactly the spec's, plus a default
/// PATH when it has none.
fn workload_env(valid: &ValidSpec) -> BTreeMap<String, String> {
    merge_env(&BTreeMap::new(), valid.env.iter().cloned())
}

/// The command: argv[0] looked up (execvp) in the env's PATH after the
/// chroot, so inside the image; stdin empty, stdout and stderr the agent's
/// (the console); its own process group.
fn command(valid: &ValidSpec, root: Option<&Path>, ids: Ids) -> Result<Command, WorkloadError> {
    let is_root = Uid::effective().is_root();
    if !is_root && (Uid::effective().as_raw(), Gid::effective().as_raw()) != (ids.uid, ids.gid) {
        return Err(WorkloadError::NotRoot {
            agent_uid: Uid::effective().as_raw(),
        });
    }
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| WorkloadError::Io {
            path: p.display().to_string(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })
    };
    let root_c = root.map(cstr).transpose()?;
    let wd_c = cstr(&PathBuf::from(&valid.working_dir))?;
    let mut cmd = Command::new(&valid.argv[0]);
    cmd.args(&valid.argv[1..])
        .env_clear()
        .envs(workload_env(valid))
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0);
    let (uid, gid) = (Uid::from_raw(ids.uid), Gid::from_raw(ids.gid));
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe system calls (chroot, chdir, setgroups, setgid,
    // setuid) on values prepared before the fork; it allocates nothing
    // (`&CStr` paths are passed as they are).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(r) = &root_c {
                nix::unistd::chroot(r.as_c_str())?;
            }
            nix::unistd::chdir(wd_c.as_c_str())?;
            if is_root {
                nix::unistd::setgroups(&[gid])?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
            }
            Ok(())
        });
    }
    Ok(cmd)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn env_is_the_specs_with_a_default_path() {
        let spec = WorkloadSpec {
            argv: vec!["app".into()],
            env: vec!["A=1".into()],
            ..Default::default()
        };
        let env = workload_env(&validate(&spec).unwrap());
        assert_eq!(env.len(), 2, "{env:?}");
        assert_eq!(env["A"], "1");
        assert!(env["PATH"].contains("/usr/bin"));
        let spec = WorkloadSpec {
            argv: vec!["app".into()],
            env: vec!["PATH=/opt/bin".into()],
            ..Default::default()
        };
        assert_eq!(workload_env(&validate(&spec).unwrap())["PATH"], "/opt/bin");
    }

    #[test]
    fn error_codes() {
        use tonic::Code;
        let spec = WorkloadError::Spec(SpecError::EmptyArgv);
        assert_eq!(spec.code(), Code::InvalidArgument);
        let nf = WorkloadError::Spawn {
            program: "x".into(),
            root: "/".into(),
            working_dir: "/".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(nf.code(), Code::NotFound);
        assert_eq!(
            WorkloadError::DifferentSpec { pid: 1 }.code(),
            Code::FailedPrecondition
        );
    }

    /// Runs a workload in the agent's own root (host_root) as the test's
    /// user: started once, the repeat returns the same pid, a different spec
    /// is refused, and the exit is recorded. Called from exec.rs's
    /// `exec_end_to_end`, which owns the test process's one reaper.
    pub(crate) async fn host_root_workload_starts_once(reaper: &Reaper) {
        let w = Workload::default();
        let me = format!("{}:{}", Uid::effective(), Gid::effective());
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let spec = WorkloadSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!("echo $X > {}", marker.display()),
            ],
            env: vec!["X=hello".into()],
            user: me,
            host_root: true,
            ..Default::default()
        };
        let st = w.start(reaper, &spec).await.unwrap();
        assert_eq!(st.state, State::Running as i32);
        assert!(st.started && st.pid > 0);
        let again = w.start(reaper, &spec).await.unwrap();
        assert_eq!(again.pid, st.pid);
        let mut other = spec.clone();
        other.argv[2] = "true".into();
        let e = w.start(reaper, &other).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while w.status().state != State::Exited as i32 {
            assert!(std::time::Instant::now() < deadline, "{:?}", w.status());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(w.status().exit_code, 0);
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "hello\n");
        // Exited is final: the same spec still answers without a restart.
        assert_eq!(w.start(reaper, &spec).await.unwrap().pid, st.pid);

        let bad = WorkloadSpec::default();
        let e = w.start(reaper, &bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
