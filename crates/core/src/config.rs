//! The daemon's configuration, read once at start-up (the CLI fills it from
//! flags and environment), and the test hooks behind their one switch.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Default deadline for a fork to answer on its new address after resume.
/// 8 MiB of console per VM (plus the rotated half).
pub const DEFAULT_CONSOLE_MAX_BYTES: u64 = 8 << 20;
pub const DEFAULT_HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for the mailbox ack before falling back to the RPC path.
pub const DEFAULT_MAILBOX_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Default share of a copy-on-write VM's size charged to the budget.
pub const DEFAULT_COW_RESERVE_PERCENT: u32 = 25;

/// Default size from which a captured VM is handed over instead of copied.
pub const DEFAULT_HANDOVER_MIN_MIB: u64 = 256;
/// Writable-disk chains deeper than this are flattened in the background.
pub const DEFAULT_DISK_MAX_DEPTH: usize = 8;
/// Size of an instance's writable disk unless the request says otherwise.
pub const DEFAULT_OVERLAY_MIB: u64 = 4096;

/// Daemon configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Root of all state: `forkvm.db`, `instances/<id>/`, `images/`.
    pub data_dir: PathBuf,
    /// Directory for guest memory files; must be a tmpfs (default /dev/shm/forkvm).
    pub mem_dir: PathBuf,
    pub bridge: String,
    /// CIDR of the instance network, e.g. "10.88.0.0/16"; the gateway is its first host.
    pub subnet: String,
    pub qemu_bin: PathBuf,
    /// Writable-disk chains deeper than this are flattened (`crate::layers`).
    pub disk_max_depth: usize,
    /// Size of an instance's writable disk unless its request gives one.
    pub default_overlay_mib: u64,
    /// Deadline for re-addressing a fork after resume (RPC and exec paths).
    pub handoff_timeout: Duration,
    /// Deadline for the guest's mailbox ack, then the RPC fallback.
    pub mailbox_ack_timeout: Duration,
    /// Most guest memory (MiB) all VMs with a VMM may have together;
    /// `None` = 90 % of the host's RAM.
    pub memory_budget_mb: Option<u64>,
    /// Share of its size (percent) a copy-on-write VM is charged against the
    /// memory budget: what it may write privately.
    pub cow_reserve_percent: u32,
    /// A running VM whose own memory file holds at least this many MiB is
    /// handed over to a copy-on-write VMM when captured (pause independent
    /// of its memory; it stays copy-on-write afterwards); smaller ones are
    /// copied while paused and keep their own file.
    pub handover_min_mib: u64,
    /// After a handover, give the VM its own memory file back in the
    /// background (a live migration), so its next capture is a handover too.
    pub promote_after_handover: bool,
    /// Log filter for the agents of VMs booted from now on (e.g. `debug`),
    /// passed on the kernel command line; forks inherit their source's.
    /// Checked by [`guest_agent_log_filter`].
    pub guest_agent_log: Option<String>,
    /// Registries pulled from over plain HTTP (`host[:port]`); loopback
    /// always is.
    pub insecure_registries: Vec<String>,
    /// Image pulls run at once; the rest wait as `pending`.
    pub image_pulls_parallel: usize,
    /// Name servers given to guests (resolv.conf) at boot and in every
    /// fork's handoff; empty: none.
    pub dns: Vec<std::net::Ipv4Addr>,
    /// Guests' traffic may leave the daemon's namespace (source NAT out of
    /// its default route); off: for no instance, whatever it asks.
    pub egress: bool,
    /// A guest's console file is rotated past this size (`crate::console`).
    pub console_max_bytes: u64,
    /// Each VM's QEMU in a cgroup of its own beneath the daemon's, with
    /// memory, CPU and pids limits (`forkvm_vmm` `limits_for`). Start-up
    /// fails if the daemon's cgroups can't hold them.
    pub cgroups: bool,
    /// Each instance's QEMU runs as a uid of its own from this range
    /// (`crate::vm_users`); `None`: as the daemon's user.
    pub vm_users: Option<crate::vm_users::VmUsers>,
    /// Each QEMU in a mount namespace of its own holding only the system
    /// files it loads and its layer directory (`forkvm_vmm` jail), mounted
    /// on [`Config::jail_dir`].
    pub vm_jail: bool,
    pub test_hooks: TestHooks,
}

impl Config {
    /// The empty directory every jailed QEMU's root is mounted on (in its
    /// own mount namespace only).
    pub fn jail_dir(&self) -> PathBuf {
        self.data_dir.join("jail")
    }

    /// A configuration with every tunable at its default.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        mem_dir: impl Into<PathBuf>,
        bridge: impl Into<String>,
        subnet: impl Into<String>,
        qemu_bin: impl Into<PathBuf>,
    ) -> Self {
        Self {
            data_dir: data_dir.into(),
            mem_dir: mem_dir.into(),
            bridge: bridge.into(),
            subnet: subnet.into(),
            qemu_bin: qemu_bin.into(),
            disk_max_depth: DEFAULT_DISK_MAX_DEPTH,
            default_overlay_mib: DEFAULT_OVERLAY_MIB,
            handoff_timeout: DEFAULT_HANDOFF_TIMEOUT,
            mailbox_ack_timeout: DEFAULT_MAILBOX_ACK_TIMEOUT,
            memory_budget_mb: None,
            cow_reserve_percent: DEFAULT_COW_RESERVE_PERCENT,
            handover_min_mib: DEFAULT_HANDOVER_MIN_MIB,
            promote_after_handover: true,
            guest_agent_log: None,
            insecure_registries: Vec::new(),
            image_pulls_parallel: 2,
            console_max_bytes: DEFAULT_CONSOLE_MAX_BYTES,
            cgroups: true,
            vm_users: None,
            vm_jail: false,
            dns: Vec::new(),
            egress: true,
            test_hooks: TestHooks::default(),
        }
    }
}

/// Accepts a guest agent log filter only if it is safe on a kernel command
/// line (one token, env-filter characters only).
pub fn guest_agent_log_filter(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 200
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | ',' | '=' | '.'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "guest agent log filter {v:?} is not a plain env-filter (letters, digits, _-:,=.)"
        ))
    }
}

/// Fault injection for the end-to-end tests. Off unless the daemon runs with
/// `FORKVM_TEST_HOOKS=1`; then `FORKVM_TEST_*` variables arm single hooks.
#[derive(Clone, Debug, Default)]
pub struct TestHooks {
    /// `FORKVM_TEST_CRASH_AT=<point>`: SIGKILL the daemon there.
    pub crash_at: Option<String>,
    /// `FORKVM_TEST_KILL_VMM_AT=<point>`: SIGKILL the VMM being resumed there.
    pub kill_vmm_at: Option<String>,
    /// `FORKVM_TEST_MAILBOX_FORGE=crc,version,mac,prefix`: successive forks
    /// get successive forged payloads (a correct guest rejects each).
    pub mailbox_forgeries: Vec<forkvm_mailbox::Forgery>,
    /// `FORKVM_TEST_ACK_BIND_ADDR`: bind the ack listener there instead of
    /// the gateway (to make it fail).
    pub ack_bind_addr: Option<Ipv4Addr>,
    next_forgery: Arc<AtomicUsize>,
}

/// The one switch that enables [`TestHooks`].
pub const TEST_HOOKS_SWITCH: &str = "FORKVM_TEST_HOOKS";

impl TestHooks {
    /// Reads the hooks from `var` (the environment in the daemon). Without
    /// the switch, armed hooks are reported and ignored.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let names = [
            "FORKVM_TEST_CRASH_AT",
            "FORKVM_TEST_KILL_VMM_AT",
            "FORKVM_TEST_MAILBOX_FORGE",
            "FORKVM_TEST_ACK_BIND_ADDR",
        ];
        if var(TEST_HOOKS_SWITCH).as_deref() != Some("1") {
            let armed: Vec<&str> = names.into_iter().filter(|n| var(n).is_some()).collect();
            if !armed.is_empty() {
                tracing::warn!(
                    ?armed,
                    "test hooks ignored: {TEST_HOOKS_SWITCH}=1 is not set"
                );
            }
            return Ok(Self::default());
        }
        let forgeries = var("FORKVM_TEST_MAILBOX_FORGE")
            .unwrap_or_default()
            .split(',')
            .filter(|k| !k.is_empty())
            .map(|k| match k {
                "crc" => Ok(forkvm_mailbox::Forgery::BadCrc),
                "version" => Ok(forkvm_mailbox::Forgery::WrongVersion),
                "mac" => Ok(forkvm_mailbox::Forgery::MulticastMac),
                "prefix" => Ok(forkvm_mailbox::Forgery::PrefixTooLong),
                other => Err(format!(
                    "FORKVM_TEST_MAILBOX_FORGE: unknown forgery {other:?}"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ack_bind_addr = var("FORKVM_TEST_ACK_BIND_ADDR")
            .map(|v| {
                v.parse()
                    .map_err(|e| format!("FORKVM_TEST_ACK_BIND_ADDR {v:?}: {e}"))
            })
            .transpose()?;
        Ok(Self {
            crash_at: var("FORKVM_TEST_CRASH_AT"),
            kill_vmm_at: var("FORKVM_TEST_KILL_VMM_AT"),
            mailbox_forgeries: forgeries,
            ack_bind_addr,
            next_forgery: Arc::default(),
        })
    }

    /// SIGKILLs the daemon at `point` when armed there, to prove a restart
    /// converges (crash-consistency tests).
    pub fn crash_point(&self, point: &str) {
        if self.crash_at.as_deref() == Some(point) {
            tracing::error!(point, "test crash point reached: killing the daemon");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// SIGKILLs the VMM `pid` at `point` when armed there (QEMU dying
    /// mid-restore).
    pub fn vmm_kill_point(&self, point: &str, pid: u32) {
        if self.kill_vmm_at.as_deref() != Some(point) {
            return;
        }
        tracing::error!(point, pid, "test hook: killing the VMM");
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The forgery for the next mailbox payload, if any are armed.
    pub fn next_forgery(&self) -> Option<forkvm_mailbox::Forgery> {
        if self.mailbox_forgeries.is_empty() {
            return None;
        }
        let n = self.next_forgery.fetch_add(1, Ordering::Relaxed);
        Some(self.mailbox_forgeries[n % self.mailbox_forgeries.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn hooks_need_the_switch() {
        let h = TestHooks::from_vars(vars(&[("FORKVM_TEST_CRASH_AT", "fork:snapshot")])).unwrap();
        assert!(h.crash_at.is_none());
        let h = TestHooks::from_vars(vars(&[
            ("FORKVM_TEST_HOOKS", "1"),
            ("FORKVM_TEST_CRASH_AT", "fork:snapshot"),
            ("FORKVM_TEST_MAILBOX_FORGE", "crc,mac"),
            ("FORKVM_TEST_ACK_BIND_ADDR", "127.0.0.1"),
        ]))
        .unwrap();
        assert_eq!(h.crash_at.as_deref(), Some("fork:snapshot"));
        assert_eq!(h.ack_bind_addr, Some(Ipv4Addr::LOCALHOST));
        let seq: Vec<_> = (0..3).map(|_| h.next_forgery().unwrap()).collect();
        use forkvm_mailbox::Forgery::*;
        assert!(matches!(seq[..], [BadCrc, MulticastMac, BadCrc]));
    }

    #[test]
    fn bad_hook_values_are_errors() {
        for (k, v) in [
            ("FORKVM_TEST_MAILBOX_FORGE", "crc,nonsense"),
            ("FORKVM_TEST_ACK_BIND_ADDR", "not-an-ip"),
        ] {
            assert!(TestHooks::from_vars(vars(&[("FORKVM_TEST_HOOKS", "1"), (k, v)])).is_err());
        }
    }

    #[test]
    fn guest_agent_log_filter_accepts_only_one_plain_token() {
        assert_eq!(guest_agent_log_filter("debug").as_deref(), Ok("debug"));
        assert!(guest_agent_log_filter("forkvm_agent=debug,h2=info").is_ok());
        for bad in ["", "debug init=/bin/sh", "a\"b", "x;y", "a\nb"] {
            assert!(guest_agent_log_filter(bad).is_err(), "{bad:?}");
        }
    }
}

/// The most name servers a guest gets (resolv.conf's own limit).
pub const MAX_DNS: usize = 3;

/// The IPv4 name servers of a resolv.conf, loopback stubs (systemd-resolved,
/// dnsmasq on 127.0.0.x) skipped: a guest cannot reach the host's loopback.
pub fn dns_from_resolv_conf(text: &str) -> Vec<std::net::Ipv4Addr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .take(MAX_DNS)
        .collect()
}

#[cfg(test)]
mod dns_tests {
    use super::*;

    #[test]
    fn resolv_conf_servers_without_loopback() {
        let text = "# comment\nnameserver 127.0.0.53\nnameserver 10.0.0.2\n\
                    nameserver ::1\nsearch x\nnameserver 1.1.1.1\nnameserver 8.8.8.8\nnameserver 9.9.9.9\n";
        let got: Vec<String> = dns_from_resolv_conf(text)
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(got, ["10.0.0.2", "1.1.1.1", "8.8.8.8"]);
        assert!(dns_from_resolv_conf("nameserver 127.0.0.1\n").is_empty());
    }
}
