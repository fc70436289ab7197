//! Exec in a running VM's guest: the VM layer checks the VM (it exists, was created with the
//! agent, runs), takes a vsock stream from the driver and hands it to [`crate::exec`].
//!
//! An exec takes no operation lock: it does not change the VM's state, and a stop that
//! comes meanwhile ends it (the stream closes with the VMM). At most [`MAX_EXECS`] run at
//! once in the frontend, which bounds the memory their output can hold.

use std::sync::LazyLock;

use tokio::sync::Semaphore;

use super::error::VmError;
use super::fsm::VmState;
use super::manager::Manager;
use crate::exec::{AgentConn, DEFAULT_VSOCK_PORT, ExecError, ExecErrorKind, ExecRequest, ExecResult};

/// The most execs in flight at once, over all VMs.
pub const MAX_EXECS: usize = 32;

/// Tries to connect to the agent when nothing listens yet, and the pause between them.
pub const CONNECT_ATTEMPTS: u32 = 3;
const CONNECT_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

static EXECS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(MAX_EXECS));

impl Manager {
    /// Runs `req` (with `stdin`, if any) in the guest of `vm_id` through its agent.
    pub async fn exec(&self, vm_id: &str, req: ExecRequest, stdin: Option<Vec<u8>>) -> Result<ExecResult, VmError> {
        let driver = self.driver("compute.vm.exec")?;
        let (state, agent) = {
            let r = self.records();
            let e = r.get(vm_id).ok_or_else(|| VmError::no_such_vm(vm_id))?;
            (e.rec.state, e.rec.spec.as_ref().map(|s| s.agent()))
        };
        if agent != Some(true) {
            return Err(VmError::NoAgent { vm_id: vm_id.to_string() });
        }
        if state != VmState::Running {
            return Err(VmError::NotRunning { vm_id: vm_id.to_string() });
        }
        let _permit = EXECS.try_acquire().map_err(|_| VmError::Busy {
            vm_id: vm_id.to_string(),
            detail: format!("{MAX_EXECS} execs are already running in this host's VMs"),
        })?;
        let unreachable = |detail: String| VmError::AgentUnreachable { vm_id: vm_id.to_string(), detail };
        let mut attempt = 1;
        let conn = loop {
            let fd = driver.vsock(vm_id).await.map_err(|e| unreachable(format!("no vsock stream: {e}")))?;
            match AgentConn::open(fd, DEFAULT_VSOCK_PORT).await {
                Ok(conn) => break conn,
                // Nothing listened yet, or the stream broke at once: a few quick tries more.
                // A stall is not retried: it has cost its whole wait already.
                Err(e @ (ExecError::NoListener { .. } | ExecError::Io(_))) if attempt < CONNECT_ATTEMPTS => {
                    tracing::debug!(vm = vm_id, attempt, error = %e, "agent connect failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
                Err(e) => return Err(exec_error(vm_id, &e)),
            }
        };
        conn.exec(req, stdin.as_deref()).await.map_err(|e| exec_error(vm_id, &e))
    }
}

/// The exec error with its chain of causes, on the VM error of its kind.
fn exec_error(vm_id: &str, e: &ExecError) -> VmError {
    let mut detail = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        detail.push_str(&format!(": {c}"));
        cause = c.source();
    }
    let vm_id = vm_id.to_string();
    match e.kind() {
        ExecErrorKind::Unreachable => VmError::AgentUnreachable { vm_id, detail },
        ExecErrorKind::Refused => VmError::ExecRefused { vm_id, detail },
        ExecErrorKind::TimedOut => VmError::ExecTimeout { vm_id, detail },
        ExecErrorKind::BadRequest => VmError::invalid_spec("exec", detail),
    }
}
