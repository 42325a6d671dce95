//! Untrusted bytes from the host through the guest agent's request
//! handling, without side effects: the first byte picks what the bytes are
//! (a protobuf request of one of the agent's RPCs, the boot command line,
//! a mailbox payload), the rest is decoded as the agent decodes it and
//! validated as the agent validates it before acting: network identities
//! (ReconfigureNetwork, boot config, mailbox) through the agent's own
//! `NetRequest::validate` / `NetDesired::from_payload` and the planner,
//! workload specs through `forkvm_proto::workload::validate`. Must never
//! panic; what validation accepts must plan.
#![no_main]

// The agent is a binary crate: its pure validation and planning modules
// are compiled in here by path (they use only std, forkvm-mailbox and
// forkvm-proto), so what is fuzzed is the agent's own code, not a copy.
#[allow(dead_code)]
#[path = "../../crates/agent/src/netconf/plan.rs"]
mod plan;
#[allow(dead_code)]
#[path = "../../crates/agent/src/netconf/request.rs"]
mod request;

use forkvm_proto::agent::{
    CopyInRequest, CopyOutRequest, ExecInput, ExecRequest, NetworkConfig, SetClockRequest,
    StatRequest, WorkloadSpec,
};
use libfuzzer_sys::fuzz_target;
use plan::{LinkHint, LinkState};
use prost::Message;
use request::{NetDesired, NetRequest};

/// Validation accepted it: the planner must take it, whatever the link.
fn plan_for(desired: &NetDesired) {
    let hint = LinkHint {
        interface: desired.interface.clone(),
        index: 2,
        gateway: None,
    };
    let steps = plan::plan(desired, &LinkState::assumed(&hint));
    assert!(!steps.is_empty(), "an assumed link always needs steps");
}

fn network(req: NetRequest) {
    if let Ok(d) = req.validate() {
        plan_for(&d);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => {
            if let Ok(m) = NetworkConfig::decode(body) {
                network(NetRequest::from(m));
            }
        }
        1 => {
            if let Ok(spec) = WorkloadSpec::decode(body) {
                let _ = forkvm_proto::workload::validate(&spec);
            }
        }
        2 => {
            if let Ok(cfg) = std::str::from_utf8(body)
                .map_err(|_| ())
                .and_then(|s| forkvm_proto::BootConfig::from_cmdline(s).map_err(|_| ()))
            {
                let _ = cfg.effective_agent_port();
                if let Some(n) = &cfg.network {
                    network(NetRequest::from(n));
                }
            }
        }
        3 => {
            if let Ok(p) = forkvm_mailbox::Payload::from_json(body)
                && p.validate().is_ok()
                && let Ok(d) = NetDesired::from_payload(&p)
            {
                plan_for(&d);
            }
        }
        4 => {
            let _ = ExecRequest::decode(body);
        }
        5 => {
            let _ = ExecInput::decode(body);
        }
        6 => {
            let _ = CopyInRequest::decode(body);
        }
        7 => {
            let _ = CopyOutRequest::decode(body);
        }
        8 => {
            let _ = StatRequest::decode(body);
        }
        _ => {
            let _ = SetClockRequest::decode(body);
        }
    }
});
