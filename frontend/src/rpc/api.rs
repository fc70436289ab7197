//! The API surface: one table ([`API`]) lists every method with its params, result and errors.
//! The server registers from it and `rpc.discover` describes it, so the two cannot drift.

use std::collections::BTreeMap;
use std::path::PathBuf;

use jsonrpsee::RpcModule;
use jsonrpsee::core::RegisterMethodError;
use jsonrpsee::types::{ErrorObjectOwned, Params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::errors::{self, ApiError, parse_params};

/// What a method does; `dispatch` matches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Create,
    Start,
    Stop,
    Remove,
    Status,
    List,
    EventsTail,
    ConsoleEndpoint,
    Logs,
    Exec,
    Discover,
}

/// One served method and its description.
#[derive(Debug)]
pub struct MethodDef {
    pub name: &'static str,
    pub method: Method,
    pub summary: &'static str,
    /// JSON Schema of the (by-name) params object.
    pub params: fn() -> Value,
    /// JSON Schema of the result.
    pub result: fn() -> Value,
    /// Application error codes the method can answer with (besides the spec codes).
    pub errors: &'static [i32],
}

use errors::{BUSY, ILLEGAL_TRANSITION, INVALID_SPEC, NO_SUCH_VM, NOT_READY, NOT_RUNNING, VMM_ERROR};

/// Every method the API serves.
pub const API: &[MethodDef] = &[
    MethodDef {
        name: "compute.vm.create",
        method: Method::Create,
        summary: "Define a new VM from a spec. It starts in state `pending`.",
        params: vm_spec_schema,
        result: vm_state_schema,
        errors: &[INVALID_SPEC, BUSY, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.start",
        method: Method::Start,
        summary: "Boot a created or stopped VM.",
        params: vm_id_params,
        result: vm_state_schema,
        errors: &[NO_SUCH_VM, ILLEGAL_TRANSITION, BUSY, VMM_ERROR, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.stop",
        method: Method::Stop,
        summary: "Shut a running VM down; after `timeout_secs` it is killed.",
        params: stop_params,
        result: vm_state_schema,
        errors: &[NO_SUCH_VM, ILLEGAL_TRANSITION, BUSY, VMM_ERROR, NOT_RUNNING, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.remove",
        method: Method::Remove,
        summary: "Forget a VM that is not running and release its resources.",
        params: vm_id_params,
        result: removed_schema,
        errors: &[NO_SUCH_VM, ILLEGAL_TRANSITION, BUSY, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.status",
        method: Method::Status,
        summary: "One VM's state, spec and process details.",
        params: vm_id_params,
        result: vm_status_schema,
        errors: &[NO_SUCH_VM, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.list",
        method: Method::List,
        summary: "Every VM with its state and labels.",
        params: empty_params,
        result: vm_list_schema,
        errors: &[NOT_READY],
    },
    MethodDef {
        name: "compute.vm.events.tail",
        method: Method::EventsTail,
        summary: "State transitions recorded after `since_seq`, oldest first.",
        params: events_tail_params,
        result: events_schema,
        errors: &[NO_SUCH_VM, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.console.endpoint",
        method: Method::ConsoleEndpoint,
        summary: "Path of the Unix socket that carries the VM's serial console.",
        params: vm_id_params,
        result: console_schema,
        errors: &[NO_SUCH_VM, NOT_RUNNING, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.logs",
        method: Method::Logs,
        summary: "The end of the VM's console or VMM log.",
        params: logs_params,
        result: logs_schema,
        errors: &[NO_SUCH_VM, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.exec",
        method: Method::Exec,
        summary: "Run a command in the guest through the vsock agent and wait for it.",
        params: exec_params,
        result: exec_schema,
        errors: &[NO_SUCH_VM, NOT_RUNNING, BUSY, VMM_ERROR, NOT_READY],
    },
    MethodDef {
        name: "rpc.discover",
        method: Method::Discover,
        summary: "This API described as an OpenRPC document.",
        params: empty_params,
        result: openrpc_schema,
        errors: &[],
    },
];

/// Registers every method of [`API`] on a new module.
pub fn rpc_module() -> Result<RpcModule<()>, RegisterMethodError> {
    let mut module = RpcModule::new(());
    for def in API {
        module.register_async_method(def.name, move |params, _, _| dispatch(def, params))?;
    }
    Ok(module)
}

async fn dispatch(def: &'static MethodDef, params: Params<'static>) -> Result<Value, ErrorObjectOwned> {
    let name = def.name;
    match def.method {
        Method::Create => parse_params::<VmSpec>(name, &params)?.validate()?,
        Method::Start | Method::Remove | Method::Status | Method::ConsoleEndpoint => {
            parse_params::<VmIdParams>(name, &params)?.vm_id.check(name)?
        }
        Method::Stop => parse_params::<StopParams>(name, &params)?.vm_id.check(name)?,
        Method::List => parse_params::<Empty>(name, &params).map(drop)?,
        Method::EventsTail => {
            let p = parse_params::<EventsTailParams>(name, &params)?;
            if let Some(id) = &p.vm_id {
                id.check(name)?;
            }
        }
        Method::Logs => parse_params::<LogsParams>(name, &params)?.vm_id.check(name)?,
        Method::Exec => {
            let p = parse_params::<ExecParams>(name, &params)?;
            p.vm_id.check(name)?;
            if p.argv.is_empty() {
                return Err(invalid_field(name, "argv", "must name a program"));
            }
        }
        Method::Discover => {
            parse_params::<Empty>(name, &params)?;
            return Ok(openrpc_document());
        }
    }
    Err(ApiError::NotReady { method: name }.into())
}

fn invalid_field(method: &str, field: &str, what: &str) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        errors::INVALID_PARAMS_CODE,
        format!("invalid params for {method}: field `{field}` {what}"),
        None::<()>,
    )
}

// ---- Params ----

/// A VM id: 1 to 64 characters of `[a-z0-9-]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(pub String);

impl VmId {
    pub fn is_valid(s: &str) -> bool {
        (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    fn check(&self, method: &str) -> Result<(), ErrorObjectOwned> {
        if Self::is_valid(&self.0) {
            Ok(())
        } else {
            Err(invalid_field(method, "vm_id", "must be 1 to 64 characters of [a-z0-9-]"))
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    pub disks: Vec<DiskSpec>,
    pub nets: Vec<NetSpec>,
    pub vsock: bool,
    #[serde(default)]
    pub agent: bool,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub readonly: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    #[serde(default)]
    pub bridge: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
}

impl VmSpec {
    /// Checks what the types cannot. Paths are checked by the backend, which knows the policy.
    pub fn validate(&self) -> Result<(), ApiError> {
        if !VmId::is_valid(&self.id) {
            return Err(ApiError::invalid_spec("id", "must be 1 to 64 characters of [a-z0-9-]"));
        }
        if self.vcpus == 0 {
            return Err(ApiError::invalid_spec("vcpus", "must be at least 1"));
        }
        if self.memory_mib == 0 {
            return Err(ApiError::invalid_spec("memory_mib", "must be at least 1"));
        }
        if self.agent && !self.vsock {
            return Err(ApiError::invalid_spec("agent", "needs `vsock: true`"));
        }
        for (i, net) in self.nets.iter().enumerate() {
            if let Some(mac) = &net.mac
                && !is_mac(mac)
            {
                return Err(ApiError::invalid_spec(
                    format!("nets[{i}].mac"),
                    "must look like 52:54:00:12:34:56",
                ));
            }
        }
        Ok(())
    }
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmIdParams {
    pub vm_id: VmId,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopParams {
    pub vm_id: VmId,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsTailParams {
    #[serde(default)]
    pub vm_id: Option<VmId>,
    #[serde(default)]
    pub since_seq: Option<u64>,
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    #[default]
    Console,
    Vmm,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsParams {
    pub vm_id: VmId,
    #[serde(default)]
    pub stream: LogStream,
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    pub vm_id: VmId,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

// ---- Schemas (JSON Schema, draft 2020-12 subset) ----

fn vm_id_schema() -> Value {
    json!({"type": "string", "pattern": "^[a-z0-9-]{1,64}$", "description": "VM id"})
}

fn state_schema() -> Value {
    json!({
        "type": "string",
        "description": "Lifecycle state: pending, provisioning, configured, starting, running, start_failed, stopping, stopped or failed",
    })
}

fn object(properties: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

fn empty_params() -> Value {
    object(json!({}), &[])
}

fn vm_id_params() -> Value {
    object(json!({"vm_id": vm_id_schema()}), &["vm_id"])
}

fn stop_params() -> Value {
    object(
        json!({
            "vm_id": vm_id_schema(),
            "timeout_secs": {"type": "integer", "minimum": 0, "description": "Grace period before the VM is killed"},
        }),
        &["vm_id"],
    )
}

fn vm_spec_schema() -> Value {
    let disk =
        object(json!({"path": {"type": "string"}, "readonly": {"type": "boolean"}}), &["path", "readonly"]);
    let net = object(
        json!({
            "bridge": {"type": "string"},
            "mac": {"type": "string", "pattern": "^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$"},
            "mtu": {"type": "integer", "minimum": 68},
        }),
        &[],
    );
    object(
        json!({
            "id": vm_id_schema(),
            "vcpus": {"type": "integer", "minimum": 1},
            "memory_mib": {"type": "integer", "minimum": 1},
            "kernel": {"type": "string", "description": "Path of the kernel image"},
            "initramfs": {"type": "string"},
            "cmdline": {"type": "string"},
            "firmware": {"type": "string"},
            "disks": {"type": "array", "items": disk},
            "nets": {"type": "array", "items": net},
            "vsock": {"type": "boolean"},
            "agent": {"type": "boolean", "description": "Whether the guest runs the exec agent (needs vsock)"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        }),
        &["id", "vcpus", "memory_mib", "kernel", "disks", "nets", "vsock", "labels"],
    )
}

fn events_tail_params() -> Value {
    object(
        json!({
            "vm_id": vm_id_schema(),
            "since_seq": {"type": "integer", "minimum": 0, "description": "Only events with a greater seq"},
            "limit": {"type": "integer", "minimum": 1, "description": "Most events returned"},
        }),
        &[],
    )
}

fn logs_params() -> Value {
    object(
        json!({
            "vm_id": vm_id_schema(),
            "stream": {"type": "string", "enum": ["console", "vmm"], "default": "console"},
            "max_bytes": {"type": "integer", "minimum": 1, "description": "Most bytes returned, from the end"},
        }),
        &["vm_id"],
    )
}

fn exec_params() -> Value {
    object(
        json!({
            "vm_id": vm_id_schema(),
            "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "cwd": {"type": "string"},
            "timeout_secs": {"type": "integer", "minimum": 0},
        }),
        &["vm_id", "argv"],
    )
}

fn vm_state_schema() -> Value {
    object(json!({"vm_id": vm_id_schema(), "state": state_schema()}), &["vm_id", "state"])
}

fn removed_schema() -> Value {
    object(json!({"vm_id": vm_id_schema(), "removed": {"type": "boolean"}}), &["vm_id", "removed"])
}

fn vm_status_schema() -> Value {
    object(
        json!({
            "vm_id": vm_id_schema(),
            "state": state_schema(),
            "spec": vm_spec_schema(),
            "pid": {"type": "integer", "description": "cloud-hypervisor pid while it runs"},
            "last_error": {"type": "string"},
        }),
        &["vm_id", "state", "spec"],
    )
}

fn vm_list_schema() -> Value {
    let item = object(
        json!({
            "vm_id": vm_id_schema(),
            "state": state_schema(),
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        }),
        &["vm_id", "state", "labels"],
    );
    object(json!({"vms": {"type": "array", "items": item}}), &["vms"])
}

fn events_schema() -> Value {
    let event = object(
        json!({
            "seq": {"type": "integer"},
            "vm_id": vm_id_schema(),
            "at": {"type": "string", "description": "RFC 3339 time"},
            "from": state_schema(),
            "to": state_schema(),
            "reason": {"type": "string"},
        }),
        &["seq", "vm_id", "at", "from", "to"],
    );
    object(
        json!({"events": {"type": "array", "items": event}, "next_seq": {"type": "integer"}}),
        &["events", "next_seq"],
    )
}

fn console_schema() -> Value {
    object(
        json!({"vm_id": vm_id_schema(), "path": {"type": "string", "description": "Unix socket path"}}),
        &["vm_id", "path"],
    )
}

fn logs_schema() -> Value {
    object(
        json!({
            "vm_id": vm_id_schema(),
            "stream": {"type": "string", "enum": ["console", "vmm"]},
            "data": {"type": "string"},
            "truncated": {"type": "boolean"},
        }),
        &["vm_id", "stream", "data", "truncated"],
    )
}

fn exec_schema() -> Value {
    object(
        json!({
            "exit_code": {"type": "integer"},
            "stdout": {"type": "string"},
            "stderr": {"type": "string"},
        }),
        &["exit_code", "stdout", "stderr"],
    )
}

fn openrpc_schema() -> Value {
    json!({"type": "object", "description": "OpenRPC 1.3 document", "required": ["openrpc", "info", "methods"]})
}

// ---- rpc.discover ----

/// The OpenRPC document for [`API`].
pub fn openrpc_document() -> Value {
    let methods: Vec<Value> = API.iter().map(describe).collect();
    json!({
        "openrpc": "1.3.2",
        "info": {
            "title": "my_hypervisor",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "VM lifecycle control over line-delimited JSON-RPC 2.0 on a Unix socket",
        },
        "methods": methods,
    })
}

fn describe(def: &MethodDef) -> Value {
    let params_schema = (def.params)();
    let required: Vec<&str> = params_schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let params: Vec<Value> = params_schema["properties"]
        .as_object()
        .map(|props| {
            props
                .iter()
                .map(|(name, schema)| json!({"name": name, "required": required.contains(&name.as_str()), "schema": schema}))
                .collect()
        })
        .unwrap_or_default();
    let errors: Vec<Value> = def
        .errors
        .iter()
        .map(|code| {
            let name = errors::APPLICATION_CODES.iter().find(|(c, _)| c == code).map_or("", |(_, n)| *n);
            json!({"code": code, "message": name})
        })
        .collect();
    json!({
        "name": def.name,
        "summary": def.summary,
        "paramStructure": "by-name",
        "params": params,
        "result": {"name": "result", "schema": (def.result)()},
        "errors": errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids() {
        assert!(VmId::is_valid("web-1"));
        assert!(VmId::is_valid(&"a".repeat(64)));
        assert!(!VmId::is_valid(&"a".repeat(65)));
        assert!(!VmId::is_valid(""));
        assert!(!VmId::is_valid("Web"));
        assert!(!VmId::is_valid("a_b"));
    }

    #[test]
    fn spec_errors_name_the_field() {
        let spec: VmSpec = serde_json::from_value(json!({
            "id": "vm1", "vcpus": 1, "memory_mib": 512, "kernel": "/k", "disks": [],
            "nets": [{"mac": "zz"}], "vsock": false, "labels": {}
        }))
        .unwrap();
        let e = spec.validate().unwrap_err();
        assert_eq!(e.code(), errors::INVALID_SPEC);
        assert!(e.to_string().contains("nets[0].mac"), "{e}");
    }

    #[test]
    fn every_application_code_used_is_defined() {
        for def in API {
            for code in def.errors {
                assert!(errors::APPLICATION_CODES.iter().any(|(c, _)| c == code), "{}: {code}", def.name);
            }
        }
    }
}
