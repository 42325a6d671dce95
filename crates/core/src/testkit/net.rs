use crate::error::CoreError;
use crate::netalloc::{HostNetwork, NetFuture};
use forkvm_mailbox::MacAddr;
use forkvm_net::firewall::Ruleset;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

/// A ruleset's script and the neighbours pinned with it.
pub(crate) type Applied = (String, Vec<(Ipv4Addr, MacAddr)>);

/// Bridge ports only remembered.
#[derive(Default)]
pub(crate) struct FakeHostNet {
    ports: Mutex<HashSet<String>>,
    fail_add: Mutex<bool>,
    /// The last ruleset applied (its script) and the pinned neighbours.
    rules: Mutex<Option<Applied>>,
    /// How many applies came with an element-only delta.
    deltas: Mutex<usize>,
}

impl FakeHostNet {
    pub fn ports(&self) -> HashSet<String> {
        self.ports.lock().unwrap().clone()
    }

    /// The last ruleset's script and pinned neighbours.
    pub fn rules(&self) -> Option<Applied> {
        self.rules.lock().unwrap().clone()
    }

    pub fn deltas(&self) -> usize {
        *self.deltas.lock().unwrap()
    }

    /// Forget the last ruleset (a restart must apply one again).
    pub fn clear_rules(&self) {
        *self.rules.lock().unwrap() = None;
    }

    pub fn fail_add(&self, on: bool) {
        *self.fail_add.lock().unwrap() = on;
    }

    pub fn add_stray(&self, tap: &str) {
        self.ports.lock().unwrap().insert(tap.to_string());
    }
}

impl HostNetwork for FakeHostNet {
    fn ensure_bridge(&self) -> NetFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn add_port<'a>(&'a self, tap: &'a str, _mac: MacAddr, _ip: Ipv4Addr) -> NetFuture<'a, ()> {
        Box::pin(async move {
            if *self.fail_add.lock().unwrap() {
                return Err(CoreError::Internal(format!("injected: creating TAP {tap}")));
            }
            self.ports.lock().unwrap().insert(tap.to_string());
            Ok(())
        })
    }

    fn delete_port<'a>(&'a self, tap: &'a str) -> NetFuture<'a, ()> {
        Box::pin(async move {
            self.ports.lock().unwrap().remove(tap);
            Ok(())
        })
    }

    fn ports(&self) -> NetFuture<'_, Vec<String>> {
        Box::pin(async move { Ok(self.ports().into_iter().collect()) })
    }

    fn bridge_exists(&self) -> NetFuture<'_, bool> {
        Box::pin(async move { Ok(!self.ports().is_empty()) })
    }

    fn apply_rules<'a>(
        &'a self,
        rules: &'a Ruleset,
        delta: Option<&'a str>,
        pinned: &'a [(Ipv4Addr, MacAddr)],
    ) -> NetFuture<'a, ()> {
        Box::pin(async move {
            if delta.is_some() {
                *self.deltas.lock().unwrap() += 1;
            }
            *self.rules.lock().unwrap() = Some((rules.script(), pinned.to_vec()));
            Ok(())
        })
    }
}
