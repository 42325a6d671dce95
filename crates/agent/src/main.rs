//! `forkvm-agent`: the guest side of forkvm. Runs as `/init` (PID 1) in the
//! guest initramfs: mounts the pseudo filesystems, loads the virtio modules,
//! applies the boot configuration from the kernel command line (hostname,
//! network via netlink), starts the optional entrypoint, reaps orphans, and
//! serves the `forkvm.agent.v1.Agent` gRPC API over a virtio-serial port.
//! On StartWorkload it mounts an OCI image's root from the host's disks
//! (erofs image + ext4 writable layer under an overlay) and starts the
//! image's command chrooted into it (`workload`, docs/guest-workload.md).
//! It also arms a mailbox page and watches for resumed forks whose host wrote
//! a new identity into it (`mailbox`, `resume`).
//!
//! Run as a non-PID-1 process it skips the init duties (mounts, console,
//! modules, hostname), which is handy for development.

mod exec;
mod files;
mod identity;
mod init;
mod mailbox;
mod netconf;
mod port;
mod resume;
mod rpc;
mod session;
mod workload;

use std::io::Write;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::exec::Reaper;
use crate::netconf::NetRequest;

/// Writes each log event as one `forkvm-agent: ...` line in a single write(2),
/// so lines from the kernel and children do not split ours.
struct PrefixedLine(Vec<u8>);

impl Write for PrefixedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for PrefixedLine {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let mut line = b"forkvm-agent: ".to_vec();
            line.extend_from_slice(&self.0);
            // Nowhere left to report a failed console write.
            let _ = std::io::stderr().write_all(&line);
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FORKVM_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_writer(|| PrefixedLine(Vec::with_capacity(256)))
        .init();
}

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        init::early_mounts();
        init::attach_console();
    }
    init_logging();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        pid1,
        kernel_uptime_ms = init::kernel_uptime_ms(),
        "starting"
    );
    // Current-thread: spawning and reaping happen on one thread (see exec.rs).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => init::halt_forever(&format!("tokio runtime: {e}")),
    };
    let res = rt.block_on(agent_main(pid1));
    let reason = match res {
        Ok(()) => "agent loop returned".to_owned(),
        Err(e) => format!("{e:#}"),
    };
    error!(%reason, "agent stopped");
    if pid1 {
        init::halt_forever(&reason);
    }
    std::process::exit(1);
}

async fn agent_main(pid1: bool) -> anyhow::Result<()> {
    // SIGCHLD handler before any child exists, so no exit goes unnoticed.
    let reaper = Reaper::new();
    let sigchld = signal(SignalKind::child())?;
    tokio::spawn(reaper.clone().run(sigchld));

    if pid1 {
        init::load_modules();
    }
    let cfg = init::read_boot_config();
    if pid1 {
        identity::fresh_machine_id_in(std::path::Path::new("/"));
    }
    if pid1 && !cfg.hostname.is_empty() {
        if netconf::valid_hostname(&cfg.hostname) {
            if let Err(e) = nix::unistd::sethostname(&cfg.hostname) {
                warn!(hostname = %cfg.hostname, error = %e, "sethostname failed");
            }
        } else {
            warn!(hostname = %cfg.hostname, "invalid hostname in boot config; ignored");
        }
    }

    let (conn, netlink, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    if pid1 {
        setup_boot_network(&netlink, &cfg).await;
    }

    // Armed after boot network setup and before serving, so the first
    // Health already reports it.
    let mailbox = match mailbox::Mailbox::new(pid1) {
        Ok(m) => Some(Arc::new(m)),
        Err(e) => {
            warn!(error = %e, "no mailbox; forks fall back to ReconfigureNetwork");
            None
        }
    };
    let state = Arc::new(rpc::AgentState::new(
        cfg.env.clone(),
        reaper.clone(),
        netlink,
        mailbox.clone(),
    ));
    if pid1 {
        // Forks copy the source's memory: what is mapped now (the whole
        // binary, the warmed heap) is resident in every fork, so the resume
        // path takes no page faults. Not MCL_FUTURE: that would populate every
        // later thread stack and heap reservation and grow every snapshot.
        use nix::sys::mman::{MlockAllFlags, mlockall};
        if let Err(e) = mlockall(MlockAllFlags::MCL_CURRENT) {
            warn!(error = %e, "mlockall failed; the resume path may fault pages in");
        }
    }
    if let Some(mb) = mailbox {
        let watched = cfg.network.as_ref().map(|n| resume::Watched {
            interface: n.interface.clone(),
            gateway: n.gateway.parse().ok(),
        });
        if let Err(e) = resume::spawn_watcher(state.clone(), mb, watched) {
            warn!(error = %e, "no resume watcher thread; forks fall back to RPC");
        }
    }
    if !cfg.entrypoint.is_empty() {
        start_entrypoint(&reaper, &cfg);
    }

    let port_name = cfg.effective_agent_port().to_owned();
    let path = port::wait_for_port(&port_name).await;
    let port = port::Port::open(&path)?;
    eprintln!("forkvm-agent: ready");
    info!(
        port = %port_name,
        path = %path.display(),
        kernel_uptime_ms = init::kernel_uptime_ms(),
        "serving"
    );
    rpc::serve_port(port, rpc::AgentService::new(state)).await?;
    Ok(())
}

async fn setup_boot_network(netlink: &rtnetlink::Handle, cfg: &forkvm_proto::BootConfig) {
    match netconf::link_state(netlink, "lo").await {
        Ok(lo) => {
            if let Err(e) = netconf::apply(netlink, lo.index, &[netconf::NetStep::LinkUp]).await {
                warn!(error = %e, "bringing lo up failed");
            }
        }
        Err(e) => warn!(error = %e, "no loopback interface"),
    }
    let Some(net) = &cfg.network else {
        info!("no network in boot config; interfaces stay down");
        return;
    };
    match NetRequest::from(net).validate() {
        Ok(desired) => {
            // Module load and device probe are asynchronous; give eth0 a moment.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match netconf::configure(netlink, &desired).await {
                    Ok(_) => break,
                    Err(netconf::NetApplyError::NoSuchInterface(_))
                        if tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        warn!(interface = %net.interface, error = %e, "boot network setup failed");
                        break;
                    }
                }
            }
        }
        Err(e) => warn!(error = %e, "invalid network in boot config; not applied"),
    }
}

fn start_entrypoint(reaper: &Arc<Reaper>, cfg: &forkvm_proto::BootConfig) {
    let env = exec::merge_env(&cfg.env, []);
    let mut cmd = std::process::Command::new(&cfg.entrypoint[0]);
    cmd.args(&cfg.entrypoint[1..]).env_clear().envs(&env);
    match reaper.spawn(&mut cmd) {
        Ok((child, exit)) => {
            let pid = child.id();
            info!(pid, argv = ?cfg.entrypoint, "entrypoint started");
            tokio::spawn(async move {
                match exit.await {
                    Ok(e) => info!(pid, code = e.code, signal = e.signal, "entrypoint exited"),
                    Err(_) => warn!(pid, "entrypoint status lost"),
                }
            });
        }
        Err(e) => error!(argv = ?cfg.entrypoint, error = %e, "entrypoint failed to start"),
    }
}
