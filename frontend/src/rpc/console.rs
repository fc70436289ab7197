//! `compute.vm.console.endpoint` and `compute.vm.logs`, served by [`crate::console`].

use std::sync::Arc;

use base64::Engine;
use schemars::JsonSchema;
use serde::Serialize;

use super::api::{Answer, Handler, invalid_field};
use super::errors::ApiError;
use super::params::{LogStream, LogsParams, VmId, VmIdParams};
use crate::console::{ConsoleError, Consoles};
use crate::vm::Manager;

/// Default and largest `max_bytes` of `compute.vm.logs` (base64 makes the answer a third
/// larger, and it must stay under the response limit).
pub const DEFAULT_LOG_BYTES: u64 = 64 * 1024;
pub const MAX_LOG_BYTES: u64 = 512 * 1024;

/// How bytes cross the API: the only encoding is base64 (RFC 4648, with padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Base64,
}

/// What a console socket carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleProtocol {
    /// The serial port's bytes, both ways, unframed.
    Raw,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ConsoleResult {
    #[schemars(with = "VmId")]
    pub vm_id: String,
    /// Path of the Unix socket that carries the serial console.
    pub path: String,
    pub protocol: ConsoleProtocol,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct LogsResult {
    #[schemars(with = "VmId")]
    pub vm_id: String,
    pub stream: LogStream,
    /// The bytes, encoded as `encoding` says.
    pub data: String,
    pub encoding: Encoding,
    /// Whether older output was left out.
    pub truncated: bool,
}

fn consoles(method: &'static str) -> Answer<Arc<Consoles>> {
    crate::console::installed().ok_or_else(|| ApiError::NotReady { method }.into())
}

fn console_error(e: ConsoleError) -> jsonrpsee::types::ErrorObjectOwned {
    match e {
        ConsoleError::NotRunning(vm_id) => ApiError::NotRunning { vm_id }.into(),
        e @ ConsoleError::Read { .. } => {
            let detail = match std::error::Error::source(&e) {
                Some(c) => format!("{e}: {c}"),
                None => e.to_string(),
            };
            ApiError::Internal { detail }.into()
        }
    }
}

pub struct ConsoleEndpoint;

impl Handler for ConsoleEndpoint {
    type Params = VmIdParams;
    type Result = ConsoleResult;
    async fn call(method: &'static str, vms: Arc<Manager>, p: VmIdParams) -> Answer<ConsoleResult> {
        let consoles = consoles(method)?;
        vms.state(p.vm_id.as_str())?;
        let path = consoles.endpoint(p.vm_id.as_str()).map_err(console_error)?;
        Ok(ConsoleResult {
            vm_id: p.vm_id.into_string(),
            path: path.to_string_lossy().into_owned(),
            protocol: ConsoleProtocol::Raw,
        })
    }
}

pub struct Logs;

impl Handler for Logs {
    type Params = LogsParams;
    type Result = LogsResult;
    async fn call(method: &'static str, vms: Arc<Manager>, p: LogsParams) -> Answer<LogsResult> {
        let max = p.max_bytes.unwrap_or(DEFAULT_LOG_BYTES);
        if !(1..=MAX_LOG_BYTES).contains(&max) {
            return Err(invalid_field(method, "max_bytes", &format!("must be between 1 and {MAX_LOG_BYTES}")));
        }
        let consoles = consoles(method)?;
        vms.state(p.vm_id.as_str())?;
        let id = p.vm_id.as_str();
        let (data, truncated) = match p.stream {
            LogStream::Console => consoles.console_tail(id, max),
            LogStream::Vmm => consoles.vmm_tail(id, max),
        }
        .map_err(console_error)?;
        Ok(LogsResult {
            vm_id: p.vm_id.into_string(),
            stream: p.stream,
            data: base64::engine::general_purpose::STANDARD.encode(data),
            encoding: Encoding::Base64,
            truncated,
        })
    }
}
