//! The VM layer's error. It says what went wrong in VM terms; `rpc::errors` maps each kind to
//! a JSON-RPC code. Nothing here knows about JSON-RPC.

use std::io;
use std::sync::Arc;

/// Why a VM operation or query failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VmError {
    #[error("no such VM: {vm_id:?}")]
    NoSuchVm { vm_id: String },
    /// The state machine does not allow it; `to` is a state, or "removed".
    #[error("VM {vm_id:?} cannot go from {from} to {to}")]
    IllegalTransition { vm_id: String, from: String, to: String },
    #[error("VM {vm_id:?} is busy: {detail}")]
    Busy { vm_id: String, detail: String },
    /// A driver step (the broker or cloud-hypervisor) failed; `detail` is the reason recorded.
    #[error("VMM error for VM {vm_id:?}: {detail}")]
    Vmm { vm_id: String, detail: String },
    #[error("invalid spec: field `{field}`: {detail}")]
    InvalidSpec { field: String, detail: String },
    #[error("VM {vm_id:?} is not running")]
    NotRunning { vm_id: String },
    /// The operation needs a driver and this manager has none.
    #[error("{method} needs a VM driver and there is none")]
    NotReady { method: &'static str },
    #[error("VM {vm_id:?} already exists with a different spec")]
    AlreadyExists { vm_id: String },
    /// The VM was created without the guest agent (`agent: false`).
    #[error("VM {vm_id:?} was created without a guest agent (`agent: false`)")]
    NoAgent { vm_id: String },
    /// The guest agent did not answer, or broke the protocol.
    #[error("the guest agent of VM {vm_id:?} is unreachable: {detail}")]
    AgentUnreachable { vm_id: String, detail: String },
    /// The guest agent refused the command or could not run it.
    #[error("the guest agent of VM {vm_id:?} refused the command: {detail}")]
    ExecRefused { vm_id: String, detail: String },
    /// The command ran past its timeout and was killed.
    #[error("exec in VM {vm_id:?} timed out: {detail}")]
    ExecTimeout { vm_id: String, detail: String },
    /// Events after the cursor have left the history.
    #[error("events after seq {since} have left the history; the oldest whole cursor is {oldest_seq}")]
    CursorTruncated { since: u64, oldest_seq: u64 },
    /// The manager already records `max` VMs.
    #[error("this host already records {max} VMs, the most it keeps")]
    TooManyVms { max: usize },
    /// The state dir could not be written.
    #[error("{what}")]
    Store {
        what: String,
        #[source]
        source: Arc<io::Error>,
    },
    /// An operation's task ended without an answer (it panicked or was cancelled).
    #[error("the {what} of VM {vm_id:?} ended without an answer")]
    Task {
        what: &'static str,
        vm_id: String,
        #[source]
        source: Arc<tokio::task::JoinError>,
    },
    /// An operation this one joined ended without an answer.
    #[error("the {what} of VM {vm_id:?} ended without an answer")]
    Ended { what: &'static str, vm_id: String },
}

impl VmError {
    pub fn invalid_spec(field: impl Into<String>, detail: impl Into<String>) -> Self {
        VmError::InvalidSpec { field: field.into(), detail: detail.into() }
    }

    pub fn no_such_vm(vm_id: &str) -> Self {
        VmError::NoSuchVm { vm_id: vm_id.to_string() }
    }

    pub fn store(what: impl Into<String>, source: io::Error) -> Self {
        VmError::Store { what: what.into(), source: Arc::new(source) }
    }
}

/// Two errors are equal when they are the same kind with the same text (sources compare by
/// their text, since `io::Error` has no equality).
impl PartialEq for VmError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other) && self.to_string() == other.to_string()
    }
}

impl Eq for VmError {}
