//! Every error code the API answers with, in one place.
//!
//! Spec codes (-32700..-32600) come from JSON-RPC 2.0. Transport codes are the ones jsonrpsee
//! defines for limits. Application codes live in -32020..-32029 (exec's in -32040..-32049), clear of
//! the codes jsonrpsee itself uses in -32000..-32011.

use jsonrpsee::types::ErrorObjectOwned;
use serde::de::DeserializeOwned;

use crate::vm::VmError;

pub use jsonrpsee::types::error::{
    INTERNAL_ERROR_CODE, INVALID_PARAMS_CODE, INVALID_REQUEST_CODE, METHOD_NOT_FOUND_CODE, OVERSIZED_REQUEST_CODE,
    OVERSIZED_RESPONSE_CODE, PARSE_ERROR_CODE, TOO_BIG_BATCH_REQUEST_CODE, TOO_BIG_BATCH_RESPONSE_CODE,
    TOO_MANY_SUBSCRIPTIONS_CODE,
};

/// The VM id names no VM.
pub const NO_SUCH_VM: i32 = -32020;
/// The VM's state machine does not allow the requested transition from its current state.
pub const ILLEGAL_TRANSITION: i32 = -32021;
/// Another operation on the same VM is in progress.
pub const BUSY: i32 = -32022;
/// cloud-hypervisor (or the broker that starts it) reported a failure.
pub const VMM_ERROR: i32 = -32023;
/// The VM spec is well-formed JSON but not acceptable (a field is out of range or malformed).
pub const INVALID_SPEC: i32 = -32024;
/// The operation needs a running VM.
pub const NOT_RUNNING: i32 = -32025;
/// The method is defined but its backend is not available.
pub const NOT_READY: i32 = -32026;
/// A VM with this id exists with a different spec.
pub const ALREADY_EXISTS: i32 = -32027;
/// The host already records the most VMs it keeps.
pub const TOO_MANY_VMS: i32 = -32029;

/// The VM was created without a guest agent, so exec has nothing to talk to.
pub const NO_AGENT: i32 = -32040;
/// The guest agent did not answer (connect, handshake) or broke the exec protocol.
pub const AGENT_UNREACHABLE: i32 = -32041;
/// The command did not finish within its timeout; the guest killed its process group.
pub const EXEC_TIMEOUT: i32 = -32042;
/// The guest agent refused the command or could not run it (no such program, say).
pub const EXEC_REFUSED: i32 = -32043;

/// An application error: maps one-to-one onto the codes above.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("no such VM: {vm_id:?}")]
    NoSuchVm { vm_id: String },
    #[error("VM {vm_id:?} cannot go from {from} to {to}")]
    IllegalTransition { vm_id: String, from: String, to: String },
    #[error("VM {vm_id:?} is busy: {detail}")]
    Busy { vm_id: String, detail: String },
    #[error("VMM error for VM {vm_id:?}: {detail}")]
    Vmm { vm_id: String, detail: String },
    #[error("invalid spec: field `{field}`: {detail}")]
    InvalidSpec { field: String, detail: String },
    #[error("VM {vm_id:?} is not running")]
    NotRunning { vm_id: String },
    #[error("method {method} is not ready: its backend is not built yet")]
    NotReady { method: &'static str },
    #[error("VM {vm_id:?} already exists with a different spec")]
    AlreadyExists { vm_id: String },
    #[error("VM {vm_id:?} was created without a guest agent (`agent: false`)")]
    NoAgent { vm_id: String },
    #[error("the guest agent of VM {vm_id:?} is unreachable: {detail}")]
    AgentUnreachable { vm_id: String, detail: String },
    #[error("exec in VM {vm_id:?} timed out: {detail}")]
    ExecTimeout { vm_id: String, detail: String },
    #[error("the guest agent of VM {vm_id:?} refused the command: {detail}")]
    ExecRefused { vm_id: String, detail: String },
    #[error("this host already records {max} VMs, the most it keeps")]
    TooManyVms { max: usize },
    /// A follow cursor whose events have left the history; answered as -32602 on `since_seq`.
    #[error(
        "invalid params: field `since_seq`: events after seq {since} have left the history; list again and follow from its seq (the oldest whole cursor is {oldest_seq})"
    )]
    CursorTruncated { since: u64, oldest_seq: u64 },
    /// A failure of the frontend itself (its state dir, say); answered as -32603.
    #[error("internal error: {detail}")]
    Internal { detail: String },
}

impl ApiError {
    pub fn code(&self) -> i32 {
        match self {
            ApiError::NoSuchVm { .. } => NO_SUCH_VM,
            ApiError::IllegalTransition { .. } => ILLEGAL_TRANSITION,
            ApiError::Busy { .. } => BUSY,
            ApiError::Vmm { .. } => VMM_ERROR,
            ApiError::InvalidSpec { .. } => INVALID_SPEC,
            ApiError::NotRunning { .. } => NOT_RUNNING,
            ApiError::NotReady { .. } => NOT_READY,
            ApiError::AlreadyExists { .. } => ALREADY_EXISTS,
            ApiError::NoAgent { .. } => NO_AGENT,
            ApiError::AgentUnreachable { .. } => AGENT_UNREACHABLE,
            ApiError::ExecTimeout { .. } => EXEC_TIMEOUT,
            ApiError::ExecRefused { .. } => EXEC_REFUSED,
            ApiError::TooManyVms { .. } => TOO_MANY_VMS,
            ApiError::CursorTruncated { .. } => INVALID_PARAMS_CODE,
            ApiError::Internal { .. } => INTERNAL_ERROR_CODE,
        }
    }

    pub fn invalid_spec(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::InvalidSpec { field: field.into(), detail: detail.into() }
    }
}

impl ApiError {
    /// The structured `data` of the error object: what a client can act on without parsing
    /// the message.
    pub fn data(&self) -> Option<serde_json::Value> {
        use serde_json::json;
        match self {
            ApiError::NoSuchVm { vm_id }
            | ApiError::Busy { vm_id, .. }
            | ApiError::Vmm { vm_id, .. }
            | ApiError::NotRunning { vm_id }
            | ApiError::AlreadyExists { vm_id }
            | ApiError::NoAgent { vm_id }
            | ApiError::AgentUnreachable { vm_id, .. }
            | ApiError::ExecTimeout { vm_id, .. }
            | ApiError::ExecRefused { vm_id, .. } => Some(json!({ "vm_id": vm_id })),
            ApiError::IllegalTransition { vm_id, from, to } => Some(json!({ "vm_id": vm_id, "state": from, "to": to })),
            ApiError::InvalidSpec { field, .. } => Some(json!({ "field": field })),
            ApiError::NotReady { method } => Some(json!({ "method": method })),
            ApiError::TooManyVms { max } => Some(json!({ "max": max })),
            ApiError::CursorTruncated { oldest_seq, .. } => {
                Some(json!({ "field": "since_seq", "truncated": true, "oldest_seq": oldest_seq }))
            }
            ApiError::Internal { .. } => None,
        }
    }
}

impl From<ApiError> for ErrorObjectOwned {
    fn from(e: ApiError) -> Self {
        ErrorObjectOwned::owned(e.code(), e.to_string(), e.data())
    }
}

/// An invalid-params error whose `data` names the offending `field`.
pub fn invalid_params_for(field: &str, message: String) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(INVALID_PARAMS_CODE, message, Some(serde_json::json!({ "field": field })))
}

/// The VM layer's errors, each on its code. Failures of the frontend itself (the state dir, a
/// task that died) are internal errors, with their whole chain of causes in the message.
impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::NoSuchVm { vm_id } => ApiError::NoSuchVm { vm_id },
            VmError::IllegalTransition { vm_id, from, to } => ApiError::IllegalTransition { vm_id, from, to },
            VmError::Busy { vm_id, detail } => ApiError::Busy { vm_id, detail },
            VmError::Vmm { vm_id, detail } => ApiError::Vmm { vm_id, detail },
            VmError::InvalidSpec { field, detail } => ApiError::InvalidSpec { field, detail },
            VmError::NotRunning { vm_id } => ApiError::NotRunning { vm_id },
            VmError::NotReady { method } => ApiError::NotReady { method },
            VmError::AlreadyExists { vm_id } => ApiError::AlreadyExists { vm_id },
            VmError::NoAgent { vm_id } => ApiError::NoAgent { vm_id },
            VmError::AgentUnreachable { vm_id, detail } => ApiError::AgentUnreachable { vm_id, detail },
            VmError::ExecTimeout { vm_id, detail } => ApiError::ExecTimeout { vm_id, detail },
            VmError::ExecRefused { vm_id, detail } => ApiError::ExecRefused { vm_id, detail },
            VmError::TooManyVms { max } => ApiError::TooManyVms { max },
            VmError::CursorTruncated { since, oldest_seq } => ApiError::CursorTruncated { since, oldest_seq },
            e @ (VmError::Store { .. } | VmError::Task { .. } | VmError::Ended { .. }) => {
                let mut detail = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    detail.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                ApiError::Internal { detail }
            }
        }
    }
}

impl From<VmError> for ErrorObjectOwned {
    fn from(e: VmError) -> Self {
        ApiError::from(e).into()
    }
}

/// Every application code with a short name, for the docs and rpc.discover.
pub const APPLICATION_CODES: &[(i32, &str)] = &[
    (NO_SUCH_VM, "no such VM"),
    (ILLEGAL_TRANSITION, "illegal transition"),
    (BUSY, "busy"),
    (VMM_ERROR, "VMM error"),
    (INVALID_SPEC, "invalid spec"),
    (NOT_RUNNING, "not running"),
    (NOT_READY, "not ready"),
    (ALREADY_EXISTS, "already exists"),
    (NO_AGENT, "no guest agent"),
    (AGENT_UNREACHABLE, "guest agent unreachable"),
    (EXEC_TIMEOUT, "exec timed out"),
    (EXEC_REFUSED, "exec refused"),
    (TOO_MANY_VMS, "too many VMs"),
];

/// Parses by-name params into `T`. Absent params count as `{}`. The error message names the
/// offending field (as a path such as `disks[0].readonly`) and what was wrong with it.
pub fn parse_params<T: DeserializeOwned>(
    method: &str,
    params: &jsonrpsee::types::Params<'_>,
) -> Result<T, ErrorObjectOwned> {
    let raw = params.as_str().unwrap_or("{}");
    let de = &mut serde_json::Deserializer::from_str(raw);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde_json appends the position in the params text; the field path says more.
        let what = match inner.rsplit_once(" at line ") {
            Some((what, pos)) if pos.contains(" column ") => what,
            _ => &inner,
        };
        if path == "." {
            // A missing field is named only in serde's message: "missing field `x`".
            let missing = what.strip_prefix("missing field `").and_then(|r| r.strip_suffix('`'));
            let message = format!("invalid params for {method}: {what}");
            match missing {
                Some(field) => invalid_params_for(field, message),
                None => ErrorObjectOwned::owned(INVALID_PARAMS_CODE, message, None::<()>),
            }
        } else {
            invalid_params_for(&path, format!("invalid params for {method}: field `{path}`: {what}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_codes_are_in_range_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for (code, _) in APPLICATION_CODES {
            assert!((-32099..=-32000).contains(code), "{code}");
            assert!(seen.insert(*code), "duplicate {code}");
            assert!(!(-32011..=-32000).contains(code), "{code} clashes with a jsonrpsee code");
        }
    }

    #[test]
    fn invalid_params_name_the_field() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct P {
            vm_id: String,
            disks: Vec<D>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct D {
            readonly: bool,
        }
        let raw = r#"{"vm_id":"a","disks":[{"readonly":"yes"}]}"#;
        let params = jsonrpsee::types::Params::new(Some(raw));
        let e = parse_params::<P>("m", &params).unwrap_err();
        assert_eq!(e.code(), INVALID_PARAMS_CODE);
        assert_eq!(
            e.message(),
            "invalid params for m: field `disks[0].readonly`: invalid type: string \"yes\", expected a boolean"
        );
        let e = parse_params::<P>("m", &jsonrpsee::types::Params::new(None)).unwrap_err();
        assert_eq!(e.message(), "invalid params for m: missing field `vm_id`");
    }

    #[test]
    fn vm_errors_map_to_their_codes() {
        let io = std::io::Error::other("disk full");
        let cases = [
            (VmError::no_such_vm("a"), NO_SUCH_VM),
            (
                VmError::IllegalTransition { vm_id: "a".into(), from: "running".into(), to: "removed".into() },
                ILLEGAL_TRANSITION,
            ),
            (VmError::Busy { vm_id: "a".into(), detail: "x".into() }, BUSY),
            (VmError::Vmm { vm_id: "a".into(), detail: "x".into() }, VMM_ERROR),
            (VmError::invalid_spec("vcpus", "x"), INVALID_SPEC),
            (VmError::NotRunning { vm_id: "a".into() }, NOT_RUNNING),
            (VmError::NotReady { method: "compute.vm.start" }, NOT_READY),
            (VmError::AlreadyExists { vm_id: "a".into() }, ALREADY_EXISTS),
            (VmError::NoAgent { vm_id: "a".into() }, NO_AGENT),
            (VmError::AgentUnreachable { vm_id: "a".into(), detail: "x".into() }, AGENT_UNREACHABLE),
            (VmError::ExecTimeout { vm_id: "a".into(), detail: "x".into() }, EXEC_TIMEOUT),
            (VmError::ExecRefused { vm_id: "a".into(), detail: "x".into() }, EXEC_REFUSED),
            (VmError::TooManyVms { max: 3 }, TOO_MANY_VMS),
            (VmError::CursorTruncated { since: 1, oldest_seq: 9 }, INVALID_PARAMS_CODE),
            (VmError::store("writing state.json", io), INTERNAL_ERROR_CODE),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let api = ApiError::from(e);
            assert_eq!(api.code(), code, "{text}");
            if code == INTERNAL_ERROR_CODE {
                assert_eq!(api.to_string(), "internal error: writing state.json: disk full");
            }
        }
    }

    #[test]
    fn not_ready_names_the_method() {
        let e: ErrorObjectOwned = ApiError::NotReady { method: "compute.vm.start" }.into();
        assert_eq!(e.code(), NOT_READY);
        assert!(e.message().contains("compute.vm.start"));
        assert!(e.message().contains("not built yet"));
    }
}
