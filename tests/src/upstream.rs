//! An "upstream" network for a test's daemon: a second namespace joined to
//! the daemon's by a veth (daemon side 10.78.0.1/24, upstream 10.78.0.2/24,
//! the daemon namespace's default route pointing at it), serving HTTP
//! (python3's http.server, which logs every client address) and DNS
//! (Debian's dnsmasq, answering `web.test` with its own address). Nothing
//! here leaves the two namespaces the test created.

use crate::{TestEnv, sh};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The daemon namespace's address on the veth: what upstream sees guests as.
pub const DAEMON_SIDE: &str = "10.78.0.1";
/// The upstream server's address (HTTP on :80, DNS on :53).
pub const UPSTREAM: &str = "10.78.0.2";
/// The name dnsmasq answers with [`UPSTREAM`].
pub const NAME: &str = "web.test";
/// What `http://web.test/` serves.
pub const PAGE: &str = "hello from upstream";

pub struct Upstream {
    pub netns: String,
    http: Child,
    dns: Child,
    /// http.server's request log (one line per request, client first).
    pub http_log: PathBuf,
}

impl Upstream {
    /// Creates the namespace, the veth and the default route, starts both
    /// servers and returns once each answers.
    pub fn start(env: &TestEnv) -> Result<Self> {
        let netns = format!("{}-up", env.netns);
        sh(Command::new("ip").args(["netns", "add", &netns]))?;
        let ip = |ns: &str, args: &[&str]| sh(Command::new("ip").args(["-n", ns]).args(args));
        // From here on the namespace is removed on any error (Drop of a
        // half-built value is not run, so clean up by hand).
        let built = (|| -> Result<Self> {
            ip(&netns, &["link", "set", "lo", "up"])?;
            ip(
                &env.netns,
                &[
                    "link", "add", "fvup0", "type", "veth", "peer", "name", "fvup1", "netns",
                    &netns,
                ],
            )?;
            ip(
                &env.netns,
                &["addr", "add", &format!("{DAEMON_SIDE}/24"), "dev", "fvup0"],
            )?;
            ip(&env.netns, &["link", "set", "fvup0", "up"])?;
            ip(
                &netns,
                &["addr", "add", &format!("{UPSTREAM}/24"), "dev", "fvup1"],
            )?;
            ip(&netns, &["link", "set", "fvup1", "up"])?;
            ip(&env.netns, &["route", "add", "default", "via", UPSTREAM])?;
            let www = env.root.join("upstream-www");
            std::fs::create_dir_all(&www)?;
            std::fs::write(www.join("index.html"), format!("{PAGE}\n"))?;
            let http_log = env.root.join("upstream-http.log");
            let log = std::fs::File::create(&http_log)?;
            let http = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns,
                    "python3",
                    "-u",
                    "-m",
                    "http.server",
                    "80",
                ])
                .args(["--bind", UPSTREAM, "--directory"])
                .arg(&www)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting http.server")?;
            let dns = Command::new("ip")
                .args(["netns", "exec", &netns, "dnsmasq", "--keep-in-foreground"])
                .args([
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                ])
                .arg(format!("--listen-address={UPSTREAM}"))
                // A host record in a local domain: A answered, AAAA an
                // empty answer (not REFUSED, which fails resolvers).
                .arg(format!("--host-record={NAME},{UPSTREAM}"))
                .arg("--local=/test/")
                .args(["--user=root", "--pid-file"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting dnsmasq")?;
            let up = Self {
                netns: netns.clone(),
                http,
                dns,
                http_log,
            };
            up.wait_ready()?;
            Ok(up)
        })();
        if built.is_err() {
            let _ = Command::new("ip").args(["netns", "del", &netns]).status();
        }
        built
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let http = self.get(&format!("http://{UPSTREAM}/")).is_some();
            let dns = self
                .cmd(&["busybox", "nslookup", NAME, UPSTREAM])
                .output()
                .map(|o| {
                    o.status.success() && String::from_utf8_lossy(&o.stdout).contains(UPSTREAM)
                })
                .unwrap_or(false);
            if http && dns {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("upstream not ready (http {http}, dns {dns})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command in the upstream namespace.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).args(args);
        c
    }

    /// HTTP GET from upstream (e.g. a published port on [`DAEMON_SIDE`]).
    pub fn get(&self, url: &str) -> Option<String> {
        let out = self
            .cmd(&["curl", "-sS", "--max-time", "5", url])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Client addresses of the requests for `path` (http.server's log).
    pub fn clients_of(&self, path: &str) -> Vec<String> {
        let log = std::fs::read_to_string(&self.http_log).unwrap_or_default();
        let needle = format!("\"GET {path} ");
        log.lines()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| l.split(' ').next().map(str::to_string))
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for c in [&mut self.http, &mut self.dns] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}
