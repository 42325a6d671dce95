//! Watching the daemon work: a real Prometheus (Debian's) scrapes
//! `/metrics` over the TCP listener and the fork-stage series are queried
//! back from it; `forkvm events` shows a fork's transitions as they happen
//! and `forkvm wait` returns when a `wait_for_network: false` fork runs.
//! Everything stays in the test's own network namespace.

use anyhow::{Context, Result, bail, ensure};
use forkvm_e2e::{TestEnv, forkvm_bin, s, wait_for};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PORT: u16 = 18091;
const TOKEN: &str = "metrics-test-token-0123456789abcdef";
const PROM: &str = "127.0.0.1:19090";

/// A child process killed (and reaped) when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prometheus in the test's namespace, scraping the daemon every second.
fn start_prometheus(env: &TestEnv) -> Result<Reaped> {
    let dir = env.root.join("prometheus");
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: forkvm\n    authorization:\n      credentials: {TOKEN}\n\
             \x20   static_configs:\n      - targets: ['127.0.0.1:{PORT}']\n"
        ),
    )?;
    let child = env
        .in_netns(&[
            "prometheus",
            &format!("--config.file={}", cfg.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address={PROM}"),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log"))?)
        .spawn()
        .context("starting prometheus (Debian package `prometheus`)")?;
    Ok(Reaped(child))
}

/// One instant-vector PromQL query against that Prometheus: the sum of the
/// values, None while it has no sample.
fn promql(env: &TestEnv, query: &str) -> Option<f64> {
    let out = env
        .in_netns(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-G",
            &format!("http://{PROM}/api/v1/query"),
            "--data-urlencode",
            &format!("query={query}"),
        ])
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let result = v["data"]["result"].as_array()?;
    if result.is_empty() {
        return None;
    }
    result
        .iter()
        .map(|r| r["value"][1].as_str().and_then(|x| x.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_fork_stage_histograms() -> Result<()> {
    let env = TestEnv::start_tcp(PORT, TOKEN).await?;
    let src = env.create(json!({"name": "prom"})).await?;
    let (st, v) = env
        .request(
            "POST",
            &format!("/instances/{}/fork", s(&src, "id")),
            Some(json!({"name": "pf", "from_running": true, "count": 3})),
        )
        .await?;
    ensure!(st == 201, "{v}");
    let forks = v.as_array().context("a list of forks")?;
    let mailbox = forks
        .iter()
        .filter(|f| f["handoff"]["path"] == "mailbox")
        .count();
    ensure!(forks.len() == 3 && mailbox > 0, "{v}");
    let _prom = start_prometheus(&env)?;
    let series =
        r#"forkvm_fork_stage_duration_seconds_count{kind="fork",stage="total",path="mailbox"}"#;
    let n = wait_for(
        "Prometheus to scrape the forks",
        Duration::from_secs(90),
        async || promql(&env, series),
    )
    .await
    .with_context(|| {
        std::fs::read_to_string(env.root.join("prometheus/log")).unwrap_or_default()
    })?;
    ensure!(
        n == mailbox as f64,
        "{series} = {n}, forks by mailbox: {mailbox}"
    );
    let running = promql(&env, r#"forkvm_instances{state="Running"}"#);
    ensure!(running == Some(4.0), "instances Running: {running:?}");
    let fork_requests = promql(
        &env,
        r#"forkvm_api_request_duration_seconds_count{method="POST",route="/instances/{id}/fork",status="201"}"#,
    );
    ensure!(
        fork_requests == Some(1.0),
        "fork requests: {fork_requests:?}"
    );
    Ok(())
}

/// Lines of `forkvm events --json` as they come, read on a thread.
fn follow_events(
    env: &TestEnv,
    instance: &str,
) -> Result<(Reaped, std::sync::mpsc::Receiver<Value>)> {
    let mut child = Command::new(forkvm_bin())
        .args(["--socket"])
        .arg(&env.socket)
        .args(["--json", "events", "--instance", instance])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("forkvm events")?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    Ok((Reaped(child), rx))
}

#[tokio::test(flavor = "multi_thread")]
async fn events_show_a_forks_transitions_and_wait_returns_when_it_runs() -> Result<()> {
    let env = TestEnv::start().await?;
    let src = env.create(json!({"name": "ev"})).await?;
    // The stream is filtered by name before the fork exists.
    let (_events, rx) = follow_events(&env, "ev-async")?;
    // The stream is live once the daemon counts its subscriber.
    wait_for(
        "the event stream to connect",
        Duration::from_secs(10),
        async || {
            let (_, m) = env.request("GET", "/metrics", None).await.ok()?;
            m.as_str()?
                .contains("forkvm_event_subscribers 1")
                .then_some(())
        },
    )
    .await?;
    let (st, f) = env
        .request(
            "POST",
            &format!("/instances/{}/fork", s(&src, "id")),
            Some(json!({"name": "ev-async", "from_running": true, "wait_for_network": false})),
        )
        .await?;
    ensure!(st == 201, "{f}");
    let waited = Command::new(forkvm_bin())
        .arg("--socket")
        .arg(&env.socket)
        .args([
            "--json",
            "wait",
            "ev-async",
            "--state",
            "Running",
            "--timeout",
            "60s",
        ])
        .output()?;
    ensure!(
        waited.status.success(),
        "wait: {}",
        String::from_utf8_lossy(&waited.stderr)
    );
    let w: Value = serde_json::from_slice(&waited.stdout)?;
    ensure!(w["state"] == "Running", "{w}");
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &Value| e["type"] == "instance_state" && e["to"] == "Running")
    {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(e) => seen.push(e),
            Err(_) => bail!("no Running event for the fork; saw {seen:?}"),
        }
    }
    ensure!(
        seen.iter().all(|e| e["instance_name"] == "ev-async"),
        "the filter let through {seen:?}"
    );
    ensure!(
        seen.iter()
            .any(|e| e["type"] == "handoff" && e["outcome"] == "ok"),
        "no handoff event before Running: {seen:?}"
    );
    let seqs: Vec<u64> = seen.iter().filter_map(|e| e["seq"].as_u64()).collect();
    ensure!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "out of order: {seqs:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_prints_new_console_lines_and_ends_when_the_instance_stops() -> Result<()> {
    let env = TestEnv::start().await?;
    let inst = env.create(json!({"name": "tail"})).await?;
    let id = s(&inst, "id");
    let mut child = Command::new(forkvm_bin())
        .arg("--socket")
        .arg(&env.socket)
        .args(["logs", "-f", "--tail", "1", &id])
        .stdout(Stdio::piped())
        .spawn()
        .context("forkvm logs -f")?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut child = Reaped(child);
    for n in 0..3 {
        env.exec_ok(
            &id,
            &[
                "sh",
                "-c",
                &format!("echo followed-line-{n} > /dev/console"),
            ],
        )
        .await?;
        let want = format!("followed-line-{n}");
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .with_context(|| format!("{want} never came"))?;
            if line.contains(&want) {
                break;
            }
        }
    }
    let (st, v) = env
        .request("POST", &format!("/instances/{id}/stop"), None)
        .await?;
    ensure!(st == 200, "{v}");
    let status = wait_for("logs -f to end", Duration::from_secs(20), async || {
        child.0.try_wait().ok().flatten()
    })
    .await?;
    ensure!(status.success(), "{status}");
    // QEMU's own log is there too (empty when QEMU had nothing to say).
    let (st, _) = env
        .request("GET", &format!("/instances/{id}/logs?source=vmm"), None)
        .await?;
    ensure!(st == 200);
    Ok(())
}
