//! VM records: the spec ([`spec`]), the state machine ([`fsm`]), state.json ([`store`]), the
//! transition events ([`events`]), and the manager that ties them together ([`manager`]) and
//! drives VMs through a [`driver::VmDriver`].

pub mod driver;
pub mod events;
pub mod fsm;
pub mod manager;
pub mod spec;
pub mod store;

pub use driver::{DriverError, DriverFuture, Reattached, StopOptions, VmDriver, VmmEvent};
pub use events::{Event, Follower};
pub use fsm::VmState;
pub use manager::{Manager, ManagerConfig, Tail, VmStatus, VmSummary};
pub use spec::{DiskSpec, NetSpec, VmSpec};
