//! Guest networking a user can live with (issue 13), end to end: egress
//! through source NAT with the daemon's DNS, published ports, and the
//! per-TAP anti-spoofing filter, including a fork whose handoff never
//! completes. Upstream is a second namespace the test creates
//! (`forkvm_e2e::upstream`); no traffic leaves the test's namespaces.

use anyhow::{Result, ensure};
use forkvm_e2e::upstream::{DAEMON_SIDE, NAME, PAGE, UPSTREAM, Upstream};
use forkvm_e2e::{TestEnv, ip, s, sh, wait_for};
use serde_json::json;
use std::time::Duration;

fn dns_env() -> [(&'static str, &'static str); 1] {
    [("FORKVM_DNS", UPSTREAM)]
}

/// `wget` of `url` in the guest, bounded; its exit code. (busybox
/// `timeout`: the guest's static busybox wget crashes on its own `-T`.)
async fn guest_get(env: &TestEnv, id: &str, url: &str) -> Result<i64> {
    env.exec_code(
        id,
        &[
            "busybox",
            "timeout",
            "5",
            "wget",
            "-q",
            "-O",
            "/dev/null",
            url,
        ],
    )
    .await
}

/// The packets counted by the rule starting with `rule` in `chain` of
/// `bridge forkvm`, read in the daemon's namespace.
fn counted(env: &TestEnv, chain: &str, rule: &str) -> Result<u64> {
    let listing = sh(&mut env.in_netns(&["nft", "list", "chain", "bridge", "forkvm", chain]))?;
    let line = listing
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(rule))
        .ok_or_else(|| anyhow::anyhow!("no rule {rule:?} in {listing}"))?;
    let n = line
        .split("counter packets ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no counter in {line:?}"))?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread")]
async fn guests_and_their_forks_reach_upstream_by_name_through_nat() -> Result<()> {
    let env = TestEnv::start_env(&dns_env()).await?;
    let up = Upstream::start(&env)?;
    let src = env.create(json!({"name": "src"})).await?;
    let page = env
        .exec_ok(
            &s(&src, "id"),
            &["wget", "-q", "-O", "-", &format!("http://{NAME}/?from=src")],
        )
        .await?;
    ensure!(page.trim() == PAGE, "{page}");
    let seen = up.clients_of("/?from=src");
    ensure!(seen == [DAEMON_SIDE], "seen as {seen:?}");

    // Egress off: neither the name server nor the page is reachable.
    let off = env
        .create(json!({"name": "off", "network": {"egress": false}}))
        .await?;
    ensure!(off["network"]["egress"] == false, "{off}");
    let oid = s(&off, "id");
    ensure!(guest_get(&env, &oid, &format!("http://{UPSTREAM}/off")).await? != 0);
    ensure!(
        env.exec_code(
            &oid,
            &["busybox", "timeout", "5", "busybox", "nslookup", NAME]
        )
        .await?
            != 0
    );
    ensure!(
        up.clients_of("/off").is_empty(),
        "{:?}",
        up.clients_of("/off")
    );

    // Three forks of the running source: each resolves and fetches, each
    // seen upstream from the NATed address.
    let (st, forks) = env
        .request(
            "POST",
            &format!("/instances/{}/fork", s(&src, "id")),
            Some(json!({"name": "f", "count": 3, "from_running": true})),
        )
        .await?;
    ensure!(st == 201, "{forks}");
    let forks = forks.as_array().cloned().unwrap_or_default();
    ensure!(forks.len() == 3, "{forks:?}");
    for f in &forks {
        let name = s(f, "name");
        let path = format!("/?from={name}");
        let code = guest_get(&env, &s(f, "id"), &format!("http://{NAME}{path}")).await?;
        ensure!(code == 0, "{name}: wget exit {code}");
        let seen = up.clients_of(&path);
        ensure!(seen == [DAEMON_SIDE], "{name} seen as {seen:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn published_ports_answer_upstream_conflict_and_leave_with_the_instance() -> Result<()> {
    let env = TestEnv::start().await?;
    let up = Upstream::start(&env)?;
    let port = json!([{"host_port": 8080, "guest_port": 80, "protocol": "tcp"}]);
    let web = env.create(json!({"name": "web", "ports": port})).await?;
    let wid = s(&web, "id");
    ensure!(web["ports"] == port, "{web}");
    env.exec_ok(
        &wid,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo guest-page > /www/index.html && httpd -p 80 -h /www",
        ],
    )
    .await?;
    let url = format!("http://{DAEMON_SIDE}:8080/");
    let got = wait_for("the published port", Duration::from_secs(20), async || {
        up.get(&url)
    })
    .await?;
    ensure!(got.trim() == "guest-page", "{got}");

    // The same host port for another instance: 409, and nothing created.
    let (st, v) = env
        .request(
            "POST",
            "/instances",
            Some(json!({"name": "other", "ports": port})),
        )
        .await?;
    ensure!(st == 409, "{st}: {v}");
    let (st, _) = env.request("GET", "/instances/other", None).await?;
    ensure!(st == 404);

    // A fork never inherits the port; it may publish its own. Its httpd is
    // the source's, resumed.
    let (st, f) = env
        .request(
            "POST",
            &format!("/instances/{wid}/fork"),
            Some(json!({"name": "web-fork", "from_running": true,
                        "ports": [{"host_port": 8081, "guest_port": 80}]})),
        )
        .await?;
    ensure!(st == 201, "{f}");
    ensure!(
        f["ports"] == json!([{"host_port": 8081, "guest_port": 80, "protocol": "tcp"}]),
        "{f}"
    );
    let got = wait_for("the fork's port", Duration::from_secs(20), async || {
        up.get(&format!("http://{DAEMON_SIDE}:8081/"))
    })
    .await?;
    ensure!(got.trim() == "guest-page", "{got}");

    let (st, _) = env
        .request("DELETE", &format!("/instances/{wid}"), None)
        .await?;
    ensure!(st == 204);
    let table = sh(&mut env.in_netns(&["nft", "list", "table", "ip", "forkvm"]))?;
    ensure!(
        !table.contains("8080 :") && table.contains("8081 :"),
        "{table}"
    );
    ensure!(
        up.get(&url).is_none(),
        "the deleted instance's port still answers"
    );
    // Free for someone else now.
    env.create(json!({"name": "other", "ports": port})).await?;

    // A daemon crash, a stale rule left behind meanwhile: the restarted
    // daemon rebuilds its tables from the store, once each.
    let mut env = env;
    env.kill_daemon()?;
    sh(&mut env.in_netns(&[
        "nft",
        "add",
        "rule",
        "ip",
        "forkvm",
        "prerouting",
        "tcp",
        "dport",
        "9999",
        "dnat",
        "to",
        "10.77.0.99:1",
    ]))?;
    env.spawn_daemon()?;
    env.wait_ready().await?;
    let table = sh(&mut env.in_netns(&["nft", "list", "table", "ip", "forkvm"]))?;
    ensure!(!table.contains("9999"), "stale rule survived: {table}");
    for p in ["8080 :", "8081 :"] {
        ensure!(
            table.matches(p).count() == 1,
            "{p} not exactly once: {table}"
        );
    }
    let tables = sh(&mut env.in_netns(&["nft", "list", "tables"]))?;
    ensure!(
        tables == "table bridge forkvm\ntable ip forkvm\n",
        "{tables}"
    );
    ensure!(
        up.get(&format!("http://{DAEMON_SIDE}:8081/")).is_some(),
        "fork's port lost"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_addresses_reach_no_one_and_move_no_neighbour_entry() -> Result<()> {
    let env = TestEnv::start().await?;
    let _up = Upstream::start(&env)?;
    let a = env.create(json!({"name": "a"})).await?;
    let b = env.create(json!({"name": "b"})).await?;
    let (aid, b_ip, b_mac) = (s(&a, "id"), ip(&b), s(&b["network"], "mac"));
    // Each test has its own namespace: the shared chain's counters are a's.
    let chain = "guest".to_string();
    let neigh = || sh(&mut env.in_netns(&["ip", "neigh", "show", &b_ip, "dev", &env.bridge]));
    let pinned = format!("{b_ip} lladdr {b_mac} PERMANENT");
    ensure!(neigh()?.contains(&pinned), "{}", neigh()?);
    // Control: a's own identity reaches upstream.
    ensure!(
        env.exec_code(&aid, &["ping", "-c", "1", "-W", "2", UPSTREAM])
            .await?
            == 0
    );

    // Another instance's source IP.
    let before = counted(&env, &chain, "iifname . ip saddr != @addrs")?;
    env.exec_ok(
        &aid,
        &["ip", "addr", "add", &format!("{b_ip}/32"), "dev", "eth0"],
    )
    .await?;
    ensure!(
        env.exec_code(&aid, &["ping", "-c", "2", "-W", "1", "-I", &b_ip, UPSTREAM])
            .await?
            != 0
    );
    let after = counted(&env, &chain, "iifname . ip saddr != @addrs")?;
    ensure!(
        after >= before + 2,
        "forged IP not dropped: {before} -> {after}"
    );

    // ARP claiming b's address (unsolicited replies, as a takeover would).
    let before = counted(&env, &chain, "iifname . arp saddr ip != @addrs")?;
    env.exec_code(
        &aid,
        &["arping", "-U", "-c", "3", "-I", "eth0", "-s", &b_ip, &b_ip],
    )
    .await?;
    let after = counted(&env, &chain, "iifname . arp saddr ip != @addrs")?;
    ensure!(
        after >= before + 3,
        "forged ARP not dropped: {before} -> {after}"
    );
    ensure!(neigh()?.contains(&pinned), "b's entry moved: {}", neigh()?);
    env.exec_ok(
        &aid,
        &["ip", "addr", "del", &format!("{b_ip}/32"), "dev", "eth0"],
    )
    .await?;

    // A MAC that is not its lease's: nothing passes, not even ARP.
    let mac_rule = "iifname . ether saddr != @macs".to_string();
    let before = counted(&env, &chain, &mac_rule)?;
    let forged = "ip link set eth0 address 02:fc:de:ad:be:ef && ip neigh flush dev eth0; \
                  ping -c 2 -W 1 10.77.0.1; r=$?; ip link set eth0 address {mac}; exit $r";
    let forged = forged.replace("{mac}", &s(&a["network"], "mac"));
    ensure!(env.exec_code(&aid, &["sh", "-c", &forged]).await? != 0);
    let after = counted(&env, &chain, &mac_rule)?;
    ensure!(
        after >= before + 2,
        "forged MAC not dropped: {before} -> {after}"
    );
    ensure!(env.ping(&b_ip), "b unreachable after a's attempts");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_that_never_hands_off_cannot_use_its_sources_address() -> Result<()> {
    let env = TestEnv::start_env(&[("FORKVM_HANDOFF_TIMEOUT_MS", "60000")]).await?;
    let up = Upstream::start(&env)?;
    // The source fetches /tick from upstream every ~0.2 s (each try bounded to 1 s); with the
    // mailbox ignored and the agent muted, its fork keeps running that loop
    // with the source's identity and never learns its own.
    let src = env
        .create(json!({"name": "src", "env": {
            "FORKVM_AGENT_TEST_HOOKS": "1", "FORKVM_AGENT_DISABLE_MAILBOX": "1"}}))
        .await?;
    let sid = s(&src, "id");
    env.exec_ok(
        &sid,
        &[
            "sh",
            "-c",
            &format!(
                "(while true; do busybox timeout 1 wget -q -O /dev/null http://{UPSTREAM}/tick; \
             sleep 0.2; done) >/dev/null 2>&1 &"
            ),
        ],
    )
    .await?;
    wait_for("the source's ticks", Duration::from_secs(20), async || {
        (!up.clients_of("/tick").is_empty()).then_some(())
    })
    .await?;
    env.exec_ok(&sid, &["touch", "/run/forkvm-test-hang"])
        .await?;
    let (st, f) = env
        .request(
            "POST",
            &format!("/instances/{sid}/fork"),
            Some(json!({"name": "stuck", "from_running": true, "wait_for_network": false})),
        )
        .await?;
    ensure!(st == 201 && s(&f, "state") == "Initializing", "{st}: {f}");
    // Only the fork runs the loop from now on.
    let (st, _) = env
        .request("DELETE", &format!("/instances/{sid}"), None)
        .await?;
    ensure!(st == 204);
    let ticks = up.clients_of("/tick").len();
    // The source is gone: whatever the shared chain counts now is the fork's.
    let chain = "guest".to_string();
    let mac_rule = "iifname . ether saddr != @macs".to_string();
    // The fork keeps sending with the source's MAC: counted and dropped.
    let base = counted(&env, &chain, &mac_rule)?;
    wait_for(
        "the stuck fork's frames to be dropped",
        Duration::from_secs(30),
        async || (counted(&env, &chain, &mac_rule).ok()? >= base + 5).then_some(()),
    )
    .await?;
    let (_, now) = env
        .request("GET", &format!("/instances/{}", s(&f, "id")), None)
        .await?;
    ensure!(
        s(&now, "state") == "Initializing",
        "the fork handed off after all: {now}"
    );
    ensure!(
        up.clients_of("/tick").len() == ticks,
        "upstream heard the fork with its source's address"
    );
    Ok(())
}
