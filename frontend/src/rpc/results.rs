//! The results of every method, as the types the server serializes. Their JSON Schemas, which
//! `rpc.discover` serves, are derived from these same types ([`super::schema`]).
//!
//! The VM layer's answers ([`VmStatus`], [`VmSummary`], [`Tail`], [`Event`]) are converted
//! here by exhaustive destructuring, so a field added there does not compile until it is
//! added here too, and with it to the schema.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Serialize;

use super::params::VmId;
use crate::vm::{Event, Tail, VmSpec, VmState, VmStatus, VmSummary};

/// A VM and the state it is in.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct VmStateResult {
    #[schemars(with = "VmId")]
    pub vm_id: String,
    pub state: VmState,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RemovedResult {
    #[schemars(with = "VmId")]
    pub vm_id: String,
    /// Always true: a remove that did not happen answers with an error.
    pub removed: bool,
}

/// One VM's state, spec and process details.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct StatusResult {
    #[schemars(with = "VmId")]
    pub vm_id: String,
    pub state: VmState,
    /// The VM spec; null when its state file was unreadable.
    pub spec: Option<VmSpec>,
    /// cloud-hypervisor's pid while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl From<VmStatus> for StatusResult {
    fn from(s: VmStatus) -> StatusResult {
        let VmStatus { vm_id, state, spec, pid, last_error } = s;
        StatusResult { vm_id, state, spec, pid, last_error }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ListResult {
    pub vms: Vec<SummaryResult>,
}

/// A VM with its state and labels.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SummaryResult {
    #[schemars(with = "VmId")]
    pub vm_id: String,
    pub state: VmState,
    pub labels: BTreeMap<String, String>,
}

impl From<Vec<VmSummary>> for ListResult {
    fn from(list: Vec<VmSummary>) -> ListResult {
        let vms = list
            .into_iter()
            .map(|s| {
                let VmSummary { vm_id, state, labels } = s;
                SummaryResult { vm_id, state, labels }
            })
            .collect();
        ListResult { vms }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct TailResult {
    /// Oldest first.
    pub events: Vec<EventResult>,
    /// The cursor to pass as `since_seq` next time (to tail or to follow).
    pub next_seq: u64,
}

impl From<Tail> for TailResult {
    fn from(t: Tail) -> TailResult {
        let Tail { events, next_seq } = t;
        TailResult { events: events.into_iter().map(EventResult::from).collect(), next_seq }
    }
}

/// One state transition of one VM: what `compute.vm.events.tail` lists and each
/// `compute.vm.event` notification carries.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct EventResult {
    pub seq: u64,
    #[schemars(with = "VmId")]
    pub vm_id: String,
    /// RFC 3339 time.
    pub at: String,
    pub from: VmState,
    pub to: VmState,
    pub reason: String,
}

impl From<Event> for EventResult {
    fn from(e: Event) -> EventResult {
        let Event { seq, vm_id, at, from, to, reason } = e;
        EventResult { seq, vm_id, at, from, to, reason }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ExecResult {
    /// The command's exit code; absent when a signal ended it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended the command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The output kept, as `encoding` says.
    pub stdout: String,
    pub stderr: String,
    pub encoding: super::bytes::Encoding,
    /// Output past `max_output_bytes` was dropped.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// What the command wrote to each stream, dropped bytes included.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub duration_ms: u64,
}

/// Whether a subscription was ended.
pub type UnfollowResult = bool;
