//! The results of every method, as the types the server serializes. Their JSON Schemas, which
//! `rpc.discover` serves, are derived from these same types ([`super::schema`]).
//!
//! The VM layer's answers ([`VmStatus`], [`VmSummary`], [`Tail`], [`Event`]) are converted
//! here by exhaustive destructuring, so a field added there does not compile until it is
//! added here too, and with it to the schema.

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Serialize;

use super::params::VmId;
use crate::vm::{Event, EventTo, ListPage, SandboxView, Tail, VmSpec, VmState, VmStatus, VmSummary};

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
    /// When the VM was created (RFC 3339, UTC).
    pub created_at: String,
    /// The seq of the VM's last recorded transition: tail or follow the VM from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// The VMM's sandbox, while a VMM may be alive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxResult>,
}

/// A live VMM's sandbox: what was planned and what the kernel shows applied.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SandboxResult {
    /// From the report the broker stored at spawn: uid, capabilities, no_new_privs,
    /// namespaces, the Landlock ABI and mode, the seccomp default action.
    pub planned: Vec<String>,
    /// What the broker read from the kernel about the live process (`/proc/<pid>/status`):
    /// uids, capability sets, no_new_privs, seccomp mode and filters, PID namespace.
    pub applied: Vec<String>,
    /// With `verbose`: the whole stored report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// Why the sandbox could not be read (the VMM exited meanwhile, say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SandboxResult {
    pub fn new(view: Result<SandboxView, String>, verbose: bool) -> SandboxResult {
        match view {
            Ok(SandboxView { planned, applied }) => SandboxResult {
                planned: my_hypervisor_policy::observed::planned(&planned),
                applied,
                report: verbose.then_some(planned),
                error: None,
            },
            Err(e) => SandboxResult { planned: vec![], applied: vec![], report: None, error: Some(e) },
        }
    }
}

impl From<VmStatus> for StatusResult {
    fn from(s: VmStatus) -> StatusResult {
        let VmStatus { vm_id, state, spec, pid, last_error, created_at, last_seq } = s;
        StatusResult { vm_id, state, spec, pid, last_error, created_at, last_seq, sandbox: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ListResult {
    /// In VM id order.
    pub vms: Vec<SummaryResult>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<VmId>")]
    pub next_cursor: Option<String>,
    /// The last event seq when the page was taken: `compute.vm.events.follow` with this as
    /// `since_seq` (that of the first page) misses no transition after the list.
    pub seq: u64,
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

impl From<ListPage> for ListResult {
    fn from(page: ListPage) -> ListResult {
        let ListPage { vms, next_cursor, seq } = page;
        let vms = vms
            .into_iter()
            .map(|s| {
                let VmSummary { vm_id, state, labels } = s;
                SummaryResult { vm_id, state, labels }
            })
            .collect();
        ListResult { vms, next_cursor, seq }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct TailResult {
    /// Oldest first.
    pub events: Vec<EventResult>,
    /// The cursor to pass as `since_seq` next time (to tail or to follow).
    pub next_seq: u64,
    /// Whether events after `since_seq` have already left the history: the answer has gaps.
    /// List again, then follow from the list's `seq`.
    pub truncated: bool,
    /// With `truncated`: the oldest cursor from which the history is still whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_seq: Option<u64>,
}

impl From<Tail> for TailResult {
    fn from(t: Tail) -> TailResult {
        let Tail { events, next_seq, truncated, oldest_seq } = t;
        TailResult { events: events.into_iter().map(EventResult::from).collect(), next_seq, truncated, oldest_seq }
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
    /// The state before; null for the transition create records.
    #[schemars(schema_with = "from_schema")]
    pub from: Option<VmState>,
    /// The state after, or `removed` for the event remove records.
    #[schemars(schema_with = "to_schema")]
    pub to: EventTo,
    pub reason: String,
}

fn state_names() -> Vec<serde_json::Value> {
    VmState::ALL.iter().map(|s| serde_json::Value::from(s.as_str())).collect()
}

fn from_schema(_: &mut SchemaGenerator) -> Schema {
    let mut names = state_names();
    names.push(serde_json::Value::Null);
    json_schema!({"type": ["string", "null"], "enum": names})
}

fn to_schema(_: &mut SchemaGenerator) -> Schema {
    let mut names = state_names();
    names.push(EventTo::REMOVED.into());
    json_schema!({"type": "string", "enum": names})
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
