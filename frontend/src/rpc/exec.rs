//! `compute.vm.exec`: the params are checked here (the rules the guest applies too, from
//! the protocol crate), stdin is decoded from base64, the VM layer runs the command, and the
//! output goes back as base64.

use std::sync::Arc;

use my_hypervisor_exec_proto::{ExecRequest, ExitStatus, HostFrame, MAX_ARGS, encode};

use super::api::{Answer, invalid_field};
use super::bytes::{self, Encoding};
use super::params::ExecParams;
use super::results::ExecResult;
use crate::vm::Manager;

/// Output kept per stream when the call does not say.
pub const DEFAULT_EXEC_OUTPUT: u64 = 64 * 1024;
/// The most output per stream a call may ask for: both streams, as base64, stay well under
/// the default response limit (1 MiB).
pub const MAX_EXEC_OUTPUT: u64 = 256 * 1024;
/// The longest timeout a call may ask for (a day, as the guest allows), and the default.
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 24 * 60 * 60;
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = crate::exec::conn::DEFAULT_TIMEOUT_SECS as u64;
/// The most stdin one call may carry (decoded); the request line limit bounds it anyway.
pub const MAX_EXEC_STDIN: usize = 1024 * 1024;

pub async fn call(method: &'static str, vms: Arc<Manager>, mut p: ExecParams) -> Answer<ExecResult> {
    if p.argv.is_empty() {
        return Err(invalid_field(method, "argv", "must name a program"));
    }
    if p.argv.len() > MAX_ARGS {
        return Err(invalid_field(method, "argv", &format!("must have at most {MAX_ARGS} entries")));
    }
    let timeout = p.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS);
    if !(1..=MAX_EXEC_TIMEOUT_SECS).contains(&timeout) {
        return Err(invalid_field(method, "timeout_secs", &format!("must be between 1 and {MAX_EXEC_TIMEOUT_SECS}")));
    }
    let max_output = p.max_output_bytes.unwrap_or(DEFAULT_EXEC_OUTPUT);
    if max_output > MAX_EXEC_OUTPUT {
        return Err(invalid_field(method, "max_output_bytes", &format!("must be at most {MAX_EXEC_OUTPUT}")));
    }
    // The base64 text is dropped once decoded.
    let stdin = match p.stdin.take() {
        Some(text) => {
            let data = bytes::decode(&text).map_err(|why| invalid_field(method, "stdin", &why))?;
            if data.len() > MAX_EXEC_STDIN {
                return Err(invalid_field(method, "stdin", &format!("must decode to at most {MAX_EXEC_STDIN} bytes")));
            }
            Some(data)
        }
        None => None,
    };
    let req = ExecRequest {
        argv: p.argv,
        env: p.env.into_iter().collect(),
        cwd: p.cwd,
        timeout_secs: u32::try_from(timeout).ok(),
        max_output_bytes: Some(max_output),
        stdin: stdin.is_some(),
    };
    // The guest's own checks (NUL bytes, `=` in env names, an empty cwd), made before anything
    // is sent.
    if let Err(e) = req.validate() {
        let e = e.to_string();
        let field = ["argv", "env", "cwd"].into_iter().find(|f| e.contains(f)).unwrap_or("argv");
        return Err(invalid_field(method, field, &e));
    }
    // argv, env and cwd together must fit one frame of the protocol.
    if let Err(e) = encode(&HostFrame::Exec(req.clone())) {
        return Err(invalid_field(method, "argv", &format!("with env and cwd, is too large for one frame: {e}")));
    }
    let r = vms.exec(p.vm_id.as_str(), req, stdin).await?;
    let (exit_code, signal) = match r.status {
        ExitStatus::Code(c) => (Some(c), None),
        ExitStatus::Signal(s) => (None, Some(s)),
    };
    Ok(ExecResult {
        exit_code,
        signal,
        stdout: bytes::encode(&r.stdout),
        stderr: bytes::encode(&r.stderr),
        encoding: Encoding::Base64,
        stdout_truncated: r.stdout_truncated,
        stderr_truncated: r.stderr_truncated,
        stdout_bytes: r.stdout_bytes,
        stderr_bytes: r.stderr_bytes,
        duration_ms: r.duration_ms,
    })
}
