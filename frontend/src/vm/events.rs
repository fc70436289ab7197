//! Transition events: what `compute.vm.events.tail` returns and `compute.vm.events.follow`
//! streams.

use std::collections::VecDeque;

use serde::Serialize;
use tokio::sync::broadcast;

use super::fsm::VmState;
use super::manager::Manager;
use super::store::Transition;

/// One event of one VM: a transition (`from` null for the one create records), or its removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub seq: u64,
    pub vm_id: String,
    pub at: String,
    pub from: Option<VmState>,
    pub to: EventTo,
    pub reason: String,
}

/// Where an event leads: a state, or out of existence (`"removed"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventTo {
    State(VmState),
    Removed,
}

impl EventTo {
    pub const REMOVED: &'static str = "removed";

    /// The state it leads to; `None` for a removal.
    pub fn state(self) -> Option<VmState> {
        match self {
            EventTo::State(s) => Some(s),
            EventTo::Removed => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventTo::State(s) => s.as_str(),
            EventTo::Removed => Self::REMOVED,
        }
    }
}

impl Serialize for EventTo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Event {
    pub fn new(vm_id: &str, t: &Transition) -> Event {
        Event {
            seq: t.seq,
            vm_id: vm_id.to_string(),
            at: t.at.clone(),
            from: t.from,
            to: EventTo::State(t.to),
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
    /// Set when the follower fell so far behind that events after its cursor left the
    /// history: the oldest whole cursor. The stream has then ended.
    truncated: Option<u64>,
}

impl Follower {
    pub(crate) fn new(manager: Manager, rx: broadcast::Receiver<Event>, vm_id: Option<String>, since: u64) -> Follower {
        Follower { manager, rx, vm_id, last: since, backlog: VecDeque::new(), catching_up: true, truncated: None }
    }

    /// The highest sequence number delivered so far (or the starting cursor).
    pub fn cursor(&self) -> u64 {
        self.last
    }

    /// Why the stream ended, when it did because events after the cursor left the history:
    /// the oldest whole cursor.
    pub fn truncated(&self) -> Option<u64> {
        self.truncated
    }

    /// How many events the follower holds besides the live buffer.
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// The next event; `None` once the manager is gone, or once events after the cursor have
    /// left the history ([`Follower::truncated`]).
    pub async fn next(&mut self) -> Option<Event> {
        if self.truncated.is_some() {
            return None;
        }
        loop {
            if let Some(e) = self.backlog.pop_front() {
                if e.seq > self.last {
                    self.last = e.seq;
                    return Some(e);
                }
                continue;
            }
            if self.catching_up {
                let page = match self.manager.history_page(self.vm_id.as_deref(), self.last, FOLLOW_PAGE) {
                    Ok(page) => page,
                    Err(oldest) => {
                        tracing::warn!(cursor = self.last, oldest, "event follower fell behind the history; ending it");
                        self.truncated = Some(oldest);
                        return None;
                    }
                };
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
