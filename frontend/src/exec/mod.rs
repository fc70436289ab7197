//! The host side of exec: a connection to guest-init through cloud-hypervisor's hybrid-vsock
//! muxer ([`conn`]), and the words the frontend appends to the guest's kernel command line
//! so that guest-init finds its config ([`cmdline`]). The protocol itself is
//! `my_hypervisor-exec-proto`'s, shared with guest-init; docs/guest-init.md describes it.
//!
//! Nothing here knows about VMs or JSON-RPC: the VM layer hands in a connected vsock stream
//! (from the broker) and gets back an [`ExecResult`] or an [`ExecError`].

pub mod cmdline;
pub mod conn;

pub use cmdline::guest_cmdline;
pub use conn::{AgentConn, ExecError, ExecErrorKind};
pub use my_hypervisor_exec_proto::{DEFAULT_VSOCK_PORT, ExecRequest, ExecResult, ExitStatus, Outcome};
