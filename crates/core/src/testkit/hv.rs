use forkvm_vmm::{
    Accel, Hypervisor, MigrationReport, RunState, VmHandle, VmSpec, VmmError, VmmFuture,
};
use std::collections::{BTreeMap, HashMap};
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
    FreezeDisk,
    Stop,
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
    /// The file its writable disk writes now (QEMU's `query-block`).
    pub disk_top: Option<PathBuf>,
    /// The process is held (SIGSTOP): QMP gets no answer.
    pub held: bool,
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
    flattens: usize,
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

    /// VMM `pid`, if it lives.
    pub fn vm_of(&self, pid: u32) -> Option<FakeVm> {
        self.st().vms.get(&pid).cloned()
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
            boot_config: None,
            mem_path: mem,
            mem_share: true,
            net: None,
            disks: vec![],
            agent_socket: dir.join("agent.sock"),
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            pidfile: dir.join("pid"),
            accel: Accel::Tcg,
            incoming: false,
            user: None,
            jail: None,
        };
        let mut st = self.st();
        st.next_pid += 1;
        let pid = 50_000 + st.next_pid;
        let vm = FakeVm {
            id: spec.id.clone(),
            spec: spec.clone(),
            state: RunState::Running,
            private: BTreeMap::new(),
            disk_top: None,
            held: false,
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
        if vm.held {
            return Err(held_error());
        }
        vm.state = state;
        Ok(())
    }

    /// As `blockdev-snapshot-sync`: the new top file appears and is used.
    fn freeze(&self, pid: u32, new_top: &Path) -> std::result::Result<(), VmmError> {
        self.check(HvOp::FreezeDisk)?;
        let mut st = self.st();
        let vm = st.vms.get_mut(&pid).ok_or_else(|| vmm_err("no such vm"))?;
        if vm.disk_top.is_none() {
            return Err(vmm_err("no writable disk"));
        }
        std::fs::write(new_top, b"qcow2").map_err(|e| vmm_err(&e.to_string()))?;
        vm.disk_top = Some(new_top.to_path_buf());
        Ok(())
    }

    /// How many flattens the VMs asked for.
    pub fn flattens(&self) -> usize {
        self.st().flattens
    }

    fn start_sync(&self, spec: &VmSpec) -> std::result::Result<VmHandle, VmmError> {
        self.check(HvOp::Start)?;
        if !spec.mem_share && !spec.mem_path.exists() {
            // As QEMU's backend: share=off maps an existing base.
            return Err(vmm_err("share=off needs an existing base"));
        }
        if let Some(d) = spec.disks.iter().find(|d| !d.path.exists()) {
            // As QEMU: every disk file must exist.
            return Err(vmm_err(&format!("disk {} missing", d.path.display())));
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
                disk_top: spec
                    .disks
                    .iter()
                    .find(|d| d.role == forkvm_vmm::DiskRole::Rw)
                    .map(|d| d.path.clone()),
                held: false,
            },
        );
        Ok(VmHandle::for_spec(spec, pid))
    }
}

impl Hypervisor for FakeHypervisor {
    fn freeze_disk<'a>(&'a self, h: &'a VmHandle, new_top: &'a Path) -> VmmFuture<'a, ()> {
        Box::pin(async move { self.freeze(h.pid, new_top) })
    }

    fn create_overlay<'a>(
        &'a self,
        top: &'a Path,
        backing: &'a Path,
        _backing_format: &'a str,
        _size_bytes: u64,
    ) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            if top.exists() {
                return Err(vmm_err("overlay exists"));
            }
            // The backing path, so tests can follow the chain.
            std::fs::write(top, backing.as_os_str().as_encoded_bytes())
                .map_err(|e| vmm_err(&e.to_string()))
        })
    }

    fn disk_top<'a>(&'a self, h: &'a VmHandle) -> VmmFuture<'a, Option<PathBuf>> {
        Box::pin(async move { Ok(self.vm(h.pid)?.disk_top) })
    }

    fn flatten_disk<'a>(&'a self, h: &'a VmHandle, _base: &'a Path) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.vm(h.pid)?;
            self.st().flattens += 1;
            Ok(())
        })
    }

    fn start<'a>(&'a self, spec: &'a VmSpec) -> VmmFuture<'a, VmHandle> {
        Box::pin(async move { self.start_sync(spec) })
    }

    fn stop<'a>(&'a self, h: &'a VmHandle, _grace: Duration) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.check(HvOp::Stop)?;
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
        Box::pin(async move {
            let vm = self.vm(h.pid)?;
            if vm.held {
                return Err(held_error());
            }
            Ok(vm.state)
        })
    }

    fn hold<'a>(&'a self, h: &'a VmHandle, held: bool) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            let mut st = self.st();
            let vm = st.vms.get_mut(&h.pid).ok_or(VmmError::NotRunning {
                id: h.id.clone(),
                pid: h.pid,
            })?;
            vm.held = held;
            Ok(())
        })
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
        freeze_disk: Option<&'a Path>,
    ) -> VmmFuture<'a, MigrationReport> {
        Box::pin(async move {
            self.check(HvOp::Migrate)?;
            if let Some(new_top) = freeze_disk {
                self.freeze(from.pid, new_top)?;
            }
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

/// What QMP to a held (SIGSTOPped) QEMU ends in.
fn held_error() -> VmmError {
    VmmError::Timeout {
        what: "QMP of a held QEMU".into(),
        timeout: std::time::Duration::from_secs(5),
    }
}
