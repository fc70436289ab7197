//! The API surface: one table ([`API`]) lists every method with its handler and errors. A
//! handler names its params and result types ([`Handler`]); the table takes both the
//! registration (parse the params into that type, serialize that result type) and the
//! schemas `rpc.discover` serves ([`super::schema`]) from those same types, so what is served
//! and what is described cannot drift.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use jsonrpsee::RpcModule;
use jsonrpsee::core::{RegisterMethodError, SubscriptionResult};
use jsonrpsee::types::{ErrorObjectOwned, Params};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::console::{ConsoleEndpoint, Logs};
use super::errors::{self, ApiError, parse_params};
use super::handlers::*;
use super::schema::schema_for;
use crate::vm::Manager;
pub use crate::vm::spec::{DiskSpec, NetSpec, VmSpec};

use errors::{
    AGENT_UNREACHABLE, ALREADY_EXISTS, BUSY, EXEC_REFUSED, EXEC_TIMEOUT, ILLEGAL_TRANSITION, INVALID_SPEC, NO_AGENT,
    NO_SUCH_VM, NOT_READY, NOT_RUNNING, TOO_MANY_VMS, VMM_ERROR,
};

/// The name of the notifications `compute.vm.events.follow` sends.
pub const EVENT_NOTIFICATION: &str = "compute.vm.event";

/// What a method answers: its result, or an error object.
pub type Answer<R> = Result<R, ErrorObjectOwned>;

/// A method served by a call: its params are parsed into [`Handler::Params`] and its result
/// serialized from [`Handler::Result`], the types its schemas are derived from.
pub trait Handler: 'static {
    type Params: DeserializeOwned + JsonSchema + Send;
    type Result: Serialize + JsonSchema;
    fn call(
        method: &'static str,
        vms: Arc<Manager>,
        params: Self::Params,
    ) -> impl Future<Output = Answer<Self::Result>> + Send;
}

/// A method served by a subscription: its params are parsed into [`Subscription::Params`];
/// it answers with a subscription id, then sends notifications.
pub trait Subscription: 'static {
    type Params: DeserializeOwned + JsonSchema + Send;
    /// What the subscribe call answers with.
    type Result: JsonSchema;
    /// The method that ends the subscription.
    const UNSUBSCRIBE: &'static str;
    const NOTIFICATION: &'static str;
    fn run(
        method: &'static str,
        vms: Arc<Manager>,
        params: Self::Params,
        pending: jsonrpsee::PendingSubscriptionSink,
    ) -> impl Future<Output = SubscriptionResult> + Send;
}

type Register = fn(&mut RpcModule<Manager>, &'static MethodDef) -> Result<(), RegisterMethodError>;
type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// One served method and its description.
pub struct MethodDef {
    pub name: &'static str,
    pub summary: &'static str,
    /// Application error codes the method can answer with (besides the spec codes).
    pub errors: &'static [i32],
    /// Whether its params are given by position (an array) rather than by name.
    pub by_position: bool,
    /// JSON Schema of the params object: the schema of the type they are parsed into.
    pub params: SchemaFn,
    /// JSON Schema of the result: the schema of the type that is serialized.
    pub result: SchemaFn,
    register: Register,
}

impl std::fmt::Debug for MethodDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MethodDef").field("name", &self.name).field("errors", &self.errors).finish_non_exhaustive()
    }
}

impl MethodDef {
    /// A method served by a call to `H`.
    const fn call<H: Handler>(name: &'static str, summary: &'static str, errors: &'static [i32]) -> MethodDef {
        MethodDef {
            name,
            summary,
            errors,
            by_position: false,
            params: schema_for::<H::Params>,
            result: schema_for::<H::Result>,
            register: register_call::<H>,
        }
    }

    /// A method served by the subscription `S`.
    const fn subscription<S: Subscription>(
        name: &'static str,
        summary: &'static str,
        errors: &'static [i32],
    ) -> MethodDef {
        MethodDef {
            name,
            summary,
            errors,
            by_position: false,
            params: schema_for::<S::Params>,
            result: schema_for::<S::Result>,
            register: register_subscription::<S>,
        }
    }

    /// The method that ends a subscription: jsonrpsee parses its one positional param itself
    /// and registers it with its subscription.
    const fn unsubscribe(name: &'static str, summary: &'static str) -> MethodDef {
        MethodDef {
            name,
            summary,
            errors: &[],
            by_position: true,
            params: schema_for::<super::params::UnfollowParams>,
            result: schema_for::<bool>,
            register: |_, _| Ok(()),
        }
    }
}

/// Every method the API serves.
pub const API: &[MethodDef] = &[
    MethodDef::call::<Create>(
        "compute.vm.create",
        "Define a new VM from a spec. It starts in state `pending`.",
        &[INVALID_SPEC, ALREADY_EXISTS, BUSY, TOO_MANY_VMS],
    ),
    MethodDef::call::<Start>(
        "compute.vm.start",
        "Boot a created or stopped VM.",
        &[NO_SUCH_VM, ILLEGAL_TRANSITION, BUSY, VMM_ERROR, NOT_READY],
    ),
    MethodDef::call::<Stop>(
        "compute.vm.stop",
        "Shut a running VM down; after `timeout_secs` it is killed.",
        &[NO_SUCH_VM, ILLEGAL_TRANSITION, BUSY, VMM_ERROR, NOT_RUNNING, NOT_READY],
    ),
    MethodDef::call::<Remove>(
        "compute.vm.remove",
        "Forget a VM in which no VMM can be alive; a failed VM's leftovers are released first.",
        &[NO_SUCH_VM, ILLEGAL_TRANSITION, BUSY, VMM_ERROR, NOT_READY],
    ),
    MethodDef::call::<Status>("compute.vm.status", "One VM's state, spec and process details.", &[NO_SUCH_VM]),
    MethodDef::call::<List>("compute.vm.list", "Every VM with its state and labels.", &[]),
    MethodDef::call::<EventsTail>(
        "compute.vm.events.tail",
        "State transitions recorded after `since_seq`, oldest first.",
        &[NO_SUCH_VM],
    ),
    MethodDef::subscription::<EventsFollow>(
        "compute.vm.events.follow",
        "Subscribe to state transitions after `since_seq`: each arrives as a `compute.vm.event` notification.",
        &[NO_SUCH_VM],
    ),
    MethodDef::unsubscribe(EventsFollow::UNSUBSCRIBE, "End a `compute.vm.events.follow` subscription."),
    MethodDef::call::<ConsoleEndpoint>(
        "compute.vm.console.endpoint",
        "Path of the Unix socket that carries the VM's serial console.",
        &[NO_SUCH_VM, NOT_RUNNING, NOT_READY],
    ),
    MethodDef::call::<Logs>(
        "compute.vm.logs",
        "The end of the VM's serial log or of its VMM's own output, base64-encoded.",
        &[NO_SUCH_VM, NOT_RUNNING, NOT_READY],
    ),
    MethodDef::call::<Exec>(
        "compute.vm.exec",
        "Run a command in the guest through the vsock agent and wait for it.",
        &[NO_SUCH_VM, NOT_RUNNING, BUSY, NOT_READY, NO_AGENT, AGENT_UNREACHABLE, EXEC_TIMEOUT, EXEC_REFUSED],
    ),
    MethodDef::call::<Discover>("rpc.discover", "This API described as an OpenRPC document.", &[]),
];

/// Registers every method of [`API`] on a new module whose context is `manager`.
pub fn rpc_module(manager: Manager) -> Result<RpcModule<Manager>, RegisterMethodError> {
    let mut module = RpcModule::new(manager);
    for def in API {
        (def.register)(&mut module, def)?;
    }
    Ok(module)
}

type BoxedAnswer = Pin<Box<dyn Future<Output = Answer<Value>> + Send>>;

fn register_call<H: Handler>(
    module: &mut RpcModule<Manager>,
    def: &'static MethodDef,
) -> Result<(), RegisterMethodError> {
    let name = def.name;
    module.register_async_method(name, move |params, vms, _| -> BoxedAnswer {
        Box::pin(async move {
            let p = by_name::<H::Params>(name, &params)?;
            let result = H::call(name, vms, p).await?;
            serde_json::to_value(result).map_err(|e| ApiError::Internal { detail: e.to_string() }.into())
        })
    })?;
    Ok(())
}

fn register_subscription<S: Subscription>(
    module: &mut RpcModule<Manager>,
    def: &'static MethodDef,
) -> Result<(), RegisterMethodError> {
    let name = def.name;
    module.register_subscription(name, S::NOTIFICATION, S::UNSUBSCRIBE, move |params, pending, vms, _| async move {
        match by_name::<S::Params>(name, &params) {
            Ok(p) => S::run(name, vms, p, pending).await,
            Err(e) => {
                pending.reject(e).await;
                Ok(())
            }
        }
    })?;
    Ok(())
}

/// Parses by-name params. Positional ones (an array) are refused: serde would otherwise read a
/// struct from them field by field, which the API does not promise.
fn by_name<T: DeserializeOwned>(method: &str, params: &Params<'_>) -> Answer<T> {
    if params.as_str().is_some() && !params.is_object() {
        return Err(ErrorObjectOwned::owned(
            errors::INVALID_PARAMS_CODE,
            format!("invalid params for {method}: params must be an object of named fields"),
            None::<()>,
        ));
    }
    parse_params(method, params)
}

/// An invalid-params error naming `field`.
pub fn invalid_field(method: &str, field: &str, what: &str) -> ErrorObjectOwned {
    errors::invalid_params_for(field, format!("invalid params for {method}: field `{field}` {what}"))
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

    #[test]
    fn names_are_unique() {
        let names: std::collections::BTreeSet<&str> = API.iter().map(|d| d.name).collect();
        assert_eq!(names.len(), API.len());
    }
}
