//! The CLI as a user drives it: remote mode (`--host` + FORKVM_API_TOKEN
//! against the TCP listener, exec and cp included), `ps --state/-q`,
//! `--format yaml`, shell completions and man pages.

use anyhow::{Context, Result, ensure};
use forkvm_e2e::{TestEnv, forkvm_bin, s};
use serde_json::json;
use std::process::{Command, Output};

const PORT: u16 = 18092;
const TOKEN: &str = "cli-remote-token-0123456789abcdef";

/// `forkvm --host … ARGS` inside the test's namespace (where the listener is).
fn remote(env: &TestEnv, token: &str, args: &[&str]) -> Result<Output> {
    let bin = forkvm_bin();
    let host = format!("http://127.0.0.1:{PORT}");
    let mut argv = vec![bin.to_str().context("utf-8")?, "--host", &host];
    argv.extend_from_slice(args);
    Ok(env
        .in_netns(&argv)
        .env("FORKVM_API_TOKEN", token)
        .env_remove("FORKVM_SOCKET")
        .output()?)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_mode_filters_formats_completions_and_man_pages() -> Result<()> {
    let env = TestEnv::start_tcp(PORT, TOKEN).await?;
    let inst = env.create(json!({"name": "cli"})).await?;
    let id = s(&inst, "id");

    let o = remote(&env, TOKEN, &["ps", "-q"])?;
    ensure!(o.status.success() && text(&o).trim() == id, "{}", text(&o));
    let o = remote(&env, TOKEN, &["ps", "--state", "Stopped", "-q"])?;
    ensure!(o.status.success() && o.stdout.is_empty(), "{}", text(&o));
    let o = remote(&env, TOKEN, &["ps", "--state", "Bogus"])?;
    ensure!(
        !o.status.success() && text(&o).contains("unknown state"),
        "{}",
        text(&o)
    );
    let o = remote(&env, TOKEN, &["--format", "yaml", "inspect", "cli"])?;
    ensure!(
        o.status.success() && text(&o).contains("name: cli"),
        "{}",
        text(&o)
    );
    // exec and cp ride WebSockets through the same listener and token.
    let o = remote(
        &env,
        TOKEN,
        &["exec", "cli", "--", "sh", "-c", "echo remote-$((2+3))"],
    )?;
    ensure!(
        o.status.success() && text(&o).contains("remote-5"),
        "{}",
        text(&o)
    );
    let local = env.root.join("hosts.copy");
    let o = remote(
        &env,
        TOKEN,
        &["cp", "cli:/etc/hostname", local.to_str().context("utf-8")?],
    )?;
    ensure!(o.status.success(), "{}", text(&o));
    ensure!(!std::fs::read(&local)?.is_empty());
    // run and fork --count (their progress reads the event stream while
    // the request runs; hidden here: stderr is not a terminal).
    let o = remote(&env, TOKEN, &["run", "cli2"])?;
    ensure!(o.status.success(), "{}", text(&o));
    let o = remote(
        &env,
        TOKEN,
        &[
            "fork",
            "cli",
            "--name",
            "cf",
            "--count",
            "2",
            "--from-running",
        ],
    )?;
    ensure!(
        o.status.success() && text(&o).contains("cf-2"),
        "{}",
        text(&o)
    );
    let o = remote(&env, TOKEN, &["ps", "--state", "Running", "-q"])?;
    ensure!(text(&o).lines().count() == 4, "{}", text(&o));
    // A wrong token is refused, and says so.
    let o = remote(&env, "wrong-token-0123456789abcdef", &["ps"])?;
    ensure!(
        !o.status.success() && text(&o).contains("token"),
        "{}",
        text(&o)
    );

    let o = Command::new(forkvm_bin())
        .args(["completions", "bash"])
        .output()?;
    ensure!(
        o.status.success() && text(&o).contains("forkvm"),
        "{}",
        text(&o)
    );
    let man = env.root.join("man");
    let o = Command::new(forkvm_bin()).arg("man").arg(&man).output()?;
    ensure!(o.status.success(), "{}", text(&o));
    let page = std::fs::read_to_string(man.join("forkvm.1"))?;
    ensure!(page.contains(".TH forkvm"), "{page}");
    ensure!(man.join("forkvm-fork.1").exists(), "no page per command");
    Ok(())
}
