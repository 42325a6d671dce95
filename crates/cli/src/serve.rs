//! `forkvm serve`: open the manager and serve the API on the unix socket and,
//! optionally, on TCP with a bearer token (TLS, or plain HTTP on loopback
//! only), until SIGTERM/SIGINT.

use anyhow::{Context, bail};
use forkvm_core::{Config, Manager, TestHooks};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Environment variable holding the TCP listener's bearer token. Only read
/// from the environment so the token never shows up in `ps`.
pub const TOKEN_ENV: &str = "FORKVM_API_TOKEN";

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Also serve on TCP (requires FORKVM_API_TOKEN, at least 32
    /// characters), e.g. 127.0.0.1:4973. Plain HTTP only on a loopback
    /// address; anywhere else give --tls-cert and --tls-key.
    #[arg(long, env = "FORKVM_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// TLS certificate chain for --listen (PEM, leaf first).
    #[arg(long, env = "FORKVM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key for --listen (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "FORKVM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Root of all state.
    #[arg(long, env = "FORKVM_DATA_DIR", default_value = "/var/lib/forkvm")]
    pub data_dir: PathBuf,
    /// Directory for guest memory files (a tmpfs).
    #[arg(long, env = "FORKVM_MEM_DIR", default_value = "/dev/shm/forkvm")]
    pub mem_dir: PathBuf,
    /// Host bridge for instance TAPs.
    #[arg(long, env = "FORKVM_BRIDGE", default_value = "forkvm0")]
    pub bridge: String,
    /// Instance network (CIDR).
    #[arg(long, env = "FORKVM_SUBNET", default_value = "10.88.0.0/16")]
    pub subnet: String,
    /// QEMU binary.
    #[arg(long, env = "FORKVM_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Deadline for a fork to answer on its new address after resume (ms).
    #[arg(long, env = "FORKVM_HANDOFF_TIMEOUT_MS", default_value_t = 30_000)]
    pub handoff_timeout_ms: u64,
    /// Deadline for a fork's mailbox ack before the RPC fallback (ms).
    #[arg(long, env = "FORKVM_MAILBOX_ACK_TIMEOUT_MS", default_value_t = 5_000)]
    pub mailbox_ack_timeout_ms: u64,
    /// Most guest memory (MiB) all VMs with a VMM may have together
    /// [default: 90 % of host RAM].
    #[arg(long, env = "FORKVM_MAX_GUEST_MEMORY_MB")]
    pub max_guest_memory_mb: Option<u64>,
    /// Share of its size (percent) a copy-on-write fork is charged against
    /// the memory budget: what it may write privately.
    #[arg(long, env = "FORKVM_COW_RESERVE_PERCENT", default_value_t = forkvm_core::config::DEFAULT_COW_RESERVE_PERCENT,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub cow_reserve_percent: u32,
    /// A running VM whose own memory holds at least this many MiB is handed
    /// over to a copy-on-write VMM when forked from running (pause
    /// independent of its memory); smaller ones are copied while paused.
    #[arg(long, env = "FORKVM_HANDOVER_MIN_MIB", default_value_t = forkvm_core::config::DEFAULT_HANDOVER_MIN_MIB)]
    pub handover_min_mib: u64,
    /// After a handover, give the source its own memory back in the
    /// background (live migration), so its next fork is a handover too.
    #[arg(long, env = "FORKVM_PROMOTE_AFTER_HANDOVER", default_value_t = true, action = clap::ArgAction::Set)]
    pub promote_after_handover: bool,
    /// Log filter for the guest agents of VMs booted from now on (e.g.
    /// `forkvm_agent=trace`); one plain env-filter token.
    #[arg(long, env = "FORKVM_GUEST_AGENT_LOG", value_parser = forkvm_core::config::guest_agent_log_filter)]
    pub guest_agent_log: Option<String>,
    /// Registries to pull from over plain HTTP (`host[:port]`, repeatable
    /// or comma-separated); loopback registries always may be.
    #[arg(long, env = "FORKVM_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registry: Vec<String>,
    /// Image pulls that run at once; more wait as `pending`.
    #[arg(long, env = "FORKVM_IMAGE_PULLS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub image_pulls: u16,
    /// Name servers for guests (comma-separated IPv4, at most 3; `none` for
    /// none). Default: those of this namespace's /etc/resolv.conf, loopback
    /// stubs skipped.
    #[arg(long, env = "FORKVM_DNS")]
    pub dns: Option<String>,
    /// Guests' traffic may leave this namespace through source NAT out of
    /// its default route (`false`: for no instance, whatever it asks).
    /// Needs Debian's `nftables`; turns IPv4 forwarding on.
    #[arg(long, env = "FORKVM_EGRESS", default_value_t = true, action = clap::ArgAction::Set)]
    pub egress: bool,
    /// Bytes of serial console kept per VM before it is rotated (the
    /// rotated file keeps half of it).
    #[arg(long, env = "FORKVM_CONSOLE_MAX_BYTES",
          default_value_t = forkvm_core::config::DEFAULT_CONSOLE_MAX_BYTES,
          value_parser = clap::value_parser!(u64).range(4096..))]
    pub console_max_bytes: u64,
    /// Run VMs without a cgroup of their own (no memory, CPU or pids
    /// limit per VM); by default the daemon refuses to start where it
    /// can't make them.
    #[arg(long, env = "FORKVM_NO_CGROUPS")]
    pub no_cgroups: bool,
    /// Run each instance's QEMU as an unprivileged uid of its own (needs
    /// a root daemon); `off`: as the daemon's user.
    #[arg(long, env = "FORKVM_VM_USER", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub vm_user: bool,
    /// Run each QEMU in a mount namespace of its own that holds only the
    /// system files it loads and its disk layers; `off`: the host's tree.
    #[arg(long, env = "FORKVM_VM_JAIL", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub vm_jail: bool,
    /// First id of the VM uid range: the group every VM user is in; the
    /// uids follow it (65536 of them).
    #[arg(long, env = "FORKVM_VM_UID_BASE",
          default_value_t = forkvm_core::vm_users::DEFAULT_VM_UID_BASE)]
    pub vm_uid_base: u32,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

/// What the TCP listener serves, checked before anything starts.
pub struct TcpSettings {
    pub addr: SocketAddr,
    pub token: String,
    /// Certificate chain and key (PEM); `None`: plain HTTP (loopback only).
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for TcpSettings {
    // By hand: the token stays out of every debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpSettings")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// The TCP listener's settings from the flags and the token's environment
/// variable: refuses a missing or short token, TLS files without
/// `--listen`, and plain HTTP on an address other hosts can reach.
pub fn tcp_settings(
    listen: Option<SocketAddr>,
    env_token: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
) -> anyhow::Result<Option<TcpSettings>> {
    let tls = match (tls_cert, tls_key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let Some(addr) = listen else {
        if tls.is_some() {
            bail!("--tls-cert/--tls-key are for the TCP listener: give --listen ADDR too");
        }
        return Ok(None);
    };
    let token = env_token.map(|t| t.trim().to_string()).unwrap_or_default();
    if token.is_empty() {
        bail!(
            "--listen {addr} requires an API token: set {TOKEN_ENV} (clients send it as `Authorization: Bearer <token>`)"
        );
    }
    forkvm_api::check_token(&token).context(TOKEN_ENV)?;
    if tls.is_none() {
        forkvm_api::check_plain_addr(addr).with_context(|| format!("--listen {addr}"))?;
    }
    Ok(Some(TcpSettings { addr, token, tls }))
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    // Err means the sender is gone, which also means: shut down.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The VM uid range, unless `--vm-user false`.
fn vm_users(args: &ServeArgs) -> anyhow::Result<Option<forkvm_core::vm_users::VmUsers>> {
    if !args.vm_user {
        return Ok(None);
    }
    forkvm_core::vm_users::VmUsers::new(
        args.vm_uid_base,
        forkvm_core::vm_users::DEFAULT_VM_UID_COUNT,
    )
    .map(Some)
    .map_err(anyhow::Error::msg)
    .context("--vm-uid-base")
}

/// The name servers guests get: `--dns`, or the host's resolv.conf.
fn guest_dns(flag: Option<&str>) -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
    let Some(list) = flag else {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        return Ok(forkvm_core::config::dns_from_resolv_conf(&text));
    };
    if list == "none" {
        return Ok(Vec::new());
    }
    let servers = list
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<std::net::Ipv4Addr>()
                .with_context(|| format!("--dns: {s:?} is not an IPv4 address"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if servers.len() > forkvm_core::config::MAX_DNS {
        anyhow::bail!("--dns: at most {} servers", forkvm_core::config::MAX_DNS);
    }
    Ok(servers)
}

pub async fn serve(socket: &Path, args: ServeArgs) -> anyhow::Result<()> {
    // Everything the daemon and its VMMs create (store, memory files,
    // disks, consoles, the API socket) is for the daemon's user alone.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let tcp_cfg = tcp_settings(
        args.listen,
        std::env::var(TOKEN_ENV).ok(),
        args.tls_cert.clone(),
        args.tls_key.clone(),
    )?;
    // The certificate and key are read before the manager opens: a bad
    // file fails the start-up at once.
    let tls = match tcp_cfg.as_ref().and_then(|t| t.tls.as_ref()) {
        Some((cert, key)) => Some(forkvm_api::load_server_config(cert, key)?),
        None => None,
    };
    let cfg = Config {
        handoff_timeout: Duration::from_millis(args.handoff_timeout_ms),
        mailbox_ack_timeout: Duration::from_millis(args.mailbox_ack_timeout_ms),
        memory_budget_mb: args.max_guest_memory_mb,
        cow_reserve_percent: args.cow_reserve_percent,
        handover_min_mib: args.handover_min_mib,
        promote_after_handover: args.promote_after_handover,
        guest_agent_log: args.guest_agent_log.clone(),
        insecure_registries: args.insecure_registry.clone(),
        image_pulls_parallel: usize::from(args.image_pulls),
        console_max_bytes: args.console_max_bytes,
        cgroups: !args.no_cgroups,
        vm_users: vm_users(&args)?,
        vm_jail: args.vm_jail,
        dns: guest_dns(args.dns.as_deref())?,
        egress: args.egress,
        test_hooks: TestHooks::from_vars(|k| std::env::var(k).ok())
            .map_err(anyhow::Error::msg)
            .context("test hooks")?,
        ..Config::new(
            args.data_dir.clone(),
            args.mem_dir.clone(),
            args.bridge.clone(),
            args.subnet.clone(),
            args.qemu.clone(),
        )
    };
    tracing::info!(data_dir = %cfg.data_dir.display(), mem_dir = %cfg.mem_dir.display(),
        bridge = %cfg.bridge, subnet = %cfg.subnet, qemu = %cfg.qemu_bin.display(), "opening manager");
    let manager = Manager::open(cfg).await.context("opening the manager")?;

    // Bind everything before serving, so a bad address fails the start-up.
    let unix = forkvm_api::bind_unix(socket).await?;
    let tcp = match tcp_cfg {
        Some(t) => Some((
            TcpListener::bind(t.addr)
                .await
                .with_context(|| format!("binding {}", t.addr))?,
            t.token,
        )),
        None => None,
    };

    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "shutting down");
        let _ = tx.send(true);
    });

    let unix_srv =
        forkvm_api::serve_unix_listener(unix, socket, manager.clone(), wait_for(rx.clone()));
    let tcp_srv = async {
        let stop = wait_for(rx.clone());
        match (tcp, tls) {
            (Some((l, t)), Some(tls)) => {
                forkvm_api::serve_tls_listener(l, tls, &t, manager.clone(), stop).await
            }
            (Some((l, t)), None) => {
                forkvm_api::serve_tcp_listener(l, &t, manager.clone(), stop).await
            }
            (None, _) => Ok(()),
        }
    };
    tokio::try_join!(unix_srv, tcp_srv)?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "0123456789abcdef0123456789abcdef";

    fn addr(a: &str) -> Option<SocketAddr> {
        Some(a.parse().expect("address"))
    }

    fn err(r: anyhow::Result<Option<TcpSettings>>) -> String {
        format!("{:#}", r.expect_err("refused"))
    }

    #[test]
    fn token_required_with_listen() {
        assert!(tcp_settings(None, None, None, None).unwrap().is_none());
        let e = err(tcp_settings(addr("127.0.0.1:4973"), None, None, None));
        assert!(e.contains(TOKEN_ENV), "{e}");
        assert!(tcp_settings(addr("127.0.0.1:4973"), Some("  ".into()), None, None).is_err());
        let t = tcp_settings(
            addr("127.0.0.1:4973"),
            Some(format!(" {GOOD}\n")),
            None,
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(t.token, GOOD);
        assert!(t.tls.is_none());
        assert!(
            !format!("{t:?}").contains(GOOD),
            "the token in a debug print"
        );
    }

    #[test]
    fn short_token_refused() {
        let short = &GOOD[..31];
        let e = err(tcp_settings(
            addr("127.0.0.1:4973"),
            Some(short.into()),
            None,
            None,
        ));
        assert!(
            e.contains("31 characters") && e.contains("at least 32"),
            "{e}"
        );
    }

    #[test]
    fn plain_http_only_on_loopback() {
        for a in ["0.0.0.0:4973", "10.1.2.3:4973", "[::]:4973"] {
            let e = err(tcp_settings(addr(a), Some(GOOD.into()), None, None));
            assert!(
                e.contains("--tls-cert") && e.contains("--tls-key"),
                "{a}: {e}"
            );
        }
        for a in ["127.0.0.1:4973", "127.8.9.1:1", "[::1]:4973"] {
            assert!(
                tcp_settings(addr(a), Some(GOOD.into()), None, None).is_ok(),
                "{a}"
            );
        }
        let tls = tcp_settings(
            addr("0.0.0.0:4973"),
            Some(GOOD.into()),
            Some("c.pem".into()),
            Some("k.pem".into()),
        )
        .unwrap()
        .unwrap();
        assert_eq!(tls.tls, Some(("c.pem".into(), "k.pem".into())));
    }

    #[test]
    fn tls_files_need_each_other_and_listen() {
        let e = err(tcp_settings(
            None,
            None,
            Some("c.pem".into()),
            Some("k.pem".into()),
        ));
        assert!(e.contains("--listen"), "{e}");
        let e = err(tcp_settings(
            addr("127.0.0.1:1"),
            Some(GOOD.into()),
            Some("c.pem".into()),
            None,
        ));
        assert!(e.contains("go together"), "{e}");
    }
}
