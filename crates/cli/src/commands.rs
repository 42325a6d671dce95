//! Client commands: each talks to the daemon through [`Client`] and prints
//! either a human view or JSON (`--json`).

use crate::client::{Client, ClientError, LogsQuery};
use crate::output;
use anyhow::Context;
use forkvm_api::wire::{
    EgressParam, ExecParams, ForkOutcome, ForkResponse, ForkTargetState, InstanceCreateParams,
    InstanceForkParams, NetworkParams, PortProtocol, PublishedPort, SnapshotCreateParams,
    SnapshotForkParams, SnapshotKind,
};
use http_body_util::BodyExt;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;

/// Parse `HOST:GUEST[/tcp|/udp]` (clap value parser for `-p`).
pub fn parse_port(s: &str) -> Result<PublishedPort, String> {
    let (ports, protocol) = match s.rsplit_once('/') {
        Some((p, "tcp")) => (p, PortProtocol::Tcp),
        Some((p, "udp")) => (p, PortProtocol::Udp),
        Some((_, other)) => return Err(format!("protocol must be tcp or udp, got {other:?}")),
        None => (s, PortProtocol::Tcp),
    };
    let port = |v: &str| match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{v:?} is not a port (1-65535)")),
    };
    let Some((host, guest)) = ports.split_once(':') else {
        return Err(format!("expected HOST:GUEST[/udp], got {s:?}"));
    };
    Ok(PublishedPort {
        host_port: port(host)?,
        guest_port: port(guest)?,
        protocol,
    })
}

/// Parse `K=V` (clap value parser for `--env`).
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Instance name: lowercase letters, digits, dashes.
    pub name: String,
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    pub memory: Option<u32>,
    /// Environment variable for the guest command (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Image: the guest image ("default"), or an OCI image pulled with
    /// `forkvm image pull` (e.g. `nginx:1.25`).
    #[arg(long)]
    pub image: Option<String>,
    /// OCI images: size of the writable disk (e.g. `10G`; default 4G).
    #[arg(long)]
    pub overlay_size: Option<String>,
    /// OCI images: replace the image's entrypoint (its cmd is dropped
    /// unless a command follows `--`).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Do not attach a network interface.
    #[arg(long)]
    pub no_network: bool,
    /// Keep the guest's traffic inside the daemon's namespace (no NAT out).
    #[arg(long)]
    pub no_egress: bool,
    /// Publish a port: HOST:GUEST, or HOST:GUEST/udp (repeatable).
    #[arg(long = "publish", short = 'p', value_parser = parse_port)]
    pub publish: Vec<PublishedPort>,
    /// Command the guest runs (after `--`); for an OCI image, its cmd.
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

impl RunArgs {
    pub fn to_params(&self) -> InstanceCreateParams {
        InstanceCreateParams {
            name: self.name.clone(),
            image: self.image.clone(),
            vcpus: self.vcpus,
            memory_mb: self.memory,
            env: (!self.env.is_empty()).then(|| self.env.iter().cloned().collect()),
            cmd: (!self.cmd.is_empty()).then(|| self.cmd.clone()),
            entrypoint: self.entrypoint.clone().map(|e| vec![e]),
            overlay_size: self.overlay_size.clone(),
            network: (self.no_network || self.no_egress).then(|| NetworkParams {
                unsupported: Default::default(),
                enabled: self.no_network.then_some(false),
                egress: self.no_egress.then_some(EgressParam::Direct(false)),
            }),
            ports: self.publish.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    /// Instance id or name.
    pub id: String,
    /// Kill the command after this many seconds.
    #[arg(long)]
    pub timeout: Option<u32>,
    /// Environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Send this process's stdin to the command.
    #[arg(short = 'i', long = "interactive")]
    pub stdin: bool,
    /// Run on a terminal (with -i: this terminal, in raw mode).
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
    /// The command and its arguments (`--` before it is optional).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

pub async fn run(c: &Client, json: bool, a: &RunArgs) -> anyhow::Result<ExitCode> {
    let watch = crate::progress::boot(c, &a.name).await;
    let inst = c.create(&a.to_params()).await;
    drop(watch);
    let inst = inst?;
    if json {
        output::print_json(&inst)?;
    } else {
        print!("{}", output::instance_summary(&inst));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn ps(
    c: &Client,
    json: bool,
    state: Option<&str>,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let want = state
        .map(|s| {
            forkvm_core::InstanceState::parse(s).with_context(|| {
                format!("unknown state {s:?} (Created, Initializing, Running, Paused, Shutdown, Stopped, Standby, Unknown)")
            })
        })
        .transpose()?;
    let mut list = c.list().await?;
    if let Some(w) = want {
        list.retain(|i| i.state.as_str() == w.as_str());
    }
    if quiet {
        for i in &list {
            println!("{}", i.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if json {
        output::print_json(&list)?;
    } else {
        print!("{}", output::instances_table(&list, chrono::Utc::now()));
    }
    Ok(ExitCode::SUCCESS)
}

/// `inspect` is JSON by nature (like `docker inspect`).
pub async fn inspect(c: &Client, id: &str) -> anyhow::Result<ExitCode> {
    output::print_json(&c.get(id).await?)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn start(c: &Client, json: bool, id: &str) -> anyhow::Result<ExitCode> {
    let inst = c.start(id).await?;
    if json {
        output::print_json(&inst)?;
    } else {
        println!("{} {}", inst.name, inst.state.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn stop(c: &Client, json: bool, id: &str) -> anyhow::Result<ExitCode> {
    let inst = c.stop(id).await?;
    if json {
        output::print_json(&inst)?;
    } else {
        println!("{} {}", inst.name, inst.state.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn standby(c: &Client, json: bool, id: &str) -> anyhow::Result<ExitCode> {
    let inst = c.standby(id).await?;
    if json {
        output::print_json(&inst)?;
    } else {
        println!("{} {}", inst.name, inst.state.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn restore(c: &Client, json: bool, id: &str) -> anyhow::Result<ExitCode> {
    let inst = c.restore(id).await?;
    if json {
        output::print_json(&inst)?;
    } else {
        println!("{} {}", inst.name, inst.state.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

/// `--target-state` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetState {
    Running,
    Standby,
    Stopped,
}

impl From<TargetState> for ForkTargetState {
    fn from(s: TargetState) -> Self {
        match s {
            TargetState::Running => Self::Running,
            TargetState::Standby => Self::Standby,
            TargetState::Stopped => Self::Stopped,
        }
    }
}

/// Options shared by `fork` and `snapshot fork`.
#[derive(Debug, Clone, clap::Args)]
pub struct ForkOpts {
    /// Name of the fork; with --count, forks are named NAME-1 … NAME-N.
    #[arg(long)]
    pub name: String,
    /// Make N forks (1-64).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub count: Option<u32>,
    /// Final state of the forks.
    #[arg(long, value_enum, ignore_case = true)]
    pub target_state: Option<TargetState>,
    /// Return as soon as the forks run, without waiting for their network.
    #[arg(long)]
    pub no_wait: bool,
    /// Publish a port for the fork (single forks): HOST:GUEST[/udp]
    /// (repeatable). Forks never inherit their source's ports.
    #[arg(long = "publish", short = 'p', value_parser = parse_port)]
    pub publish: Vec<PublishedPort>,
}

impl ForkOpts {
    /// `wait_for_network` is only sent when it differs from the default (true).
    fn wait_for_network(&self) -> Option<bool> {
        self.no_wait.then_some(false)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ForkArgs {
    /// Source instance id or name.
    pub source: String,
    #[command(flatten)]
    pub opts: ForkOpts,
    /// Allow forking a Running source (it is paused briefly).
    #[arg(long)]
    pub from_running: bool,
}

impl ForkArgs {
    pub fn to_params(&self) -> InstanceForkParams {
        InstanceForkParams {
            name: self.opts.name.clone(),
            from_running: self.from_running.then_some(true),
            target_state: self.opts.target_state.map(Into::into),
            count: self.opts.count,
            wait_for_network: self.opts.wait_for_network(),
            handoff: None,
            ports: self.opts.publish.clone(),
            unsupported: Default::default(),
        }
    }
}

pub async fn fork(c: &Client, json: bool, a: &ForkArgs) -> anyhow::Result<ExitCode> {
    let names: Vec<String> = match a.opts.count {
        Some(n) => (1..=n).map(|i| format!("{}-{i}", a.opts.name)).collect(),
        None => vec![a.opts.name.clone()],
    };
    let watch = crate::progress::forks(c, names).await;
    let resp = c.fork(&a.source, &a.to_params()).await;
    drop(watch);
    let resp = resp?;
    print_forks(json, resp)
}

/// Print forks as a table (errors on stderr) or JSON as the API answered;
/// exit 1 if any fork of a batch failed.
fn print_forks(json: bool, resp: ForkResponse) -> anyhow::Result<ExitCode> {
    if json {
        output::print_json(&resp)?;
    }
    let outcomes = match resp {
        ForkResponse::One(i) => vec![ForkOutcome::Created(i)],
        ForkResponse::Many(v) => v,
    };
    if !json {
        print!("{}", output::forks_table(&outcomes));
    }
    let mut failed = false;
    for o in &outcomes {
        if let ForkOutcome::Failed(f) = o {
            eprintln!("error: {}: {} ({})", f.name, f.error.message, f.error.code);
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot an instance (memory and device state; a Running source pauses briefly).
    Create {
        /// Instance id or name.
        id: String,
        /// Snapshot name: lowercase letters, digits, dashes.
        #[arg(long)]
        name: Option<String>,
    },
    /// List snapshots.
    Ls,
    /// Delete snapshots.
    Rm {
        /// Snapshot ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Fork new instances from a snapshot.
    Fork {
        /// Snapshot id or name.
        snapshot: String,
        #[command(flatten)]
        opts: ForkOpts,
    },
}

pub async fn snapshot(c: &Client, json: bool, cmd: &SnapshotCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCmd::Create { id, name } => {
            let p = SnapshotCreateParams {
                unsupported: Default::default(),
                kind: SnapshotKind::Standby,
                name: name.clone(),
                tags: None,
                compression: None,
            };
            let s = c.create_snapshot(id, &p).await?;
            if json {
                output::print_json(&s)?;
            } else {
                print!("{}", output::snapshots_table(&[s], chrono::Utc::now()));
            }
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCmd::Ls => {
            let list = c.list_snapshots().await?;
            if json {
                output::print_json(&list)?;
            } else {
                print!("{}", output::snapshots_table(&list, chrono::Utc::now()));
            }
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCmd::Rm { ids } => {
            let mut failed = false;
            let mut deleted = Vec::new();
            for id in ids {
                match c.delete_snapshot(id).await {
                    Ok(()) => deleted.push(id.clone()),
                    Err(e @ ClientError::Connect { .. }) => return Err(e.into()),
                    Err(e) => {
                        eprintln!("error: {id}: {e}");
                        failed = true;
                    }
                }
            }
            if json {
                output::print_json(&deleted)?;
            } else {
                for id in &deleted {
                    println!("{id}");
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        SnapshotCmd::Fork { snapshot, opts } => {
            let p = SnapshotForkParams {
                unsupported: Default::default(),
                name: opts.name.clone(),
                target_hypervisor: None,
                target_state: opts.target_state.map(Into::into),
                count: opts.count,
                wait_for_network: opts.wait_for_network(),
                handoff: None,
                ports: opts.publish.clone(),
            };
            let resp = c.fork_snapshot(snapshot, &p).await?;
            print_forks(json, resp)
        }
    }
}

/// Delete each instance; keep going on failure and exit 1 if any failed.
/// `--force` treats "not found" as success (like `rm -f`).
pub async fn rm(c: &Client, json: bool, ids: &[String], force: bool) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    let mut deleted = Vec::new();
    for id in ids {
        match c.delete(id).await {
            Ok(()) => deleted.push(id.clone()),
            Err(ClientError::Api { code, .. }) if force && code == "not_found" => {}
            Err(e @ ClientError::Connect { .. }) => return Err(e.into()),
            Err(e) => {
                eprintln!("error: {id}: {e}");
                failed = true;
            }
        }
    }
    if json {
        output::print_json(&deleted)?;
    } else {
        for id in &deleted {
            println!("{id}");
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn logs(c: &Client, id: &str, q: &LogsQuery) -> anyhow::Result<ExitCode> {
    if !q.follow {
        let text = c.logs(id, q).await?;
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    // Followed: bytes as they come, until the instance stops.
    let (mut body, _conn) = c.stream(&q.path(id), "text/plain").await?;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the log stream")?;
        if let Some(bytes) = frame.data_ref() {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes)?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit status of `forkvm exec` when the guest command timed out (as timeout(1)).
pub const EXIT_TIMED_OUT: u8 = 124;

/// `forkvm exec`: streamed and byte-exact over the WebSocket exec; with
/// `--json`, the buffered JSON exec (its output as UTF-8 text).
pub async fn exec(c: &Client, json: bool, a: &ExecArgs) -> anyhow::Result<ExitCode> {
    if !json {
        return crate::exec_stream::exec(c, a).await;
    }
    let stdin = if a.stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin (must be UTF-8)")?;
        Some(s)
    } else {
        None
    };
    let params = ExecParams {
        unsupported: Default::default(),
        command: a.command.clone(),
        env: (!a.env.is_empty()).then(|| a.env.iter().cloned().collect::<BTreeMap<_, _>>()),
        stdin,
        timeout_s: a.timeout,
        encoding: Default::default(),
    };
    let r = c.exec(&a.id, &params).await?;
    if json {
        output::print_json(&r)?;
    } else {
        std::io::stdout().write_all(r.stdout.as_bytes())?;
        std::io::stdout().flush()?;
        std::io::stderr().write_all(r.stderr.as_bytes())?;
    }
    if r.timed_out {
        eprintln!("error: command timed out after {} ms", r.duration_ms);
        return Ok(ExitCode::from(EXIT_TIMED_OUT));
    }
    Ok(ExitCode::from(exit_byte(r.exit_code)))
}

/// Map a guest exit code to ours: 0..=255 as is, anything else (e.g. -1 for
/// "killed") becomes 1 so failure is never reported as success.
pub fn exit_byte(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(1)
}

/// `forkvm wait`: exits 0 when the state was reached, 1 otherwise.
pub async fn wait(
    c: &Client,
    json: bool,
    id: &str,
    state: &str,
    timeout: &str,
) -> anyhow::Result<ExitCode> {
    let r = c.wait(id, state, timeout).await?;
    if json {
        crate::output::print_json(&r)?;
    } else if r.timed_out {
        eprintln!("{id}: still {:?} after {timeout}", r.state);
    } else {
        println!("{id}: {:?}", r.state);
        if let Some(e) = &r.state_error {
            eprintln!("{id}: {e}");
        }
    }
    let reached = !r.timed_out && format!("{:?}", r.state) == state;
    Ok(if reached {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), "".into()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("nope").is_err());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_byte(0), 0);
        assert_eq!(exit_byte(3), 3);
        assert_eq!(exit_byte(255), 255);
        assert_eq!(exit_byte(256), 1);
        assert_eq!(exit_byte(-1), 1);
    }
}
