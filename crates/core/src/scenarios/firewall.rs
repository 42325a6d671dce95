//! The firewall as the orchestration keeps it: re-derived from the store
//! at every lease change, published ports claimed atomically, a fork's TAP
//! limited to its handoff until the handoff is done.

use super::*;
use crate::model::{CreateRequest, PortProtocol, PublishedPort};
use crate::store::AllocKind;
use crate::testkit::Answer;

fn tcp(host_port: u16, guest_port: u16) -> PublishedPort {
    PublishedPort {
        host_port,
        guest_port,
        protocol: PortProtocol::Tcp,
    }
}

fn create(name: &str, ports: Vec<PublishedPort>, egress: Option<bool>) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        ports,
        egress,
        ..Default::default()
    }
}

fn script(w: &World) -> String {
    w.net.rules().expect("a ruleset was applied").0
}

/// The `active` set's declaration in a script.
fn active_set(s: &str) -> &str {
    let set = &s[s.find("set active {").unwrap()..];
    &set[..set.find('}').unwrap()]
}

fn tap(i: &Instance) -> String {
    i.network.tap.clone().unwrap()
}

#[tokio::test]
async fn published_ports_are_claimed_once_and_leave_with_the_instance() {
    let w = World::new().await;
    let web = w
        .mgr
        .create(create("web", vec![tcp(8080, 80)], None))
        .await
        .unwrap();
    let ip = web.network.ip.unwrap();
    assert!(script(&w).contains(&format!("8080 : {ip} . 80")));
    assert_eq!(w.net.rules().unwrap().1, [(ip, web.network.mac.unwrap())]);

    let e = w
        .mgr
        .create(create("other", vec![tcp(9090, 90), tcp(8080, 81)], None))
        .await
        .unwrap_err();
    assert!(is_conflict(&e), "{e}");
    assert!(
        w.mgr.get("other").await.is_err(),
        "the refused request left a record"
    );
    let held: Vec<String> = w
        .mgr
        .services()
        .store
        .allocated(AllocKind::Port)
        .unwrap()
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    assert_eq!(
        held,
        ["tcp/8080"],
        "nothing of the refused request stays claimed"
    );

    w.mgr.delete("web").await.unwrap();
    let (s, pinned) = w.net.rules().unwrap();
    assert!(!s.contains("8080 :"), "{s}");
    assert!(pinned.is_empty());
    assert!(
        w.mgr
            .services()
            .store
            .allocated(AllocKind::Port)
            .unwrap()
            .is_empty()
    );
    // Free again.
    w.mgr
        .create(create("again", vec![tcp(8080, 80)], None))
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_ports_are_refused_before_anything_happens() {
    let w = World::new().await;
    for ports in [vec![tcp(0, 80)], vec![tcp(80, 80), tcp(80, 81)]] {
        let e = w.mgr.create(create("bad", ports, None)).await.unwrap_err();
        assert!(matches!(e, CoreError::Invalid(_)), "{e}");
    }
    assert!(w.net.rules().is_none(), "no ruleset for a refused request");
}

#[tokio::test]
async fn egress_per_instance_and_for_the_daemon() {
    let w = World::new().await;
    let on = w.mgr.create(create("on", vec![], None)).await.unwrap();
    let off = w
        .mgr
        .create(create("off", vec![], Some(false)))
        .await
        .unwrap();
    assert!(!off.network.egress);
    let s = script(&w);
    assert!(
        s.contains(&format!("elements = {{ {} }}", on.network.ip.unwrap())),
        "{s}"
    );

    let w = World::with(|c| c.egress = false).await;
    w.mgr.create(create("on", vec![], None)).await.unwrap();
    let s = script(&w);
    let set = &s[s.find("set egress {").unwrap()..];
    let set = &set[..set.find('}').unwrap()];
    assert!(!set.contains("elements"), "daemon-wide off: {set}");
}

#[tokio::test]
async fn a_fork_sends_only_its_handoff_until_it_is_done_and_never_inherits_ports() {
    let w = World::with(|c| c.handoff_timeout = Duration::from_millis(300)).await;
    w.mgr
        .create(create("src", vec![tcp(8080, 80)], None))
        .await
        .unwrap();
    let f = fork_one(&w, "src", with_path("f", HandoffPath::Rpc))
        .await
        .unwrap();
    assert!(f.ports.is_empty());
    let s = script(&w);
    assert!(active_set(&s).contains(&tap(&f)), "{s}");
    assert_eq!(
        w.net.deltas(),
        2,
        "the fork's TAP and its handoff were element-only changes"
    );
    assert_eq!(
        s.matches(" : 10.99.0.").count(),
        1,
        "the source's port only: {s}"
    );

    // A fork whose handoff can't complete keeps the handoff-only chain.
    w.agent.reconfigure(Answer::Silent);
    let req = ForkRequest {
        wait_for_network: Some(false),
        ports: vec![tcp(9090, 90)],
        ..with_path("g", HandoffPath::Rpc)
    };
    let g = fork_one(&w, "src", req).await.unwrap();
    assert!(g.pending_handoff);
    let s = script(&w);
    assert!(
        !active_set(&s).contains(&tap(&g)),
        "not active before its handoff: {s}"
    );
    assert!(!s.contains("9090 :"), "no ports before the handoff: {s}");
    // The handoff fails at its deadline: the fork stops, its rules go.
    let gone = tap(&g);
    let g = wait_state(&w, "g", InstanceState::Stopped).await;
    assert!(g.ports.is_empty(), "its claims went back: {g:?}");
    let held = w.mgr.services().store.allocated(AllocKind::Port).unwrap();
    assert!(held.iter().all(|(v, _)| v != "tcp/9090"), "{held:?}");
    let s = script(&w);
    assert!(!s.contains(&gone), "{s}");
}

#[tokio::test]
async fn fork_ports_conflicts_and_batches() {
    let w = World::new().await;
    w.mgr
        .create(create("src", vec![tcp(8080, 80)], None))
        .await
        .unwrap();
    let mut req = with_path("f", HandoffPath::Rpc);
    req.ports = vec![tcp(8080, 80)];
    let e = fork_one(&w, "src", req).await.unwrap_err();
    assert!(is_conflict(&e), "{e}");
    assert!(w.mgr.get("f").await.is_err());
    let mut batch = from_running("b", Some(2));
    batch.ports = vec![tcp(9000, 80)];
    let e = w.mgr.fork("src", batch).await.unwrap_err();
    assert!(matches!(e, CoreError::Invalid(_)), "{e}");
}

#[tokio::test]
async fn a_restart_rebuilds_the_rules_from_the_store() {
    let mut w = World::new().await;
    w.mgr
        .create(create("web", vec![tcp(8080, 80)], None))
        .await
        .unwrap();
    let before = w.net.rules().unwrap();
    w.net.clear_rules();
    w.restart().await;
    assert_eq!(w.net.rules().unwrap(), before);
}
