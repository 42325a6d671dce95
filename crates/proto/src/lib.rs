//! The host↔guest contract of forkvm's guest agent.
//!
//! * [`agent`]: the gRPC schema (`forkvm.agent.v1.Agent`) generated from
//!   `proto/agent.proto`, with both client and server stubs. The agent serves it
//!   over a virtio-serial port; the host reaches it through QEMU's unix socket.
//! * [`boot`]: the [`BootConfig`] the host puts on the guest kernel command line
//!   (`forkvm.cfg=<base64url(json)>`) and the agent reads back at start.
//! * [`workload`]: the checks of a [`agent::WorkloadSpec`] (bounds, `KEY=VALUE`
//!   env, the OCI `user` forms) shared by the agent and hosts.
//! * [`client`]: a host-side helper to open an [`agent::agent_client::AgentClient`]
//!   over a unix socket.

pub mod boot;
pub mod client;
pub mod workload;

pub use boot::{AGENT_PORT_NAME, BootConfig, BootConfigError, BootNetwork, CMDLINE_KEY};
pub use client::{ConnectError, connect_unix};
pub use workload::{IdOrName, SpecError, UserSpec, ValidSpec};

/// Most output the non-streaming Exec returns per stream (stdout, stderr);
/// the agent reads and discards the rest so the command never blocks.
pub const EXEC_OUTPUT_CAP: usize = 16 << 20;

/// Largest agent reply the host decodes: both Exec streams at their cap plus
/// room for framing. Bounds what a hostile or broken guest can make the host
/// allocate; tonic's default (4 MiB) would refuse honest Exec output.
pub const MAX_REPLY_BYTES: usize = 2 * EXEC_OUTPUT_CAP + (1 << 20);

/// Generated gRPC types for `forkvm.agent.v1`.
#[allow(clippy::all, missing_docs)]
pub mod agent {
    tonic::include_proto!("forkvm.agent.v1");
}
