use crate::error::CoreError;
use crate::netalloc::{HostNetwork, NetFuture};
use forkvm_mailbox::MacAddr;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

/// Bridge ports only remembered.
#[derive(Default)]
pub(crate) struct FakeHostNet {
    ports: Mutex<HashSet<String>>,
    fail_add: Mutex<bool>,
}

impl FakeHostNet {
    pub fn ports(&self) -> HashSet<String> {
        self.ports.lock().unwrap().clone()
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
}
