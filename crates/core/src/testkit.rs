//! In-memory fakes of the outside world for orchestration tests: a
//! hypervisor whose "VMs" are records over real memory files, a host network
//! that only remembers ports, and an agent whose answers a test chooses.
//! They prove the core's logic (ordering, cleanup, fallbacks, adoption);
//! the end-to-end tests with real QEMU remain the proof that features work.

use crate::agent::{AgentError, AgentFuture, CallPolicy, GuestAgent};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::error::{CoreError, Result};
use crate::manager::{Deps, Manager};
use crate::model::{CreateRequest, Instance, InstanceState};
use crate::netalloc::{HostNetwork, NetFuture};
use forkvm_mailbox::MacAddr;
use forkvm_proto::agent as pb;
use forkvm_vmm::{
    Accel, Hypervisor, MigrationReport, RunState, VmHandle, VmSpec, VmmError, VmmFuture,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Hypervisor operations a test can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum HvOp {
    Start,
    Pause,
    Resume,
    Save,
    Load,
    Migrate,
}

/// What the fake guest of a VM restored from a snapshot (a fork, a
/// restore) does when its vCPUs continue.
pub(crate) type OnResume = Arc<dyn Fn(&FakeVm) + Send + Sync>;

#[derive(Clone, Debug)]
pub(crate) struct FakeVm {
    pub id: String,
    pub spec: VmSpec,
    pub state: RunState,
    /// Pages this VM wrote into a `share=off` mapping: its own, never the
    /// file's (offset → bytes written there).
    pub private: BTreeMap<u64, Vec<u8>>,
}

impl FakeVm {
    /// `len` bytes of RAM at `offset` as this VM sees them.
    pub fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let f = std::fs::File::open(&self.spec.mem_path)?;
        let size = f.metadata()?.len();
        let avail = size.saturating_sub(offset).min(len as u64) as usize;
        f.read_exact_at(&mut buf[..avail], offset)?;
        for (at, bytes) in &self.private {
            for (i, b) in bytes.iter().enumerate() {
                let p = at + i as u64;
                if p >= offset && p < offset + len as u64 {
                    buf[(p - offset) as usize] = *b;
                }
            }
        }
        Ok(buf)
    }
}

#[derive(Default)]
struct HvState {
    next_pid: u32,
    vms: HashMap<u32, FakeVm>,
    /// Op → how many more calls fail (`u32::MAX`: all).
    failing: HashMap<HvOp, u32>,
    starts: u32,
}

#[derive(Default)]
pub(crate) struct FakeHypervisor {
    state: Mutex<HvState>,
    on_resume: Mutex<Option<OnResume>>,
}

fn vmm_err(what: &str) -> VmmError {
    VmmError::InvalidSpec(format!("injected failure: {what}"))
}

impl FakeHypervisor {
    fn st(&self) -> std::sync::MutexGuard<'_, HvState> {
        self.state.lock().unwrap()
    }

    /// Every later call of `op` fails.
    pub fn fail(&self, op: HvOp) {
        self.st().failing.insert(op, u32::MAX);
    }

    /// The next `n` calls of `op` fail.
    pub fn fail_next(&self, op: HvOp, n: u32) {
        self.st().failing.insert(op, n);
    }

    pub fn heal(&self) {
        self.st().failing.clear();
    }

    fn check(&self, op: HvOp) -> std::result::Result<(), VmmError> {
        let mut st = self.st();
        match st.failing.get_mut(&op) {
            Some(0) | None => Ok(()),
            Some(n) => {
                if *n != u32::MAX {
                    *n -= 1;
                }
                Err(vmm_err(&format!("{op:?}")))
            }
        }
    }

    pub fn on_resume(&self, f: OnResume) {
        *self.on_resume.lock().unwrap() = Some(f);
    }

    /// The live VMs, by instance id.
    pub fn live(&self) -> BTreeMap<String, FakeVm> {
        self.st()
            .vms
            .values()
            .map(|v| (v.id.clone(), v.clone()))
            .collect()
    }

    /// The run state of VMM `pid`, if it lives.
    pub fn state_of(&self, pid: u32) -> Option<RunState> {
        self.st().vms.get(&pid).map(|v| v.state.clone())
    }

    /// The pids of the live VMs (two may run one instance during a switch).
    pub fn live_pids(&self) -> Vec<u32> {
        self.st().vms.keys().copied().collect()
    }

    pub fn starts(&self) -> u32 {
        self.st().starts
    }

    /// The VM dies on its own (guest power-off, QEMU crash).
    pub fn kill(&self, id: &str) {
        self.st().vms.retain(|_, v| v.id != id);
    }

    /// Writes into VM `id`'s RAM as its guest would: into its private
    /// pages when it maps its file copy-on-write.
    pub fn poke(&self, id: &str, offset: u64, data: &[u8]) {
        let mut st = self.st();
        let vm = st.vms.values_mut().find(|v| v.id == id).expect("live VM");
        if vm.spec.mem_share {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&vm.spec.mem_path)
                .unwrap();
            f.write_all_at(data, offset).unwrap();
        } else {
            vm.private.insert(offset, data.to_vec());
        }
    }

    pub fn set_state(&self, id: &str, state: RunState) {
        for v in self.st().vms.values_mut().filter(|v| v.id == id) {
            v.state = state.clone();
        }
    }

    /// A live VM over a blank memory file of `size` bytes in `dir`.
    pub fn blank_vm(&self, dir: &Path, size: u64) -> VmHandle {
        let mem = dir.join("blank.mem");
        std::fs::File::create(&mem).unwrap().set_len(size).unwrap();
        let spec = VmSpec {
            id: "blank".into(),
            vcpus: 1,
            memory_mb: 1,
            kernel: dir.join("k"),
            initrd: dir.join("i"),
            cmdline: String::new(),
            mem_path: mem,
            mem_share: true,
            net: None,
            agent_socket: dir.join("agent.sock"),
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            pidfile: dir.join("pid"),
            accel: Accel::Tcg,
            incoming: false,
        };
        let mut st = self.st();
        st.next_pid += 1;
        let pid = 50_000 + st.next_pid;
        let vm = FakeVm {
            id: spec.id.clone(),
            spec: spec.clone(),
            state: RunState::Running,
            private: BTreeMap::new(),
        };
        st.vms.insert(pid, vm);
        VmHandle::for_spec(&spec, pid)
    }

    fn vm(&self, pid: u32) -> std::result::Result<FakeVm, VmmError> {
        self.st()
            .vms
            .get(&pid)
            .cloned()
            .ok_or(VmmError::NotRunning {
                id: "?".into(),
                pid,
            })
    }

    fn set(&self, pid: u32, state: RunState) -> std::result::Result<(), VmmError> {
        let mut st = self.st();
        let vm = st.vms.get_mut(&pid).ok_or(VmmError::NotRunning {
            id: "?".into(),
            pid,
        })?;
        vm.state = state;
        Ok(())
    }

    fn start_sync(&self, spec: &VmSpec) -> std::result::Result<VmHandle, VmmError> {
        self.check(HvOp::Start)?;
        if !spec.mem_share && !spec.mem_path.exists() {
            // As QEMU's backend: share=off maps an existing base.
            return Err(vmm_err("share=off needs an existing base"));
        }
        if spec.mem_share && !spec.mem_path.exists() {
            let f = std::fs::File::create(&spec.mem_path).map_err(|e| vmm_err(&e.to_string()))?;
            f.set_len(u64::from(spec.memory_mb) << 20)
                .map_err(|e| vmm_err(&e.to_string()))?;
        }
        let mut st = self.st();
        st.next_pid += 1;
        st.starts += 1;
        let pid = 10_000 + st.next_pid;
        std::fs::write(&spec.pidfile, pid.to_string()).map_err(|e| vmm_err(&e.to_string()))?;
        let state = if spec.incoming {
            RunState::InMigrate
        } else {
            RunState::Running
        };
        st.vms.insert(
            pid,
            FakeVm {
                id: spec.id.clone(),
                spec: spec.clone(),
                state,
                private: BTreeMap::new(),
            },
        );
        Ok(VmHandle::for_spec(spec, pid))
    }
}

impl Hypervisor for FakeHypervisor {
    fn start<'a>(&'a self, spec: &'a VmSpec) -> VmmFuture<'a, VmHandle> {
        Box::pin(async move { self.start_sync(spec) })
    }

    fn stop<'a>(&'a self, h: &'a VmHandle, _grace: Duration) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.st().vms.remove(&h.pid);
            for p in [&h.pidfile, &h.qmp_socket, &h.agent_socket] {
                let _ = std::fs::remove_file(p);
            }
            Ok(())
        })
    }

    fn is_alive(&self, id: &str, pid: u32) -> bool {
        self.st().vms.get(&pid).is_some_and(|v| v.id == id)
    }

    fn adopt(&self, _spec: &VmSpec) -> Option<VmHandle> {
        None
    }

    fn pause<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.check(HvOp::Pause)?;
            self.set(h.pid, RunState::Paused)
        })
    }

    fn resume<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.check(HvOp::Resume)?;
            self.set(h.pid, RunState::Running)?;
            let hook = self.on_resume.lock().unwrap().clone();
            let vm = self.vm(h.pid)?;
            if let Some(f) = hook.filter(|_| vm.spec.incoming) {
                f(&vm);
            }
            Ok(())
        })
    }

    fn status<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, RunState> {
        Box::pin(async move { Ok(self.vm(h.pid)?.state) })
    }

    fn save_state<'a>(&'a self, h: &'a VmHandle, state_file: &'a Path) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.check(HvOp::Save)?;
            let vm = self.vm(h.pid)?;
            std::fs::write(state_file, format!("device state of {}", vm.id))
                .map_err(|e| vmm_err(&e.to_string()))?;
            self.set(h.pid, RunState::PostMigrate)
        })
    }

    fn load_state<'a>(&'a self, h: &'a VmHandle, state_file: &'a Path) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.check(HvOp::Load)?;
            if !state_file.exists() {
                return Err(vmm_err("no state file"));
            }
            self.set(h.pid, RunState::Paused)
        })
    }

    fn ram_offset(&self, memory_mb: u32, gpa: u64) -> Option<u64> {
        (gpa < u64::from(memory_mb) << 20).then_some(gpa)
    }

    fn read_ram<'a>(&'a self, h: &'a VmHandle, offset: u64, len: usize) -> VmmFuture<'a, Vec<u8>> {
        Box::pin(async move {
            self.vm(h.pid)?
                .read(offset, len)
                .map_err(|e| vmm_err(&e.to_string()))
        })
    }

    fn write_ram<'a>(&'a self, h: &'a VmHandle, offset: u64, data: &'a [u8]) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            let vm = self.vm(h.pid)?;
            if vm.spec.mem_share {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&vm.spec.mem_path)
                    .map_err(|e| vmm_err(&e.to_string()))?;
                return f
                    .write_all_at(data, offset)
                    .map_err(|e| vmm_err(&e.to_string()));
            }
            let mut st = self.st();
            if let Some(v) = st.vms.get_mut(&h.pid) {
                v.private.insert(offset, data.to_vec());
            }
            Ok(())
        })
    }

    fn migrate<'a>(
        &'a self,
        from: &'a VmHandle,
        to: &'a VmHandle,
    ) -> VmmFuture<'a, MigrationReport> {
        Box::pin(async move {
            self.check(HvOp::Migrate)?;
            let src = self.vm(from.pid)?;
            let dst = self.vm(to.pid)?;
            // All of the source's RAM: its file, then its private pages.
            crate::memory::sparse_copy(&src.spec.mem_path, &dst.spec.mem_path)
                .map_err(|e| vmm_err(&e.to_string()))?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&dst.spec.mem_path)
                .map_err(|e| vmm_err(&e.to_string()))?;
            for (at, bytes) in &src.private {
                f.write_all_at(bytes, *at)
                    .map_err(|e| vmm_err(&e.to_string()))?;
            }
            self.set(from.pid, RunState::PostMigrate)?;
            self.set(to.pid, RunState::Paused)?;
            Ok(MigrationReport::default())
        })
    }
}

/// Bridge ports only remembered.
#[derive(Default)]
pub(crate) struct FakeHostNet {
    ports: Mutex<HashSet<String>>,
    fail_add: Mutex<bool>,
}

impl FakeHostNet {
    pub fn ports(&self) -> HashSet<String> {
        self.ports.lock().unwrap().clone()
    }

    pub fn fail_add(&self, on: bool) {
        *self.fail_add.lock().unwrap() = on;
    }

    pub fn add_stray(&self, tap: &str) {
        self.ports.lock().unwrap().insert(tap.to_string());
    }
}

impl HostNetwork for FakeHostNet {
    fn ensure_bridge(&self) -> NetFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn add_port<'a>(&'a self, tap: &'a str, _mac: MacAddr, _ip: Ipv4Addr) -> NetFuture<'a, ()> {
        Box::pin(async move {
            if *self.fail_add.lock().unwrap() {
                return Err(CoreError::Internal(format!("injected: creating TAP {tap}")));
            }
            self.ports.lock().unwrap().insert(tap.to_string());
            Ok(())
        })
    }

    fn delete_port<'a>(&'a self, tap: &'a str) -> NetFuture<'a, ()> {
        Box::pin(async move {
            self.ports.lock().unwrap().remove(tap);
            Ok(())
        })
    }

    fn ports(&self) -> NetFuture<'_, Vec<String>> {
        Box::pin(async move { Ok(self.ports().into_iter().collect()) })
    }
}

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
        _req: pb::ExecRequest,
        policy: CallPolicy,
    ) -> AgentFuture<'a, pb::ExecResponse> {
        let a = self.answer("Exec", id, |s| s.exec.clone());
        let resp = pb::ExecResponse {
            exit_code: self.st().exec_exit,
            stderr: b"fake stderr".to_vec(),
            ..Default::default()
        };
        Box::pin(respond("Exec", a, policy, resp))
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

    fn forget(&self, _id: &str) {}
}

/// A manager over fakes and temporary directories.
pub(crate) struct World {
    pub mgr: Arc<Manager>,
    pub hv: Arc<FakeHypervisor>,
    pub net: Arc<FakeHostNet>,
    pub agent: Arc<FakeAgent>,
    pub cfg: Config,
    /// Holds the world's directories until it is dropped.
    _dir: tempfile::TempDir,
}

fn write_default_image(data_dir: &Path) {
    let dir = data_dir.join("images").join("default");
    std::fs::create_dir_all(&dir).unwrap();
    let img = forkvm_image::GuestImage {
        name: "default".into(),
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initrd.cpio"),
        kernel_version: "6.1.0-fake".into(),
        modules: vec![],
        built_at: chrono::Utc::now(),
        inputs_digest: "0".repeat(64),
        kernel_package: "linux-image-fake".into(),
        kernel_package_version: "1".into(),
    };
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&img).unwrap()).unwrap();
}

impl World {
    pub async fn new() -> World {
        Self::with(|_| {}).await
    }

    /// A world whose configuration `tweak` adjusts first.
    pub async fn with(tweak: impl FnOnce(&mut Config)) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::new(
            dir.path().join("data"),
            dir.path().join("mem"),
            "fakebr0",
            "10.99.0.0/24",
            "/nonexistent/qemu",
        );
        cfg.memory_budget_mb = Some(64 * 1024);
        // Deterministic tests: promotion is asked for explicitly.
        cfg.promote_after_handover = false;
        cfg.handoff_timeout = Duration::from_millis(1500);
        cfg.mailbox_ack_timeout = Duration::from_millis(300);
        // The gateway address exists in no namespace of a unit test.
        cfg.test_hooks.ack_bind_addr = Some(Ipv4Addr::LOCALHOST);
        tweak(&mut cfg);
        write_default_image(&cfg.data_dir);
        let (hv, net, agent) = (
            Arc::new(FakeHypervisor::default()),
            Arc::new(FakeHostNet::default()),
            Arc::new(FakeAgent::default()),
        );
        let mgr = Self::open(&cfg, &hv, &net, &agent).await.unwrap();
        World {
            mgr,
            hv,
            net,
            agent,
            cfg,
            _dir: dir,
        }
    }

    async fn open(
        cfg: &Config,
        hv: &Arc<FakeHypervisor>,
        net: &Arc<FakeHostNet>,
        agent: &Arc<FakeAgent>,
    ) -> Result<Arc<Manager>> {
        let deps = Deps {
            hv: hv.clone(),
            host_net: net.clone(),
            agent: agent.clone(),
            clock: Arc::new(SystemClock),
            accel: Accel::Tcg,
        };
        Manager::open_with(cfg.clone(), deps).await
    }

    /// A second manager on the same state and the same outside world, as
    /// after a daemon restart (adoption runs).
    pub async fn restart(&mut self) {
        self.mgr = Self::open(&self.cfg, &self.hv, &self.net, &self.agent)
            .await
            .unwrap();
    }

    pub async fn running(&self, name: &str) -> Instance {
        let i = self
            .mgr
            .create(CreateRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(i.state, InstanceState::Running);
        i
    }

    pub fn mem_file(&self, id: &str) -> PathBuf {
        self.cfg.mem_dir.join(format!("{id}.mem"))
    }

    /// The file of the base holding snapshot `sid`'s memory.
    pub fn base_file(&self, sid: &str) -> PathBuf {
        let snap = self
            .mgr
            .services()
            .store
            .find_snapshot(sid)
            .unwrap()
            .unwrap();
        crate::bases::path(self.mgr.services(), snap.base())
    }

    /// Nothing exists but what the instances named `names` own: records,
    /// allocations, TAP ports, VMs, memory files, instance directories and
    /// snapshots (of Standby instances only).
    pub async fn assert_only(&self, names: &[&str]) {
        let all = self.mgr.list().await.unwrap();
        let mut got: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
        got.sort();
        let mut want = names.to_vec();
        want.sort();
        assert_eq!(got, want, "instance records");
        let ids: HashSet<&str> = all.iter().map(|i| i.id.as_str()).collect();
        let store = &self.mgr.services().store;
        for kind in [
            crate::store::AllocKind::Ip,
            crate::store::AllocKind::Mac,
            crate::store::AllocKind::Tap,
        ] {
            for (v, owner) in store.allocated(kind).unwrap() {
                assert!(ids.contains(owner.as_str()), "{kind:?} {v} held by {owner}");
            }
        }
        let taps: HashSet<String> = all.iter().filter_map(|i| i.network.tap.clone()).collect();
        assert!(self.net.ports().is_subset(&taps), "{:?}", self.net.ports());
        for id in self.hv.live().keys() {
            assert!(ids.contains(id.as_str()), "VM of {id} still runs");
        }
        for e in std::fs::read_dir(&self.cfg.mem_dir).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = n.strip_suffix(".mem") {
                assert!(ids.contains(id), "memory file {n} left");
            }
        }
        for e in std::fs::read_dir(self.cfg.data_dir.join("instances"))
            .unwrap()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(ids.contains(n.as_str()), "instance directory {n} left");
        }
        let owners: HashSet<Option<String>> = self
            .mgr
            .list_snapshots()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.standby_of)
            .collect();
        for o in owners {
            assert!(
                o.is_some_and(|o| ids.contains(o.as_str())),
                "stray snapshot"
            );
        }
        // Bases: one file per record, each referred to by something.
        let bases = self.mgr.services().store.list_bases().unwrap();
        let refs = crate::bases::referenced(self.mgr.services()).unwrap();
        for b in &bases {
            assert!(refs.contains(&b.id), "base {} left without referents", b.id);
        }
        let files: Vec<String> = std::fs::read_dir(self.cfg.mem_dir.join("bases"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for f in &files {
            let id = f.strip_suffix(".mem").unwrap_or(f);
            assert!(
                bases.iter().any(|b| b.id == id),
                "base file {f} without a record: {bases:?}"
            );
        }
    }
}
