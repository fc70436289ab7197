//! Transition events: what `compute.vm.events.tail` returns and `compute.vm.events.follow`
//! streams.

use std::collections::VecDeque;

use serde::Serialize;
use tokio::sync::broadcast;

use super::fsm::VmState;
use super::manager::Manager;
use super::store::Transition;

/// One transition of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub seq: u64,
    pub vm_id: String,
    pub at: String,
    pub from: VmState,
    pub to: VmState,
    pub reason: String,
}

impl Event {
    pub fn new(vm_id: &str, t: &Transition) -> Event {
        Event {
            seq: t.seq,
            vm_id: vm_id.to_string(),
            at: t.at.clone(),
            from: t.from,
            to: t.to,
            reason: t.reason.clone(),
        }
    }
}

/// Events a follower fetches from the histories at a time: its backlog never holds more.
pub const FOLLOW_PAGE: usize = 256;

/// A stream of transitions after a cursor: first the recorded history, then live ones, each
/// exactly once and in sequence order. The history is read a page at a time, so a follower
/// holds at most [`FOLLOW_PAGE`] events besides the live buffer.
pub struct Follower {
    manager: Manager,
    rx: broadcast::Receiver<Event>,
    vm_id: Option<String>,
    /// The highest sequence number delivered (or the starting cursor).
    last: u64,
    backlog: VecDeque<Event>,
    /// Still reading the histories (at the start, and after lagging behind the broadcast).
    catching_up: bool,
}

impl Follower {
    pub(crate) fn new(manager: Manager, rx: broadcast::Receiver<Event>, vm_id: Option<String>, since: u64) -> Follower {
        Follower { manager, rx, vm_id, last: since, backlog: VecDeque::new(), catching_up: true }
    }

    /// The highest sequence number delivered so far (or the starting cursor).
    pub fn cursor(&self) -> u64 {
        self.last
    }

    /// How many events the follower holds besides the live buffer.
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// The next event; `None` once the manager is gone.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.backlog.pop_front() {
                if e.seq > self.last {
                    self.last = e.seq;
                    return Some(e);
                }
                continue;
            }
            if self.catching_up {
                let page = self.manager.history_page(self.vm_id.as_deref(), self.last, FOLLOW_PAGE);
                if page.is_empty() {
                    self.catching_up = false;
                } else {
                    self.backlog = page.into();
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(e) => {
                    let wanted = self.vm_id.as_deref().is_none_or(|id| id == e.vm_id);
                    if wanted && e.seq > self.last {
                        self.last = e.seq;
                        return Some(e);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(skipped = n, "event follower lagged; catching up from the histories");
                    self.catching_up = true;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
