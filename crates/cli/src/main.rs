//! `forkvm`: the daemon (`forkvm serve`) and the client commands that talk to
//! it over its unix socket (`run`, `ps`, `inspect`, `exec`, `logs`, `start`,
//! `stop`, `standby`, `restore`, `fork`, `snapshot …`, `rm`), plus `image build`
//! and `bench fork` / `bench density` (self-contained fork benchmarks with
//! their own daemon).

mod bench;
mod client;
mod commands;
mod cp_cmd;
mod events_cmd;
mod exec_stream;
mod image_cmd;
mod output;
mod progress;
mod remote;
mod serve;

use clap::{Parser, Subcommand};
use client::Client;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "forkvm", version, about = "forkvm: microVMs that fork")]
struct Cli {
    /// Daemon unix socket (served by `serve`, used by the client commands).
    #[arg(
        long,
        global = true,
        env = "FORKVM_SOCKET",
        default_value = "/run/forkvm/forkvm.sock"
    )]
    socket: PathBuf,
    /// Machine-readable JSON output (as `--format json`).
    #[arg(long, global = true)]
    json: bool,
    /// Output: `table` (default for lists), `json` or `yaml`.
    #[arg(long, global = true, value_enum)]
    format: Option<Format>,
    /// A remote daemon's TCP listener, `https://HOST:PORT` (its token from
    /// FORKVM_API_TOKEN) instead of the unix socket; `http://` only to a
    /// loopback address.
    #[arg(long, global = true, env = "FORKVM_HOST")]
    host: Option<String>,
    /// CA certificate(s) (PEM) to trust for an https --host instead of the
    /// system's roots.
    #[arg(long, global = true, env = "FORKVM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the daemon.
    Serve(serve::ServeArgs),
    /// Create and start an instance.
    Run(commands::RunArgs),
    /// List instances.
    Ps {
        /// Only instances in this state (Running, Standby, Stopped, …).
        #[arg(long)]
        state: Option<String>,
        /// Only their ids, one per line.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Shell completions for bash, zsh, fish, elvish or powershell, on stdout.
    Completions { shell: clap_complete::Shell },
    /// Man pages (forkvm.1 and one per command) into a directory.
    Man {
        /// Where to write them.
        dir: PathBuf,
    },
    /// Show one instance as JSON.
    Inspect {
        /// Instance id or name.
        id: String,
    },
    /// Run a command in an instance; exits with the command's exit code.
    Exec(commands::ExecArgs),
    /// Print an instance's serial console output.
    Logs {
        /// Instance id or name.
        id: String,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        /// Keep printing new output until the instance stops.
        #[arg(short, long)]
        follow: bool,
        /// `app` (the serial console) or `vmm` (QEMU's own log).
        #[arg(long, default_value = "app")]
        source: String,
    },
    /// Wait until an instance is in a state (or failed, or the time is up).
    Wait {
        /// Instance id or name.
        id: String,
        /// Created, Initializing, Running, Paused, Shutdown, Stopped, Standby.
        #[arg(long, default_value = "Running")]
        state: String,
        /// Go duration, at most 5m.
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Copy files or directories into or out of a running instance, as
    /// `docker cp`: `forkvm cp LOCAL NAME:PATH`, `forkvm cp NAME:PATH LOCAL`.
    Cp(cp_cmd::CpArgs),
    /// Stream what happens (state changes, handoffs, snapshots) as it happens.
    Events {
        /// Only events about this instance (id or name).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Start a stopped instance.
    Start {
        /// Instance id or name.
        id: String,
    },
    /// Stop an instance.
    Stop {
        /// Instance id or name.
        id: String,
    },
    /// Snapshot a Running instance and stop its VMM (restore brings it back).
    Standby {
        /// Instance id or name.
        id: String,
    },
    /// Bring a Standby instance back to Running.
    Restore {
        /// Instance id or name.
        id: String,
    },
    /// Fork an instance into one or more new instances.
    Fork(commands::ForkArgs),
    /// Snapshots: create, list, delete, fork from.
    Snapshot {
        #[command(subcommand)]
        cmd: commands::SnapshotCmd,
    },
    /// Delete instances.
    Rm {
        /// Instance ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Ignore instances that do not exist.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Guest and OCI images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Benchmarks (run their own daemon in their own network namespace).
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Fork latency per handoff path, fan-out and memory scaling.
    Fork(bench::BenchForkArgs),
    /// Copy-on-write density: forks of a source with touched memory vs a
    /// fresh one, and a fan-out to many forks at once.
    Density(bench::BenchDensityArgs),
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Build the default guest image (kernel + initramfs with the agent).
    Build(image_cmd::ImageBuildArgs),
    /// Pull an OCI image from a registry and convert it (waits until ready).
    Pull(image_cmd::ImagePullArgs),
    /// Import an OCI layout or `docker save` archive from this host.
    Import(image_cmd::ImageImportArgs),
    /// List OCI images.
    Ls,
    /// Show one OCI image as JSON.
    Inspect {
        /// Image reference.
        name: String,
    },
    /// Delete OCI images (refused while an instance or snapshot uses one).
    Rm {
        /// Image references.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn init_logging(default: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // Ignore the error: it only means a subscriber is already set.
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Serve(args) => {
            init_logging("info", args.log_json);
            serve::serve(&cli.socket, args)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Cmd::Image {
            cmd: ImageCmd::Build(args),
        } => {
            init_logging("info", false);
            image_cmd::image_build(args).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Bench {
            cmd: BenchCmd::Fork(args),
        } => {
            init_logging("warn", false);
            bench::fork(cli.json, &args).await
        }
        Cmd::Bench {
            cmd: BenchCmd::Density(args),
        } => {
            init_logging("warn", false);
            bench::density(cli.json, &args).await
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "forkvm", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { dir } => man_pages(&dir).map(|()| ExitCode::SUCCESS),
        cmd => {
            init_logging("warn", false);
            let token = std::env::var("FORKVM_API_TOKEN").unwrap_or_default();
            let remote = cli
                .host
                .as_deref()
                .map(|h| client::Remote::parse(h, &token, cli.tls_ca.as_deref()));
            match remote.transpose() {
                Ok(remote) => client_command(&cli.socket, remote, cli.json, cli.format, cmd).await,
                Err(e) => Err(e.into()),
            }
        }
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", output::safe(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// The commands that talk to a daemon, over its socket or `--host`.
async fn client_command(
    socket: &std::path::Path,
    remote: Option<client::Remote>,
    json: bool,
    format: Option<Format>,
    cmd: Cmd,
) -> anyhow::Result<ExitCode> {
    let c = Client::new(socket).remote(remote);
    let json = json || matches!(format, Some(Format::Json | Format::Yaml));
    let _ = output::YAML.set(format == Some(Format::Yaml));
    match cmd {
        Cmd::Run(a) => commands::run(&c, json, &a).await,
        Cmd::Ps { state, quiet } => commands::ps(&c, json, state.as_deref(), quiet).await,
        Cmd::Inspect { id } => commands::inspect(&c, &id).await,
        Cmd::Exec(a) => commands::exec(&c, json, &a).await,
        Cmd::Logs {
            id,
            tail,
            follow,
            source,
        } => {
            let q = client::LogsQuery {
                tail,
                follow,
                source: Some(source),
            };
            commands::logs(&c, &id, &q).await
        }
        Cmd::Start { id } => commands::start(&c, json, &id).await,
        Cmd::Cp(a) => cp_cmd::cp(&c, &a).await,
        Cmd::Events { instance } => events_cmd::events(&c, json, instance.as_deref()).await,
        Cmd::Wait { id, state, timeout } => commands::wait(&c, json, &id, &state, &timeout).await,
        Cmd::Stop { id } => commands::stop(&c, json, &id).await,
        Cmd::Standby { id } => commands::standby(&c, json, &id).await,
        Cmd::Restore { id } => commands::restore(&c, json, &id).await,
        Cmd::Fork(a) => commands::fork(&c, json, &a).await,
        Cmd::Snapshot { cmd } => commands::snapshot(&c, json, &cmd).await,
        Cmd::Rm { ids, force } => commands::rm(&c, json, &ids, force).await,
        Cmd::Image { cmd } => match cmd {
            ImageCmd::Pull(a) => image_cmd::pull(&c, json, &a).await,
            ImageCmd::Import(a) => image_cmd::import(&c, json, &a).await,
            ImageCmd::Ls => image_cmd::ls(&c, json).await,
            ImageCmd::Inspect { name } => image_cmd::inspect(&c, &name).await,
            ImageCmd::Rm { names } => image_cmd::rm(&c, &names).await,
            ImageCmd::Build(_) => unreachable!("handled above"),
        },
        Cmd::Serve(_) | Cmd::Bench { .. } | Cmd::Completions { .. } | Cmd::Man { .. } => {
            unreachable!("handled above")
        }
    }
}

/// `forkvm man DIR`: forkvm.1 and forkvm-<command>.1, from the clap
/// definitions.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd, dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_exec_and_run() {
        let cli = Cli::try_parse_from([
            "forkvm", "exec", "web", "-e", "A=1", "--", "sh", "-c", "exit 3",
        ])
        .unwrap();
        match cli.cmd {
            Cmd::Exec(a) => {
                assert_eq!(a.id, "web");
                assert_eq!(a.command, vec!["sh", "-c", "exit 3"]);
                assert_eq!(a.env, vec![("A".into(), "1".into())]);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["forkvm", "exec", "web", "ls", "-l"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::Exec(a) if a.command == ["ls", "-l"]));

        let cli = Cli::try_parse_from([
            "forkvm",
            "--json",
            "run",
            "web",
            "--memory",
            "512",
            "--no-network",
            "--",
            "sleep",
            "9",
        ])
        .unwrap();
        assert!(cli.json);
        match cli.cmd {
            Cmd::Run(a) => {
                let p = a.to_params();
                assert_eq!(p.memory_mb, Some(512));
                assert_eq!(
                    p.cmd.as_deref(),
                    Some(&["sleep".to_string(), "9".into()][..])
                );
                assert_eq!(p.network.and_then(|n| n.enabled), Some(false));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["forkvm", "exec", "web"]).is_err());
        assert!(Cli::try_parse_from(["forkvm", "rm"]).is_err());
    }

    #[test]
    fn parses_bench_fork() {
        let cli = Cli::try_parse_from(["forkvm", "bench", "fork"]).unwrap();
        match cli.cmd {
            Cmd::Bench {
                cmd: BenchCmd::Fork(a),
            } => {
                assert_eq!(a.reps, 10);
                assert_eq!(a.fanout, vec![1, 4, 16]);
                assert_eq!(a.sizes, vec![256, 1024]);
                assert!(!a.keep && !cli.json);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "forkvm", "bench", "fork", "--reps", "3", "--fanout", "2,8", "--sizes", "512",
            "--json", "--keep",
        ])
        .unwrap();
        assert!(cli.json);
        assert!(matches!(
            cli.cmd,
            Cmd::Bench { cmd: BenchCmd::Fork(ref a) }
                if a.reps == 3 && a.fanout == [2, 8] && a.sizes == [512] && a.keep
        ));
        for bad in [
            &["forkvm", "bench", "fork", "--reps", "0"][..],
            &["forkvm", "bench", "fork", "--fanout", "65"],
            &["forkvm", "bench", "fork", "--sizes", "64"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_bench_density() {
        let cli = Cli::try_parse_from(["forkvm", "bench", "density"]).unwrap();
        match cli.cmd {
            Cmd::Bench {
                cmd: BenchCmd::Density(a),
            } => {
                assert_eq!(
                    (a.size_mib, a.touch_mib, a.forks, a.rounds),
                    (1024, 600, 4, 5)
                );
                assert_eq!((a.target, a.batch), (64, 4));
                assert_eq!((a.max_guest_memory_mb, a.cow_reserve_percent), (None, None));
                assert!(!a.keep);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "forkvm",
            "bench",
            "density",
            "--size-mib",
            "512",
            "--touch-mib",
            "200",
            "--forks",
            "2",
            "--rounds",
            "5",
            "--target",
            "0",
            "--batch",
            "8",
            "--max-guest-memory-mb",
            "30000",
            "--cow-reserve-percent",
            "10",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        assert!(matches!(
            cli.cmd,
            Cmd::Bench { cmd: BenchCmd::Density(ref a) }
                if a.size_mib == 512 && a.touch_mib == 200 && a.forks == 2 && a.rounds == 5
                    && a.target == 0
                    && a.batch == 8 && a.max_guest_memory_mb == Some(30000)
                    && a.cow_reserve_percent == Some(10)
        ));
        for bad in [
            &["forkvm", "bench", "density", "--forks", "0"][..],
            &["forkvm", "bench", "density", "--forks", "65"],
            &["forkvm", "bench", "density", "--rounds", "0"],
            &["forkvm", "bench", "density", "--size-mib", "64"],
            &["forkvm", "bench", "density", "--cow-reserve-percent", "0"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_fork_and_snapshot() {
        let cli = Cli::try_parse_from([
            "forkvm",
            "fork",
            "src",
            "--name",
            "f",
            "--count",
            "8",
            "--from-running",
            "--target-state",
            "Standby",
            "--no-wait",
        ])
        .unwrap();
        match cli.cmd {
            Cmd::Fork(a) => {
                assert_eq!(a.source, "src");
                let p = a.to_params();
                assert_eq!(p.name, "f");
                assert_eq!(p.count, Some(8));
                assert_eq!(p.from_running, Some(true));
                assert_eq!(
                    p.target_state,
                    Some(forkvm_api::wire::ForkTargetState::Standby)
                );
                assert_eq!(p.wait_for_network, Some(false));
                // the defaults are left to the server
                let v = serde_json::to_value(&p).unwrap();
                assert_eq!(v["wait_for_network"], false);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["forkvm", "fork", "src", "--name", "f"]).unwrap();
        match cli.cmd {
            Cmd::Fork(a) => {
                let v = serde_json::to_value(a.to_params()).unwrap();
                assert_eq!(v, serde_json::json!({"name": "f"}));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &["forkvm", "fork", "src"][..],
            &["forkvm", "fork", "src", "--name", "f", "--count", "0"],
            &["forkvm", "fork", "src", "--name", "f", "--count", "65"],
            &[
                "forkvm",
                "fork",
                "src",
                "--name",
                "f",
                "--target-state",
                "paused",
            ],
            &["forkvm", "snapshot", "rm"],
            &["forkvm", "snapshot", "fork", "s"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from([
            "forkvm", "snapshot", "fork", "warm", "--name", "w", "--count", "3",
        ])
        .unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::Snapshot { cmd: commands::SnapshotCmd::Fork { ref snapshot, ref opts } }
                if snapshot == "warm" && opts.count == Some(3) && !opts.no_wait
        ));
        let cli =
            Cli::try_parse_from(["forkvm", "snapshot", "create", "web", "--name", "warm"]).unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::Snapshot { cmd: commands::SnapshotCmd::Create { ref id, ref name } }
                if id == "web" && name.as_deref() == Some("warm")
        ));
    }
}
