//! In-memory fakes of the outside world for orchestration tests: a
//! hypervisor whose "VMs" are records over real memory files, a host network
//! that only remembers ports, and an agent whose answers a test chooses.
//! They prove the core's logic (ordering, cleanup, fallbacks, adoption);
//! the end-to-end tests with real QEMU remain the proof that features work.

mod agent;
mod hv;
mod images;
mod net;
mod world;

pub(crate) use agent::{Answer, FakeAgent};
pub(crate) use hv::{FakeHypervisor, FakeVm, HvOp, OnResume};
pub(crate) use images::FakeImages;
pub(crate) use net::FakeHostNet;
pub(crate) use world::World;
