//! The official hypeman Python client (from PyPI) against a real daemon over
//! TCP with a bearer token: create, list, get, stop, start, logs, delete;
//! fork, standby, restore, snapshots; OCI images from a registry.

use anyhow::{Context, Result};
use forkvm_e2e::TestEnv;
use std::path::PathBuf;

fn python() -> Result<PathBuf> {
    let venv = std::env::var("FORKVM_TEST_VENV")
        .map(PathBuf::from)
        .context(
            "FORKVM_TEST_VENV unset: scripts/test.sh creates the venv with the hypeman client",
        )?;
    Ok(venv.join("bin").join("python3"))
}

async fn run_script(name: &str, ok_line: &str) -> Result<()> {
    let token = format!("tok-{:032x}", rand::random::<u128>());
    let env = TestEnv::start_tcp(4973, &token).await?;
    run_in(&env, &token, name, ok_line, &[])
}

/// Runs `tests/python/<name>` with the client pointed at `env`'s daemon.
fn run_in(
    env: &TestEnv,
    token: &str,
    name: &str,
    ok_line: &str,
    vars: &[(&str, &str)],
) -> Result<()> {
    let py = python()?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name);
    let out = env
        .in_netns(&[
            py.to_str().unwrap_or("python3"),
            script.to_str().unwrap_or_default(),
        ])
        .env("HYPEMAN_BASE_URL", "http://127.0.0.1:4973")
        .env("HYPEMAN_API_KEY", token)
        .envs(vars.iter().copied())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{name} failed:\n{stdout}\n{stderr}\n--- daemon log ---\n{}",
        env.daemon_log()
    );
    assert!(stdout.contains(ok_line), "{stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn official_hypeman_client_works_over_tcp_with_token() -> Result<()> {
    run_script("hypeman_client_check.py", "hypeman client: ok").await
}

/// The client's fork, standby, restore and snapshot calls.
#[tokio::test(flavor = "multi_thread")]
async fn official_hypeman_client_forks_and_snapshots() -> Result<()> {
    run_script("hypeman_fork_check.py", "hypeman fork client: ok").await
}

/// The client's image calls: pull from a registry in the test's
/// namespace, wait for ready, boot and fork an instance of it.
#[tokio::test(flavor = "multi_thread")]
async fn official_hypeman_client_pulls_an_image_and_forks_an_instance_of_it() -> Result<()> {
    let token = format!("tok-{:032x}", rand::random::<u128>());
    let env = TestEnv::start_tcp(4973, &token).await?;
    let reg = forkvm_e2e::registry::Registry::start(&env)?;
    let image = reg.push_fixture(&env, "forkvm/py", "1")?;
    run_in(
        &env,
        &token,
        "hypeman_image_check.py",
        "hypeman image client: ok",
        &[("HYPEMAN_IMAGE", &image)],
    )
}
