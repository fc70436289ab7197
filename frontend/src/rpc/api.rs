//! The API surface: one table ([`API`]) lists every method with its params, result and errors.
//! The server registers from it and `rpc.discover` describes it, so the two cannot drift.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jsonrpsee::core::{RegisterMethodError, SubscriptionResult};
use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::{PendingSubscriptionSink, RpcModule};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::errors::{self, ApiError, parse_params};
use crate::vm::Manager;
pub use crate::vm::spec::{DiskSpec, NetSpec, VmSpec};

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
    EventsFollow,
    EventsUnfollow,
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

use errors::{ALREADY_EXISTS, BUSY, ILLEGAL_TRANSITION, INVALID_SPEC, NO_SUCH_VM, NOT_READY, NOT_RUNNING, VMM_ERROR};

/// The name of the notifications `compute.vm.events.follow` sends.
pub const EVENT_NOTIFICATION: &str = "compute.vm.event";
/// Default and largest `limit` of `compute.vm.events.tail`.
pub const DEFAULT_TAIL_LIMIT: u32 = 100;
pub const MAX_TAIL_LIMIT: u32 = 1000;
/// Largest `timeout_secs` of `compute.vm.stop`.
pub const MAX_STOP_TIMEOUT_SECS: u64 = 3600;

/// Every method the API serves.
pub const API: &[MethodDef] = &[
    MethodDef {
        name: "compute.vm.create",
        method: Method::Create,
        summary: "Define a new VM from a spec. It starts in state `pending`.",
        params: vm_spec_schema,
        result: vm_state_schema,
        errors: &[INVALID_SPEC, ALREADY_EXISTS, BUSY],
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
        summary: "Forget a VM in which no VMM can be alive; a failed VM's leftovers are released first.",
        params: vm_id_params,
        result: removed_schema,
        errors: &[NO_SUCH_VM, ILLEGAL_TRANSITION, BUSY, VMM_ERROR, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.status",
        method: Method::Status,
        summary: "One VM's state, spec and process details.",
        params: vm_id_params,
        result: vm_status_schema,
        errors: &[NO_SUCH_VM],
    },
    MethodDef {
        name: "compute.vm.list",
        method: Method::List,
        summary: "Every VM with its state and labels.",
        params: empty_params,
        result: vm_list_schema,
        errors: &[],
    },
    MethodDef {
        name: "compute.vm.events.tail",
        method: Method::EventsTail,
        summary: "State transitions recorded after `since_seq`, oldest first.",
        params: events_tail_params,
        result: events_schema,
        errors: &[NO_SUCH_VM],
    },
    MethodDef {
        name: "compute.vm.events.follow",
        method: Method::EventsFollow,
        summary: "Subscribe to state transitions after `since_seq`: each arrives as a `compute.vm.event` notification.",
        params: events_follow_params,
        result: subscription_id_schema,
        errors: &[NO_SUCH_VM],
    },
    MethodDef {
        name: "compute.vm.events.unfollow",
        method: Method::EventsUnfollow,
        summary: "End a `compute.vm.events.follow` subscription.",
        params: unfollow_params,
        result: unfollow_schema,
        errors: &[],
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

/// Registers every method of [`API`] on a new module whose context is `manager`.
pub fn rpc_module(manager: Manager) -> Result<RpcModule<Manager>, RegisterMethodError> {
    let mut module = RpcModule::new(manager);
    for def in API {
        match def.method {
            Method::EventsFollow => {
                let unfollow = API
                    .iter()
                    .find(|d| d.method == Method::EventsUnfollow)
                    .map_or("compute.vm.events.unfollow", |d| d.name);
                module.register_subscription(def.name, EVENT_NOTIFICATION, unfollow, follow)?;
            }
            // Registered with its subscribe method.
            Method::EventsUnfollow => {}
            _ => {
                module.register_async_method(def.name, move |params, ctx, _| dispatch(def, params, ctx))?;
            }
        }
    }
    Ok(module)
}

async fn dispatch(
    def: &'static MethodDef,
    params: Params<'static>,
    vms: Arc<Manager>,
) -> Result<Value, ErrorObjectOwned> {
    let name = def.name;
    let to_json = |v: Result<Value, ApiError>| v.map_err(ErrorObjectOwned::from);
    match def.method {
        Method::Create => {
            let spec = parse_params::<VmSpec>(name, &params)?;
            let id = spec.id.clone();
            to_json(vms.create(spec).await.map_err(ApiError::from).map(|state| json!({"vm_id": id, "state": state})))
        }
        Method::Start => {
            let id = parse_params::<VmIdParams>(name, &params)?.vm_id.checked(name)?;
            to_json(vms.start(&id).await.map_err(ApiError::from).map(|state| json!({"vm_id": id, "state": state})))
        }
        Method::Stop => {
            let p = parse_params::<StopParams>(name, &params)?;
            let id = p.vm_id.checked(name)?;
            let grace = match p.timeout_secs {
                Some(t) if t > MAX_STOP_TIMEOUT_SECS => {
                    return Err(invalid_field(
                        name,
                        "timeout_secs",
                        &format!("must be at most {MAX_STOP_TIMEOUT_SECS}"),
                    ));
                }
                t => t.map(Duration::from_secs),
            };
            to_json(
                vms.stop(&id, grace).await.map_err(ApiError::from).map(|state| json!({"vm_id": id, "state": state})),
            )
        }
        Method::Remove => {
            let id = parse_params::<VmIdParams>(name, &params)?.vm_id.checked(name)?;
            to_json(vms.remove(&id).await.map_err(ApiError::from).map(|()| json!({"vm_id": id, "removed": true})))
        }
        Method::Status => {
            let id = parse_params::<VmIdParams>(name, &params)?.vm_id.checked(name)?;
            to_json(vms.status(&id).map_err(ApiError::from).and_then(|s| serde_json::to_value(s).map_err(internal)))
        }
        Method::List => {
            parse_params::<Empty>(name, &params)?;
            to_json(serde_json::to_value(vms.list()).map(|l| json!({"vms": l})).map_err(internal))
        }
        Method::EventsTail => {
            let p = parse_params::<EventsTailParams>(name, &params)?;
            let id = p.vm_id.map(|v| v.checked(name)).transpose()?;
            let limit = p.limit.unwrap_or(DEFAULT_TAIL_LIMIT);
            if !(1..=MAX_TAIL_LIMIT).contains(&limit) {
                return Err(invalid_field(name, "limit", &format!("must be between 1 and {MAX_TAIL_LIMIT}")));
            }
            let tail = vms.tail(id.as_deref(), p.since_seq.unwrap_or(0), limit as usize);
            to_json(tail.map_err(ApiError::from).and_then(|t| serde_json::to_value(t).map_err(internal)))
        }
        Method::ConsoleEndpoint => {
            parse_params::<VmIdParams>(name, &params)?.vm_id.checked(name)?;
            Err(ApiError::NotReady { method: name }.into())
        }
        Method::Logs => {
            parse_params::<LogsParams>(name, &params)?.vm_id.checked(name)?;
            Err(ApiError::NotReady { method: name }.into())
        }
        Method::Exec => {
            let p = parse_params::<ExecParams>(name, &params)?;
            p.vm_id.checked(name)?;
            if p.argv.is_empty() {
                return Err(invalid_field(name, "argv", "must name a program"));
            }
            Err(ApiError::NotReady { method: name }.into())
        }
        Method::Discover => {
            parse_params::<Empty>(name, &params)?;
            Ok(openrpc_document())
        }
        // Served by the subscription machinery, never through here.
        Method::EventsFollow | Method::EventsUnfollow => {
            Err(ErrorObjectOwned::from(jsonrpsee::types::ErrorCode::MethodNotFound))
        }
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal { detail: e.to_string() }
}

/// `compute.vm.events.follow`: replays the history after the cursor, then streams live
/// transitions, each exactly once, until the client unfollows or goes away.
async fn follow(
    params: Params<'static>,
    pending: PendingSubscriptionSink,
    vms: Arc<Manager>,
    _: jsonrpsee::Extensions,
) -> SubscriptionResult {
    const NAME: &str = "compute.vm.events.follow";
    let p = match parse_params::<EventsFollowParams>(NAME, &params) {
        Ok(p) => p,
        Err(e) => {
            pending.reject(e).await;
            return Ok(());
        }
    };
    let id = match p.vm_id.map(|v| v.checked(NAME)).transpose() {
        Ok(id) => id,
        Err(e) => {
            pending.reject(e).await;
            return Ok(());
        }
    };
    let mut follower = match vms.follow(id, p.since_seq) {
        Ok(f) => f,
        Err(e) => {
            pending.reject(ErrorObjectOwned::from(e)).await;
            return Ok(());
        }
    };
    let sink = pending.accept().await?;
    loop {
        let event = tokio::select! {
            e = follower.next() => e,
            () = sink.closed() => None,
        };
        let Some(event) = event else {
            return Ok(());
        };
        sink.send(serde_json::value::to_raw_value(&event)?).await?;
    }
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
        (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    /// The id, when it is valid; an invalid-params error naming `vm_id` otherwise.
    fn checked(self, method: &str) -> Result<String, ErrorObjectOwned> {
        if Self::is_valid(&self.0) {
            Ok(self.0)
        } else {
            Err(invalid_field(method, "vm_id", "must be 1 to 64 characters of [a-z0-9-]"))
        }
    }
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsFollowParams {
    #[serde(default)]
    pub vm_id: Option<VmId>,
    #[serde(default)]
    pub since_seq: Option<u64>,
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
    use crate::vm::spec::{MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS};
    use my_hypervisor_policy::vmm::{MAX_CMDLINE, MAX_DISKS, MAX_MEMORY_MIB, MAX_MTU, MAX_NETS, MAX_VCPUS, MIN_MTU};
    let path = |what: &str| json!({"type": "string", "description": format!("{what}: absolute, under an image root, without , = \" or control characters")});
    let disk =
        object(json!({"path": path("Disk image"), "readonly": {"type": "boolean", "default": false}}), &["path"]);
    let net = object(
        json!({
            "bridge": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,15}$"},
            "mac": {"type": "string", "pattern": "^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$", "description": "Unicast MAC"},
            "mtu": {"type": "integer", "minimum": MIN_MTU, "maximum": MAX_MTU},
        }),
        &[],
    );
    object(
        json!({
            "id": vm_id_schema(),
            "vcpus": {"type": "integer", "minimum": 1, "maximum": MAX_VCPUS},
            "memory_mib": {"type": "integer", "minimum": 1, "maximum": MAX_MEMORY_MIB},
            "kernel": path("Kernel image; exactly one of kernel and firmware"),
            "initramfs": path("Initramfs; needs kernel"),
            "cmdline": {"type": "string", "maxLength": MAX_CMDLINE, "description": "Kernel command line; needs kernel"},
            "firmware": path("Firmware image; exactly one of kernel and firmware"),
            "disks": {"type": "array", "items": disk, "maxItems": MAX_DISKS, "default": []},
            "nets": {"type": "array", "items": net, "maxItems": MAX_NETS, "default": []},
            "vsock": {"type": "boolean", "default": false},
            "agent": {"type": "boolean", "description": "Running waits for the guest agent; needs vsock; defaults to the value of vsock"},
            "labels": {
                "type": "object",
                "maxProperties": MAX_LABELS,
                "propertyNames": {"pattern": format!("^[A-Za-z0-9._/-]{{1,{MAX_LABEL_KEY}}}$")},
                "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_VALUE},
                "default": {},
            },
        }),
        &["id", "vcpus", "memory_mib"],
    )
}

fn events_tail_params() -> Value {
    object(
        json!({
            "vm_id": vm_id_schema(),
            "since_seq": {"type": "integer", "minimum": 0, "description": "Only events with a greater seq"},
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_TAIL_LIMIT, "default": DEFAULT_TAIL_LIMIT, "description": "Most events returned"},
        }),
        &[],
    )
}

fn events_follow_params() -> Value {
    object(
        json!({
            "vm_id": vm_id_schema(),
            "since_seq": {"type": "integer", "minimum": 0, "description": "Stream events with a greater seq; default: only new ones"},
        }),
        &[],
    )
}

fn subscription_id_schema() -> Value {
    json!({
        "description": format!("Subscription id. Each event then arrives as a `{EVENT_NOTIFICATION}` notification whose `params.result` is an event as in compute.vm.events.tail"),
        "type": ["integer", "string"],
    })
}

fn unfollow_params() -> Value {
    object(
        json!({"subscription": {"type": ["integer", "string"], "description": "The id compute.vm.events.follow returned"}}),
        &["subscription"],
    )
}

fn unfollow_schema() -> Value {
    json!({"type": "boolean", "description": "Whether a subscription was ended"})
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
            "spec": {"description": "The VM spec (null when its state file was unreadable)", "anyOf": [vm_spec_schema(), {"type": "null"}]},
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
        &["seq", "vm_id", "at", "from", "to", "reason"],
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
    let required: Vec<&str> =
        params_schema["required"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
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
        "paramStructure": if def.method == Method::EventsUnfollow { "by-position" } else { "by-name" },
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
    fn every_application_code_used_is_defined() {
        for def in API {
            for code in def.errors {
                assert!(errors::APPLICATION_CODES.iter().any(|(c, _)| c == code), "{}: {code}", def.name);
            }
        }
    }
}
