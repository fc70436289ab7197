//! Talking to one cloud-hypervisor: its REST API over a connected api-socket fd from the
//! broker, and its event-monitor file read from a stored offset. Everything a VMM sends is
//! untrusted: sizes are capped and time is bounded.

pub mod agent;
pub mod api;
pub mod driver;
pub mod monitor;
