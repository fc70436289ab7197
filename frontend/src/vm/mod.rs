//! VM records: the spec ([`spec`]), the state machine ([`fsm`]), state.json ([`store`]) and
//! its writer ([`writer`]), the transition events ([`events`]), and the manager that ties them
//! together ([`manager`], [`records`], [`ops`], [`recovery`], [`vmm_events`]) and drives VMs
//! through a [`driver::VmDriver`]. Its errors are [`VmError`]s.

pub mod driver;
pub mod error;
pub mod events;
mod exec;
pub mod fsm;
pub mod manager;
mod ops;
pub mod query;
pub mod records;
mod recovery;
pub mod spec;
pub mod store;
mod vmm_events;
pub mod writer;

pub use driver::{
    Boot, DriverError, DriverFuture, Reattached, SandboxView, Spawned, StopOptions, VmDriver, VmmEvent, VmmReport,
};
pub use error::VmError;
pub use events::{Event, EventTo, Follower};
pub use exec::MAX_EXECS;
pub use fsm::VmState;
pub use manager::{Manager, ManagerConfig, VmStatus, VmSummary};
pub use query::{ListFilter, ListPage};
pub use records::Tail;
pub use spec::{DiskSpec, NetSpec, VmSpec};
pub use writer::StateStore;
