//! The TCP API over TLS: a CA and a server certificate made at test time
//! (rcgen), the daemon serving them on loopback in the test's namespace,
//! and the CLI (`--host https://… --tls-ca`, exec over wss) and curl as
//! clients: the right CA and token work, a wrong token is 401, plain HTTP
//! to the TLS port and an untrusted certificate fail; plain HTTP on a
//! non-loopback address and a short token are refused at start-up.

use anyhow::{Context, Result, ensure};
use forkvm_e2e::{TestEnv, forkvm_bin, s};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PORT: u16 = 18093;
const TOKEN: &str = "tls-test-token-0123456789abcdef-0123";

/// Writes `ca.pem`, `server.pem` and `server.key` (0600) into `dir`: a CA,
/// and a server certificate for 127.0.0.1 and localhost signed by it.
fn make_certs(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "forkvm e2e test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?
        .signed_by(&key, &ca)?;
    let (ca_pem, cert, key_path) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_pem, ca.pem())?;
    std::fs::write(&cert, server.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
    Ok((ca_pem, cert, key_path))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `forkvm --host HOST [--tls-ca CA] ARGS` in the test's namespace.
fn cli(env: &TestEnv, host: &str, ca: Option<&Path>, token: &str, args: &[&str]) -> Result<Output> {
    let bin = forkvm_bin();
    let mut argv = vec![bin.to_str().context("utf-8")?, "--host", host];
    if let Some(ca) = ca {
        argv.extend(["--tls-ca", ca.to_str().context("utf-8")?]);
    }
    argv.extend_from_slice(args);
    Ok(env
        .in_netns(&argv)
        .env("FORKVM_API_TOKEN", token)
        .env_remove("FORKVM_SOCKET")
        .env_remove("FORKVM_TLS_CA")
        .output()?)
}

/// curl's HTTP status for `url` (000 when no HTTP answer came).
fn curl_status(env: &TestEnv, extra: &[&str], url: &str) -> Result<String> {
    let mut argv = vec![
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
    ];
    argv.extend_from_slice(extra);
    argv.push(url);
    let o = env.in_netns(&argv).output()?;
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_listener_with_the_cli_and_curl() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, cert, key) = make_certs(dir.path())?;
    let env = TestEnv::start_tls(PORT, TOKEN, (cert, key)).await?;
    let https = format!("https://127.0.0.1:{PORT}");
    let ca_s = ca.to_str().context("utf-8")?;

    // The CLI with the CA: ps, then exec over wss in a running instance.
    let inst = env.create(json!({"name": "tls"})).await?;
    let o = cli(&env, &https, Some(&ca), TOKEN, &["ps", "-q"])?;
    ensure!(
        o.status.success() && text(&o).trim() == s(&inst, "id"),
        "{}",
        text(&o)
    );
    let o = cli(
        &env,
        &https,
        Some(&ca),
        TOKEN,
        &["exec", "tls", "--", "sh", "-c", "echo over-$((20+22))"],
    )?;
    ensure!(
        o.status.success() && text(&o).contains("over-42"),
        "{}",
        text(&o)
    );

    // A wrong token: 401, from curl and as the CLI's error.
    let wrong = format!("Authorization: Bearer {TOKEN}x");
    let url = format!("{https}/instances");
    ensure!(curl_status(&env, &["--cacert", ca_s, "-H", &wrong], &url)? == "401");
    let right = format!("Authorization: Bearer {TOKEN}");
    ensure!(curl_status(&env, &["--cacert", ca_s, "-H", &right], &url)? == "200");
    let o = cli(
        &env,
        &https,
        Some(&ca),
        "wrong-token-0123456789abcdef-0123456",
        &["ps"],
    )?;
    ensure!(
        !o.status.success() && text(&o).contains("token"),
        "{}",
        text(&o)
    );

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = format!("http://127.0.0.1:{PORT}");
    let st = curl_status(&env, &["-H", &right], &format!("{plain}/instances"))?;
    ensure!(st != "200" && st != "401", "plain HTTP answered {st}");
    let o = cli(&env, &plain, None, TOKEN, &["ps"])?;
    ensure!(!o.status.success(), "{}", text(&o));

    // Without the CA the certificate is not trusted.
    let o = cli(&env, &https, None, TOKEN, &["ps"])?;
    ensure!(
        !o.status.success() && text(&o).to_lowercase().contains("certificate"),
        "{}",
        text(&o)
    );
    let log = env.daemon_log();
    ensure!(!log.contains(TOKEN), "the token is in the daemon's log");
    ensure!(log.contains("TLS, bearer auth"), "{log}");
    Ok(())
}

/// `forkvm serve` refuses before it opens anything: plain HTTP off
/// loopback, a short token.
#[test]
fn serve_refuses_plain_http_off_loopback_and_short_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let serve = |listen: &str, token: &str| -> Result<Output> {
        Ok(Command::new(forkvm_bin())
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .env("FORKVM_API_TOKEN", token)
            .output()?)
    };
    let o = serve("0.0.0.0:18094", TOKEN)?;
    ensure!(
        !o.status.success() && text(&o).contains("--tls-cert") && text(&o).contains("--tls-key"),
        "{}",
        text(&o)
    );
    let o = serve("127.0.0.1:18094", "short-token")?;
    ensure!(
        !o.status.success() && text(&o).contains("at least 32"),
        "{}",
        text(&o)
    );
    ensure!(
        !dir.path().join("data").exists(),
        "serve went on to open its data directory"
    );
    Ok(())
}
