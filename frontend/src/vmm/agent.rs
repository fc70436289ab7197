//! Waiting for the guest agent at start: a VM created with `agent: true` is `running` only
//! once guest-init answers a health request over vsock. Each attempt takes a fresh stream
//! from the broker and is bounded ([`crate::exec::conn`]'s waits); attempts repeat until the
//! boot's deadline, or until the VMM exits.

use std::time::Duration;

use my_hypervisor_broker_proto::{ExitStatus, Request, SocketRole};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout_at};

use crate::broker::BrokerClient;
use crate::exec::{AgentConn, DEFAULT_VSOCK_PORT};

/// The pause between two attempts.
const RETRY: Duration = Duration::from_millis(200);

/// How the wait for the agent ended.
#[derive(Debug)]
pub enum AgentWait {
    /// The agent answered a health request.
    Answered,
    /// The VMM exited first.
    Exited(ExitStatus),
    /// No answer by the deadline; the last attempt's error.
    NoAnswer(String),
}

/// A stream connected to the VM's hybrid-vsock socket, from the broker.
pub async fn vsock(broker: &BrokerClient, vm_id: &str) -> Result<std::os::fd::OwnedFd, String> {
    let req = Request::Connect { vm: vm_id.into(), role: SocketRole::Vsock };
    let (_, fds) = broker.call(req).await.map_err(|e| format!("broker connect: {e}"))?;
    fds.into_iter().next().ok_or_else(|| "the broker sent no fd".to_string())
}

/// One attempt: connect, hello, health.
async fn ask(broker: &BrokerClient, vm_id: &str) -> Result<(), String> {
    let fd = vsock(broker, vm_id).await?;
    let mut conn = AgentConn::open(fd, DEFAULT_VSOCK_PORT).await.map_err(|e| chain(&e))?;
    conn.health().await.map(|_| ()).map_err(|e| chain(&e))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Asks the agent until it answers, the VMM exits (`exit` turns `Some`) or `deadline` passes.
pub async fn wait_agent(
    broker: &BrokerClient,
    vm_id: &str,
    mut exit: watch::Receiver<Option<ExitStatus>>,
    deadline: Instant,
) -> AgentWait {
    let mut last = String::from("not asked yet");
    loop {
        if let Some(status) = *exit.borrow() {
            return AgentWait::Exited(status);
        }
        let attempt = tokio::select! {
            r = timeout_at(deadline, ask(broker, vm_id)) => r,
            _ = exit.wait_for(Option::is_some) => continue,
        };
        match attempt {
            Ok(Ok(())) => return AgentWait::Answered,
            Ok(Err(e)) => last = e,
            Err(_) => return AgentWait::NoAnswer(last),
        }
        if Instant::now() + RETRY >= deadline {
            return AgentWait::NoAnswer(last);
        }
        tokio::select! {
            () = sleep(RETRY) => {}
            _ = exit.wait_for(Option::is_some) => {}
        }
    }
}
