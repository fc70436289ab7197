//! The params of every method, as the types the server parses them into. Their JSON Schemas,
//! which `rpc.discover` serves, are derived from these same types ([`super::schema`]).

use std::borrow::Cow;
use std::collections::BTreeMap;

use my_hypervisor_policy::names::{VM_ID_MAX, VM_ID_PATTERN, VM_ID_RULE, is_vm_id};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Default and largest `limit` of `compute.vm.events.tail`.
pub const DEFAULT_TAIL_LIMIT: u32 = 100;
pub const MAX_TAIL_LIMIT: u32 = 1000;
pub use crate::vm::query::{DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT, MAX_SELECTOR_BYTES};
/// Largest `timeout_secs` of `compute.vm.stop`.
pub const MAX_STOP_TIMEOUT_SECS: u64 = 3600;

/// A VM id, valid by construction: the rule is policy's ([`VM_ID_RULE`]), and a params object
/// with an invalid one is refused while it is parsed, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(String);

impl VmId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for VmId {
    type Error = String;

    fn try_from(s: String) -> Result<VmId, String> {
        if is_vm_id(&s) { Ok(VmId(s)) } else { Err(format!("must be {VM_ID_RULE}")) }
    }
}

impl From<VmId> for String {
    fn from(id: VmId) -> String {
        id.0
    }
}

impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for VmId {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "VmId".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": VM_ID_MAX,
            "pattern": VM_ID_PATTERN,
            "description": format!("VM id: {VM_ID_RULE}"),
        })
    }
}

/// No params: an empty object (or none at all).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmIdParams {
    pub vm_id: VmId,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopParams {
    pub vm_id: VmId,
    /// Grace period in seconds before the VM is killed.
    #[schemars(range(max = MAX_STOP_TIMEOUT_SECS))]
    pub timeout_secs: Option<u64>,
    /// Skip the power button and the grace period: `vm.shutdown`, then kill (libvirt's
    /// destroy).
    #[serde(default)]
    pub force: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusParams {
    pub vm_id: VmId,
    /// Add the whole sandbox report stored at spawn.
    #[serde(default)]
    pub verbose: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only VMs in this state.
    pub state: Option<crate::vm::VmState>,
    /// Label selector `k=v,k2=v2`: only VMs carrying every one of these labels.
    #[schemars(length(max = MAX_SELECTOR_BYTES))]
    pub labels: Option<String>,
    /// Most VMs on the page (a page is also cut to stay under 512 KiB).
    #[schemars(range(min = 1, max = MAX_LIST_LIMIT), extend("default" = DEFAULT_LIST_LIMIT))]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<VmId>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsTailParams {
    /// Only this VM's events; all VMs' when absent.
    pub vm_id: Option<VmId>,
    /// Only events with a greater seq.
    pub since_seq: Option<u64>,
    /// Most events returned.
    #[schemars(range(min = 1, max = MAX_TAIL_LIMIT), extend("default" = DEFAULT_TAIL_LIMIT))]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsFollowParams {
    /// Only this VM's events; all VMs' when absent.
    pub vm_id: Option<VmId>,
    /// Stream events with a greater seq; when absent, only new ones.
    pub since_seq: Option<u64>,
}

/// The params of `compute.vm.events.unfollow`, given by position: `[subscription]`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnfollowParams {
    /// The id `compute.vm.events.follow` returned.
    pub subscription: SubscriptionId,
}

/// A subscription id, as jsonrpsee hands them out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum SubscriptionId {
    Num(u64),
    Str(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    #[default]
    Console,
    Vmm,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsParams {
    pub vm_id: VmId,
    #[serde(default)]
    pub stream: LogStream,
    /// Most bytes returned, from the end (before base64).
    #[schemars(range(min = 1, max = 524288), extend("default" = 65536))]
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    pub vm_id: VmId,
    /// The program and its arguments. A bare name is looked up in guest-init's PATH.
    #[schemars(length(min = 1, max = my_hypervisor_exec_proto::MAX_ARGS))]
    pub argv: Vec<String>,
    /// The command's whole environment (nothing else is inherited).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// After it the guest kills the command's process group: SIGTERM, then SIGKILL.
    #[schemars(range(min = 1, max = super::exec::MAX_EXEC_TIMEOUT_SECS), extend("default" = super::exec::DEFAULT_EXEC_TIMEOUT_SECS))]
    pub timeout_secs: Option<u64>,
    /// The command's stdin, as `encoding` says; without it, stdin is /dev/null.
    pub stdin: Option<String>,
    /// How `stdin` is encoded.
    #[serde(default)]
    pub encoding: super::bytes::Encoding,
    /// Output kept per stream; the rest is dropped and the stream marked truncated.
    #[schemars(range(max = super::exec::MAX_EXEC_OUTPUT), extend("default" = super::exec::DEFAULT_EXEC_OUTPUT))]
    pub max_output_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_follow_policy() {
        let parse = |s: &str| serde_json::from_value::<VmId>(serde_json::json!(s));
        assert_eq!(parse("web-1").unwrap().as_str(), "web-1");
        assert!(parse(&"a".repeat(VM_ID_MAX)).is_ok());
        for bad in ["", "Web", "a_b", "../x", &"a".repeat(VM_ID_MAX + 1)] {
            let e = parse(bad).expect_err(bad);
            assert!(e.to_string().contains(VM_ID_RULE), "{bad}: {e}");
        }
        assert!(serde_json::from_value::<VmId>(serde_json::json!(7)).is_err());
    }
}
