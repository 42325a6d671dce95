//! Create, start, stop and delete: an instance's life outside snapshots.
//!
//! A boot reads top to bottom: lease (IPv4, MAC, TAP name) → TAP → kernel
//! command line with the boot configuration → QEMU → the agent answers.

use crate::agent::{CallPolicy, mailbox_of};
use crate::capacity::{self, Demand};
use crate::error::{CoreError, Result};
use crate::model::{CreateRequest, Instance, InstanceState, NetworkInfo, Workload};
use crate::services::{Services, new_id};
use crate::teardown;
use forkvm_proto::agent as pb;
use forkvm_proto::boot::BootConfig;
use std::time::Duration;
use tracing::{info, warn};

/// How long a fresh boot may take until the agent answers (TCG is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Loading the disk modules and mounting is ~0.5 s under TCG; a retry of
/// the (idempotent) call is safe.
const WORKLOAD_START_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest's sync before a stop.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MEMORY_MB: u32 = 256;
const DEFAULT_VCPUS: u32 = 1;
const MAX_VCPUS: u32 = 64;
const MIN_MEMORY_MB: u32 = 64;
const MAX_MEMORY_MB: u32 = 256 * 1024;

/// Most a writable disk may be (MiB): 1 TiB, a sanity bound (the file
/// grows only with what the guest writes).
const MAX_OVERLAY_MIB: u64 = 1 << 20;

/// The writable disk's size: the request's or the default.
fn validate_overlay(svc: &Services, req: &CreateRequest) -> Result<u64> {
    let mib = req.overlay_mib.unwrap_or(svc.cfg.default_overlay_mib);
    if !(64..=MAX_OVERLAY_MIB).contains(&mib) {
        return Err(CoreError::Invalid(format!(
            "overlay size must be between 64 MiB and {MAX_OVERLAY_MIB} MiB, got {mib} MiB"
        )));
    }
    Ok(mib)
}

/// The sizes a create request asks for, validated.
fn validate_create(req: &CreateRequest) -> Result<(u32, u32)> {
    crate::validate_name(&req.name)?;
    let vcpus = req.vcpus.unwrap_or(DEFAULT_VCPUS);
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(CoreError::Invalid(format!(
            "vcpus must be between 1 and {MAX_VCPUS}, got {vcpus}"
        )));
    }
    let memory_mb = req.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
    if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&memory_mb) {
        return Err(CoreError::Invalid(format!(
            "memory must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB} MiB, got {memory_mb}"
        )));
    }
    for k in req.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(CoreError::Invalid(format!(
                "invalid environment variable name {k:?}"
            )));
        }
    }
    Ok((vcpus, memory_mb))
}

pub(crate) async fn create(svc: &Services, req: CreateRequest) -> Result<Instance> {
    let (vcpus, memory_mb) = validate_create(&req)?;
    let image = req.image.clone().unwrap_or_else(|| "default".into());
    // Fail before creating anything when the image is missing.
    let boot_image = svc.load_image(&image)?;
    let overlay_mib = validate_overlay(svc, &req)?;
    let network = req.network_enabled.unwrap_or(true);
    crate::model::validate_ports(&req.ports).map_err(CoreError::Invalid)?;
    if !network && !req.ports.is_empty() {
        return Err(CoreError::Invalid(
            "published ports need the instance's network (network.enabled)".into(),
        ));
    }
    let _reserved = capacity::reserve(
        svc,
        Demand {
            own_vms: 1,
            memory_mb,
            addresses: u32::from(network),
            ..Demand::default()
        },
    )?;
    let id = new_id();
    let _guard = svc.locks.acquire(&id).await;
    let workload = boot_image
        .run
        .as_ref()
        .map(|run| Workload::of(run, req.entrypoint.as_deref(), req.cmd.as_deref(), &req.env));
    let mut argv = req.entrypoint.clone().unwrap_or_default();
    argv.extend(req.cmd.clone().unwrap_or_default());
    let mut inst = Instance {
        env: req.env,
        tags: req.tags,
        entrypoint: workload.as_ref().map_or(argv, |w| w.argv.clone()),
        workload,
        network: NetworkInfo {
            egress: req.egress.unwrap_or(true),
            ..NetworkInfo::unassigned(network)
        },
        ports: req.ports.clone(),
        ..Instance::created(
            id.clone(),
            req.name,
            boot_image.name.clone(),
            vcpus,
            memory_mb,
            svc.now(),
        )
    };
    svc.store.insert_instance(&inst)?;
    // Claimed before anything is made: a taken host port fails the request
    // with nothing left behind.
    if let Err(e) = svc.net.claim_ports(&svc.store, &id, &inst.ports) {
        let _ = svc.store.delete_instance(&id);
        return Err(e);
    }
    info!(instance = %id, name = %inst.name, "creating instance");
    let disk = match boot_image.rootfs {
        Some(_) => crate::layers::new_top(svc, None, overlay_mib)
            .await
            .map(Some),
        None => Ok(None),
    };
    let booted = match disk {
        Ok(top) => {
            inst.disk_top = top.as_ref().map(|(id, _pin)| id.clone());
            match svc.store.update_instance(&inst) {
                Ok(()) => boot(svc, &mut inst, None).await,
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    match booted {
        Ok(()) => Ok(inst),
        Err(e) => {
            warn!(instance = %id, error = %e, "create failed, cleaning up");
            teardown::remove_instance(svc, &inst).await?;
            Err(e)
        }
    }
}

pub(crate) async fn start(svc: &Services, id_or_name: &str) -> Result<Instance> {
    let (_guard, mut inst) = svc.lock_instance(id_or_name).await?;
    match inst.state {
        InstanceState::Stopped | InstanceState::Shutdown => {}
        InstanceState::Running => return Ok(inst),
        s => {
            return Err(CoreError::Conflict(format!(
                "instance {} is {}; only a Stopped instance can be started",
                inst.name,
                s.as_str()
            )));
        }
    }
    let previous = inst.network.clone();
    let _reserved = capacity::reserve(
        svc,
        Demand {
            own_vms: 1,
            memory_mb: inst.memory_mb,
            ..Demand::default()
        },
    )?;
    inst.state_error = None;
    inst.memory = crate::model::Memory::Own;
    match boot(svc, &mut inst, Some(previous)).await {
        Ok(()) => Ok(inst),
        Err(e) => {
            warn!(instance = %inst.id, error = %e, "start failed");
            teardown::stop_vmm(svc, &inst).await;
            inst.to_stopped(Some(e.to_string()), svc.now());
            svc.store.update_instance(&inst)?;
            Err(e)
        }
    }
}

/// The kernel command line of a fresh boot. Nothing of the instance's own
/// goes here: its boot config travels by fw_cfg ([`BootConfig::to_fw_cfg`]).
fn boot_cmdline(svc: &Services) -> String {
    let mut cmdline = "console=ttyS0 panic=-1 quiet loglevel=4".to_string();
    if let Some(filter) = &svc.cfg.guest_agent_log {
        // The kernel hands unknown `key=value` parameters to init's environment.
        cmdline.push_str(&format!(" FORKVM_AGENT_LOG={filter}"));
    }
    cmdline
}

/// Lease (if networked) → TAP → QEMU → the agent answers.
async fn boot(svc: &Services, inst: &mut Instance, previous: Option<NetworkInfo>) -> Result<()> {
    let image = svc.load_image(&inst.image)?;
    let paths = svc.paths(inst);
    paths.prepare()?;
    let boot_net = if inst.network.enabled {
        let lease = svc
            .net
            .ensure_lease(&svc.store, &inst.id, previous.as_ref())?;
        inst.network = lease.info(svc.net.bridge(), inst.network.egress);
        svc.store.update_instance(inst)?;
        svc.net.create_tap(&lease).await?;
        svc.net.sync_rules(&svc.store).await?;
        Some(lease.boot_network(&svc.cfg.dns))
    } else {
        None
    };
    let boot = BootConfig {
        hostname: inst.name.clone(),
        network: boot_net,
        env: inst.env.clone(),
        // An OCI image's process runs from its root, started over RPC once
        // the agent answers; the initramfs runs nothing of its own then.
        entrypoint: match inst.workload {
            Some(_) => Vec::new(),
            None => inst.entrypoint.clone(),
        },
        agent_port: forkvm_proto::boot::AGENT_PORT_NAME.to_string(),
    };
    let doc = boot
        .to_fw_cfg()
        .map_err(|e| CoreError::Invalid(format!("boot configuration: {e}")))?;
    paths.write_boot_config(&doc)?;
    let cmdline = boot_cmdline(svc);
    inst.cmdline = Some(cmdline.clone());
    let mut spec = svc.vm_spec(inst, &image, &cmdline, false)?;
    spec.boot_config = Some(paths.boot_config.clone());
    let t0 = std::time::Instant::now();
    let started = svc.hv.start(&spec).await;
    // QEMU has read it (or will never): the env leaves the disk.
    paths.remove_boot_config();
    let handle = started.map_err(CoreError::vmm("starting QEMU"))?;
    inst.to_initializing(handle.pid, svc.accel_name(), svc.now());
    svc.store.update_instance(inst)?;
    let health = wait_agent(svc, inst, BOOT_TIMEOUT).await.map_err(|e| {
        let tail = paths.console_tail(20);
        CoreError::Timeout(format!("{e}; console tail:\n{tail}"))
    })?;
    info!(instance = %inst.id, boot_ms = t0.elapsed().as_millis() as u64,
          agent_version = %health.version, "instance running");
    inst.mailbox = mailbox_of(&health);
    if let Some(w) = &inst.workload {
        start_workload(svc, inst, w).await?;
    }
    inst.to_running();
    svc.store.update_instance(inst)
}

/// Starts an OCI image's process in the guest (the agent mounts the
/// image's disks first); an image without the program fails the boot with
/// the agent's reason.
async fn start_workload(svc: &Services, inst: &Instance, w: &Workload) -> Result<()> {
    let t = std::time::Instant::now();
    let spec = pb::WorkloadSpec {
        argv: w.argv.clone(),
        env: w.env.clone(),
        working_dir: w.working_dir.clone(),
        user: w.user.clone(),
        host_root: false,
    };
    let policy = CallPolicy::within(WORKLOAD_START_TIMEOUT, WORKLOAD_START_TIMEOUT / 2);
    let socket = svc.paths(inst).agent_socket;
    let status = tokio::select! {
        r = svc.agent.start_workload(&inst.id, &socket, spec, policy) => r?,
        e = teardown::vmm_exit(svc, &inst.id, inst.pid, "while starting its workload") => {
            return Err(e.into());
        }
    };
    info!(instance = %inst.id, pid = status.pid, took_ms = t.elapsed().as_millis() as u64,
          "workload started");
    Ok(())
}

/// The agent's Health once it answers, failing early if the VMM exits.
pub(crate) async fn wait_agent(
    svc: &Services,
    inst: &Instance,
    total: Duration,
) -> Result<pb::HealthResponse> {
    let paths = svc.paths(inst);
    // Long tries: a request on a connection the guest isn't serving yet stays
    // buffered and is answered once the agent starts. Short tries abandoned a
    // connection per few seconds of a slow (TCG, loaded) boot; the guest
    // later replayed each dead connection's request and its stray answers
    // broke the live one, sometimes for good (CI, stop 8). A broken
    // connection still fails fast and is retried.
    let policy = CallPolicy::within(total, (total / 3).max(Duration::from_secs(10)));
    tokio::select! {
        r = svc.agent.health(&inst.id, &paths.agent_socket, policy) => Ok(r?),
        e = teardown::vmm_exit(svc, &inst.id, inst.pid, "while waiting for its agent") => Err(e.into()),
    }
}

pub(crate) async fn stop(svc: &Services, id_or_name: &str) -> Result<Instance> {
    let (_guard, mut inst) = svc.lock_instance(id_or_name).await?;
    match inst.state {
        InstanceState::Stopped => return Ok(inst),
        InstanceState::Standby => {
            return Err(CoreError::Conflict(format!(
                "instance {} is in Standby; restore or delete it",
                inst.name
            )));
        }
        _ => {}
    }
    if inst.state == InstanceState::Running && inst.disk_top.is_some() {
        flush_disks(svc, &inst).await;
    }
    teardown::stop_vmm(svc, &inst).await;
    inst.to_stopped(None, svc.now());
    svc.store.update_instance(&inst)?;
    teardown::sync_rules(svc).await;
    info!(instance = %inst.id, "instance stopped");
    Ok(inst)
}

/// Stopping ends the VMM at once; what the guest still holds in its page
/// cache would be lost with it, so the writable disk is synced first. Best
/// effort and bounded: a guest that does not answer is stopped anyway.
async fn flush_disks(svc: &Services, inst: &Instance) {
    // In the agent's own root (image_root false): the image's may have no
    // sync, and sync(1) flushes every filesystem from anywhere.
    let req = pb::ExecRequest {
        argv: vec!["sync".into()],
        timeout_ms: FLUSH_TIMEOUT.as_millis() as u32,
        ..Default::default()
    };
    let socket = svc.paths(inst).agent_socket;
    let policy = CallPolicy::within(FLUSH_TIMEOUT, FLUSH_TIMEOUT);
    match svc.agent.exec(&inst.id, &socket, req, policy).await {
        Ok(r) if r.exit_code == 0 => {}
        Ok(r) => warn!(instance = %inst.id, exit = r.exit_code, "sync before stop failed"),
        Err(e) => warn!(instance = %inst.id, error = %e, "sync before stop failed"),
    }
}

pub(crate) async fn delete(svc: &Services, id_or_name: &str) -> Result<()> {
    let (_guard, inst) = svc.lock_instance(id_or_name).await?;
    teardown::remove_instance(svc, &inst).await?;
    info!(instance = %inst.id, name = %inst.name, "instance deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_requests_are_validated() {
        let ok = CreateRequest {
            name: "web".into(),
            ..Default::default()
        };
        assert_eq!(validate_create(&ok).unwrap(), (1, 256));
        let bad = [
            CreateRequest {
                vcpus: Some(0),
                ..ok.clone()
            },
            CreateRequest {
                memory_mb: Some(32),
                ..ok.clone()
            },
            CreateRequest {
                env: [("A=B".to_string(), "x".to_string())].into(),
                ..ok.clone()
            },
            CreateRequest {
                name: "Web".into(),
                ..ok.clone()
            },
        ];
        for b in bad {
            assert!(
                matches!(validate_create(&b), Err(CoreError::Invalid(_))),
                "{b:?}"
            );
        }
    }
}
