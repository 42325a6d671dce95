//! Schema-driven fuzzing of the REST API from its own OpenAPI document
//! (schemathesis, from PyPI, installed by scripts/test.sh): for a bounded
//! time, generated valid and invalid requests against every operation must
//! never get a 5xx, every answer must be documented and JSON, and nothing may
//! change: the guest-memory budget is 1 MiB, so no request can boot a VM.
//!
//! `FORKVM_FUZZ_SECONDS` (default 60) sets the budget; `FORKVM_FUZZ_SEED`
//! replays a run (schemathesis prints its seed).

use anyhow::{Context, Result, ensure};
use forkvm_e2e::TestEnv;
use std::path::PathBuf;
use std::process::Stdio;

const PORT: u16 = 18090;
const TOKEN: &str = "fuzz-token-0123456789abcdef-0123456789";

fn schemathesis() -> Result<PathBuf> {
    let venv = std::env::var("FORKVM_TEST_VENV")
        .context("FORKVM_TEST_VENV unset: scripts/test.sh creates the venv with schemathesis")?;
    Ok(PathBuf::from(venv).join("bin").join("schemathesis"))
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(
                p.strip_prefix(dir)
                    .map(|r| r.display().to_string())
                    .unwrap_or_default(),
            );
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzzing_the_api_from_its_openapi_document_finds_no_server_errors() -> Result<()> {
    let st = schemathesis()?;
    ensure!(st.exists(), "{} missing: run scripts/test.sh", st.display());
    let mut env = TestEnv::start_tcp(PORT, TOKEN).await?;
    env.kill_daemon()?;
    env.daemon_env
        .push(("FORKVM_MAX_GUEST_MEMORY_MB".into(), "1".into()));
    env.spawn_daemon()?;
    env.wait_ready().await?;
    let links_before = env.links()?;
    let data_before = tree(&env.data_dir);

    let seconds = std::env::var("FORKVM_FUZZ_SECONDS").unwrap_or_else(|_| "60".into());
    let url = format!("http://127.0.0.1:{PORT}/openapi.json");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let mut args = vec![
        st.to_string_lossy().into_owned(),
        "run".into(),
        url,
        "-H".into(),
        auth,
        "--checks".into(),
        "not_a_server_error,status_code_conformance,content_type_conformance".into(),
        // An endless stream (server-sent events): its own test reads it.
        "--exclude-path".into(),
        "/events".into(),
        "--max-time".into(),
        seconds,
        "--workers".into(),
        "1".into(),
        "--suppress-health-check".into(),
        "all".into(),
        "--no-color".into(),
    ];
    if let Ok(seed) = std::env::var("FORKVM_FUZZ_SEED") {
        args.extend(["--seed".into(), seed]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = env
        .in_netns(&argv)
        .env("SCHEMATHESIS_HOOKS", "")
        // Its cache directory lands in the test's own, removed afterwards.
        .current_dir(&env.root)
        .stdin(Stdio::null())
        .output()
        .context("running schemathesis")?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    if !out.status.success() {
        // schemathesis also exits non-zero on its own internal errors (seen
        // once: a hypothesis "AST constructor recursion depth" error while
        // describing a strategy). Those say nothing about forkvm; anything
        // in the "Failures" section, or any other error, does.
        let internal_only = !report.contains("Failures:")
            && report.contains("Runtime Error")
            && !report.contains("Network Error");
        ensure!(
            internal_only,
            "schemathesis found problems ({}):\n{report}",
            out.status
        );
        eprintln!("schemathesis reported only an internal error; judging by the checks below");
    }
    ensure!(
        report.contains("generated"),
        "schemathesis ran no test cases:\n{report}"
    );

    // Nothing changed: no instance, snapshot, VM, TAP or file appeared.
    let (st, v) = env.request("GET", "/health", None).await?;
    ensure!(st == 200, "daemon unhealthy after fuzzing: {v}");
    let (_, list) = env.request("GET", "/instances", None).await?;
    ensure!(list.as_array().is_some_and(Vec::is_empty), "{list}");
    let (_, snaps) = env.request("GET", "/snapshots", None).await?;
    ensure!(snaps.as_array().is_some_and(Vec::is_empty), "{snaps}");
    ensure!(env.qemu_pids().is_empty(), "a VM was started");
    ensure!(env.links()? == links_before, "links changed");
    let data_after: Vec<String> = tree(&env.data_dir)
        .into_iter()
        .filter(|p| !p.starts_with("forkvm.db"))
        .collect();
    let data_before: Vec<String> = data_before
        .into_iter()
        .filter(|p| !p.starts_with("forkvm.db"))
        .collect();
    ensure!(
        data_after == data_before,
        "data dir changed: {data_before:?} -> {data_after:?}"
    );
    Ok(())
}
