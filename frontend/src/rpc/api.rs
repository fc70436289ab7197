//! The API surface: one table ([`API`]) lists every method with its params type, result type
//! and errors. The server registers and dispatches from it, and `rpc.discover`
//! ([`super::schema`]) describes it with schemas derived from those types, so the two cannot
//! drift.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use jsonrpsee::core::{RegisterMethodError, SubscriptionResult};
use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::{PendingSubscriptionSink, RpcModule};
use schemars::{Schema, SchemaGenerator};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::errors::{self, ApiError, parse_params};
use super::params::*;
use super::results::*;
use super::schema::{OpenRpcDocument, openrpc_document, schema_for};
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
    /// JSON Schema of the params object: the schema of the type `dispatch` parses them into.
    pub params: fn(&mut SchemaGenerator) -> Schema,
    /// JSON Schema of the result: the schema of the type `dispatch` serializes.
    pub result: fn(&mut SchemaGenerator) -> Schema,
    /// Application error codes the method can answer with (besides the spec codes).
    pub errors: &'static [i32],
}

use errors::{ALREADY_EXISTS, BUSY, ILLEGAL_TRANSITION, INVALID_SPEC, NO_SUCH_VM, NOT_READY, NOT_RUNNING, VMM_ERROR};

/// The name of the notifications `compute.vm.events.follow` sends.
pub const EVENT_NOTIFICATION: &str = "compute.vm.event";

/// Every method the API serves.
pub const API: &[MethodDef] = &[
    MethodDef {
        name: "compute.vm.create",
        method: Method::Create,
        summary: "Define a new VM from a spec. It starts in state `pending`.",
        params: schema_for::<VmSpec>,
        result: schema_for::<VmStateResult>,
        errors: &[INVALID_SPEC, ALREADY_EXISTS, BUSY],
    },
    MethodDef {
        name: "compute.vm.start",
        method: Method::Start,
        summary: "Boot a created or stopped VM.",
        params: schema_for::<VmIdParams>,
        result: schema_for::<VmStateResult>,
        errors: &[NO_SUCH_VM, ILLEGAL_TRANSITION, BUSY, VMM_ERROR, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.stop",
        method: Method::Stop,
        summary: "Shut a running VM down; after `timeout_secs` it is killed.",
        params: schema_for::<StopParams>,
        result: schema_for::<VmStateResult>,
        errors: &[NO_SUCH_VM, ILLEGAL_TRANSITION, BUSY, VMM_ERROR, NOT_RUNNING, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.remove",
        method: Method::Remove,
        summary: "Forget a VM in which no VMM can be alive; a failed VM's leftovers are released first.",
        params: schema_for::<VmIdParams>,
        result: schema_for::<RemovedResult>,
        errors: &[NO_SUCH_VM, ILLEGAL_TRANSITION, BUSY, VMM_ERROR, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.status",
        method: Method::Status,
        summary: "One VM's state, spec and process details.",
        params: schema_for::<VmIdParams>,
        result: schema_for::<StatusResult>,
        errors: &[NO_SUCH_VM],
    },
    MethodDef {
        name: "compute.vm.list",
        method: Method::List,
        summary: "Every VM with its state and labels.",
        params: schema_for::<Empty>,
        result: schema_for::<ListResult>,
        errors: &[],
    },
    MethodDef {
        name: "compute.vm.events.tail",
        method: Method::EventsTail,
        summary: "State transitions recorded after `since_seq`, oldest first.",
        params: schema_for::<EventsTailParams>,
        result: schema_for::<TailResult>,
        errors: &[NO_SUCH_VM],
    },
    MethodDef {
        name: "compute.vm.events.follow",
        method: Method::EventsFollow,
        summary: "Subscribe to state transitions after `since_seq`: each arrives as a `compute.vm.event` notification.",
        params: schema_for::<EventsFollowParams>,
        result: schema_for::<SubscriptionId>,
        errors: &[NO_SUCH_VM],
    },
    MethodDef {
        name: "compute.vm.events.unfollow",
        method: Method::EventsUnfollow,
        summary: "End a `compute.vm.events.follow` subscription.",
        params: schema_for::<UnfollowParams>,
        result: schema_for::<UnfollowResult>,
        errors: &[],
    },
    MethodDef {
        name: "compute.vm.console.endpoint",
        method: Method::ConsoleEndpoint,
        summary: "Path of the Unix socket that carries the VM's serial console.",
        params: schema_for::<VmIdParams>,
        result: schema_for::<ConsoleResult>,
        errors: &[NO_SUCH_VM, NOT_RUNNING, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.logs",
        method: Method::Logs,
        summary: "The end of the VM's console or VMM log.",
        params: schema_for::<LogsParams>,
        result: schema_for::<LogsResult>,
        errors: &[NO_SUCH_VM, NOT_READY],
    },
    MethodDef {
        name: "compute.vm.exec",
        method: Method::Exec,
        summary: "Run a command in the guest through the vsock agent and wait for it.",
        params: schema_for::<ExecParams>,
        result: schema_for::<ExecResult>,
        errors: &[NO_SUCH_VM, NOT_RUNNING, BUSY, VMM_ERROR, NOT_READY],
    },
    MethodDef {
        name: "rpc.discover",
        method: Method::Discover,
        summary: "This API described as an OpenRPC document.",
        params: schema_for::<Empty>,
        result: schema_for::<OpenRpcDocument>,
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
    let state = |vm_id: VmId| move |state| VmStateResult { vm_id: vm_id.into_string(), state };
    match def.method {
        Method::Create => {
            let spec = by_name::<VmSpec>(name, &params)?;
            let id = spec.id.clone();
            reply(vms.create(spec).map(|state| VmStateResult { vm_id: id, state }))
        }
        Method::Start => {
            let id = by_name::<VmIdParams>(name, &params)?.vm_id;
            reply(vms.start(id.as_str()).await.map(state(id)))
        }
        Method::Stop => {
            let p = by_name::<StopParams>(name, &params)?;
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
            reply(vms.stop(p.vm_id.as_str(), grace).await.map(state(p.vm_id)))
        }
        Method::Remove => {
            let id = by_name::<VmIdParams>(name, &params)?.vm_id;
            reply(vms.remove(id.as_str()).await.map(|()| RemovedResult { vm_id: id.into_string(), removed: true }))
        }
        Method::Status => {
            let id = by_name::<VmIdParams>(name, &params)?.vm_id;
            reply(vms.status(id.as_str()).map(StatusResult::from))
        }
        Method::List => {
            by_name::<Empty>(name, &params)?;
            reply(Ok(ListResult::from(vms.list())))
        }
        Method::EventsTail => {
            let p = by_name::<EventsTailParams>(name, &params)?;
            let limit = p.limit.unwrap_or(DEFAULT_TAIL_LIMIT);
            if !(1..=MAX_TAIL_LIMIT).contains(&limit) {
                return Err(invalid_field(name, "limit", &format!("must be between 1 and {MAX_TAIL_LIMIT}")));
            }
            let id = p.vm_id.as_ref().map(VmId::as_str);
            reply(vms.tail(id, p.since_seq.unwrap_or(0), limit as usize).map(TailResult::from))
        }
        Method::ConsoleEndpoint => {
            by_name::<VmIdParams>(name, &params)?;
            Err(ApiError::NotReady { method: name }.into())
        }
        Method::Logs => {
            if by_name::<LogsParams>(name, &params)?.max_bytes == Some(0) {
                return Err(invalid_field(name, "max_bytes", "must be at least 1"));
            }
            Err(ApiError::NotReady { method: name }.into())
        }
        Method::Exec => {
            let p = by_name::<ExecParams>(name, &params)?;
            if p.argv.is_empty() {
                return Err(invalid_field(name, "argv", "must name a program"));
            }
            Err(ApiError::NotReady { method: name }.into())
        }
        Method::Discover => {
            by_name::<Empty>(name, &params)?;
            // The document never changes while the process runs.
            static DOCUMENT: OnceLock<Value> = OnceLock::new();
            let doc = DOCUMENT.get_or_init(|| serde_json::to_value(openrpc_document()).unwrap_or(Value::Null));
            if doc.is_null() {
                return Err(ApiError::Internal { detail: "the OpenRPC document does not serialize".into() }.into());
            }
            Ok(doc.clone())
        }
        // Served by the subscription machinery, never through here.
        Method::EventsFollow | Method::EventsUnfollow => {
            Err(ErrorObjectOwned::from(jsonrpsee::types::ErrorCode::MethodNotFound))
        }
    }
}

/// A method's answer as JSON: its result type serialized, or its error.
fn reply<T: Serialize>(result: Result<T, ApiError>) -> Result<Value, ErrorObjectOwned> {
    let value =
        result.and_then(|r| serde_json::to_value(r).map_err(|e| ApiError::Internal { detail: e.to_string() }))?;
    Ok(value)
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
    let p = match by_name::<EventsFollowParams>(NAME, &params) {
        Ok(p) => p,
        Err(e) => {
            pending.reject(e).await;
            return Ok(());
        }
    };
    let mut follower = match vms.follow(p.vm_id.map(VmId::into_string), p.since_seq) {
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
        sink.send(serde_json::value::to_raw_value(&EventResult::from(event))?).await?;
    }
}

/// Parses by-name params. Positional ones (an array) are refused: serde would otherwise read a
/// struct from them field by field, which the API does not promise.
fn by_name<T: DeserializeOwned>(method: &str, params: &Params<'_>) -> Result<T, ErrorObjectOwned> {
    if params.as_str().is_some() && !params.is_object() {
        return Err(ErrorObjectOwned::owned(
            errors::INVALID_PARAMS_CODE,
            format!("invalid params for {method}: params must be an object of named fields"),
            None::<()>,
        ));
    }
    parse_params(method, params)
}

fn invalid_field(method: &str, field: &str, what: &str) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        errors::INVALID_PARAMS_CODE,
        format!("invalid params for {method}: field `{field}` {what}"),
        None::<()>,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_application_code_used_is_defined() {
        for def in API {
            for code in def.errors {
                assert!(errors::APPLICATION_CODES.iter().any(|(c, _)| c == code), "{}: {code}", def.name);
            }
        }
    }
}
