//! The records of every VM: the one place a state changes ([`Manager::transition_with`]),
//! sequence numbers, the events broadcast, and the queries (status, list, tail, follow).
//!
//! Queries only read memory: they never wait for a disk. `tail` and a follower's catch-up
//! cost in proportion to what they return: a global index from sequence number to VM finds
//! the events after a cursor without copying any history.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use super::error::VmError;
use super::events::{Event, Follower};
use super::fsm::{self, VmState};
use super::manager::{Manager, Slot, VmStatus, VmSummary};
use super::spec::VmSpec;
use super::store::{Transition, VmFile, rfc3339};

/// The answer of `compute.vm.events.tail`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tail {
    pub events: Vec<Event>,
    /// The cursor to pass as `since_seq` next time (to tail or to follow).
    pub next_seq: u64,
    /// Events after the cursor have already left the history: the answer has gaps.
    pub truncated: bool,
    /// With `truncated`: the oldest cursor from which the history is whole.
    pub oldest_seq: Option<u64>,
}

/// Removal events kept for followers and `tail` after their VM (and its history) is gone.
pub const REMOVED_KEEP: usize = 1024;

/// The highest sequence number a VM's history may have lost: none when it begins with the
/// transition create records, else everything before its oldest entry.
fn vm_floor(h: &VecDeque<Transition>) -> u64 {
    match h.front() {
        Some(t) if t.from.is_some() => t.seq.saturating_sub(1),
        _ => 0,
    }
}

/// Every VM's record, and the sequence counter.
#[derive(Default)]
pub(super) struct Records {
    /// The last sequence number handed out.
    pub(super) last_seq: u64,
    /// The mark asked of the writer: numbers up to it may be handed out.
    pub(super) reserved: u64,
    vms: BTreeMap<String, Entry>,
    /// Every transition still in some VM's history, and every removal kept, by sequence number.
    index: BTreeMap<u64, Arc<str>>,
    /// The last [`REMOVED_KEEP`] removal events, by sequence number.
    removed: BTreeMap<u64, Event>,
    /// The highest sequence number of an event no longer held (one that left a VM's ring, or
    /// a removal that left [`REMOVED_KEEP`], or anything before a restart): a cursor below it
    /// may miss events.
    pub(super) floor: u64,
}

pub(super) struct Entry {
    pub(super) slot: Arc<Slot>,
    pub(super) rec: Record,
    /// A remove is in progress: create must not return this VM as existing.
    pub(super) removing: bool,
    /// Create has not yet written its file: the VM is not visible yet.
    pub(super) creating: bool,
}

pub(super) struct Record {
    pub(super) state: VmState,
    pub(super) spec: Option<VmSpec>,
    pub(super) created_at: String,
    pub(super) last_error: Option<String>,
    pub(super) pid: Option<u32>,
    /// Which VMM the record is about (from the driver; not persisted): reports about any
    /// other generation are stale.
    pub(super) generation: Option<u64>,
    pub(super) event_offset: Option<u64>,
    pub(super) history: VecDeque<Transition>,
}

pub(super) fn now() -> String {
    rfc3339(SystemTime::now())
}

impl Record {
    pub(super) fn to_file(&self, vm_id: &str) -> VmFile {
        VmFile {
            schema_version: super::store::SCHEMA_VERSION,
            vm_id: vm_id.to_string(),
            state: self.state,
            spec: self.spec.clone(),
            created_at: self.created_at.clone(),
            last_error: self.last_error.clone(),
            pid: self.pid,
            event_offset: self.event_offset,
            history: self.history.clone(),
        }
    }
}

impl Records {
    /// A visible VM (one whose create has finished).
    pub(super) fn get(&self, vm_id: &str) -> Option<&Entry> {
        self.vms.get(vm_id).filter(|e| !e.creating)
    }

    pub(super) fn get_mut(&mut self, vm_id: &str) -> Option<&mut Entry> {
        self.vms.get_mut(vm_id).filter(|e| !e.creating)
    }

    /// Any entry, also one being created.
    pub(super) fn any(&mut self, vm_id: &str) -> Option<&mut Entry> {
        self.vms.get_mut(vm_id)
    }

    pub(super) fn len(&self) -> usize {
        self.vms.len()
    }

    pub(super) fn insert(&mut self, vm_id: String, entry: Entry) {
        let id: Arc<str> = Arc::from(vm_id.as_str());
        for t in &entry.rec.history {
            self.index.insert(t.seq, Arc::clone(&id));
        }
        self.vms.insert(vm_id, entry);
    }

    pub(super) fn remove(&mut self, vm_id: &str) -> Option<Entry> {
        let e = self.vms.remove(vm_id)?;
        for t in &e.rec.history {
            self.index.remove(&t.seq);
        }
        Some(e)
    }

    /// Visible VMs whose id is within `start..`, in id order.
    pub(super) fn range<'a>(
        &'a self,
        start: std::ops::Bound<&'a str>,
    ) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        self.vms
            .range::<str, _>((start, std::ops::Bound::Unbounded))
            .filter(|(_, e)| !e.creating)
            .map(|(id, e)| (id.as_str(), e))
    }

    /// Records the removal of a VM (already taken out with [`Records::remove`]).
    pub(super) fn record_removal(&mut self, event: Event) {
        self.index.insert(event.seq, Arc::from(event.vm_id.as_str()));
        self.removed.insert(event.seq, event);
        while self.removed.len() > REMOVED_KEEP {
            if let Some((seq, _)) = self.removed.pop_first() {
                self.index.remove(&seq);
                self.floor = self.floor.max(seq);
            }
        }
    }

    /// The highest sequence number that may be missing after a cursor for this VM, or all.
    pub(super) fn floor_of(&self, vm_id: Option<&str>) -> Result<u64, VmError> {
        match vm_id {
            Some(id) => self.get(id).map(|e| vm_floor(&e.rec.history)).ok_or_else(|| VmError::no_such_vm(id)),
            None => Ok(self.floor),
        }
    }

    pub(super) fn ids_in(&self, states: &[VmState]) -> Vec<String> {
        self.vms
            .iter()
            .filter(|(_, e)| !e.creating && states.contains(&e.rec.state))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// At most `limit` events after `since`, oldest first, and whether more follow.
    fn page(&self, vm_id: Option<&str>, since: u64, limit: usize) -> Result<(Vec<Event>, bool), VmError> {
        let mut out = Vec::new();
        match vm_id {
            Some(id) => {
                let e = self.get(id).ok_or_else(|| VmError::no_such_vm(id))?;
                let h = &e.rec.history;
                let start = h.partition_point(|t| t.seq <= since);
                out.extend(h.range(start..).take(limit).map(|t| Event::new(id, t)));
                Ok((out, h.len() - start > limit))
            }
            None => {
                let mut it = self.index.range(since.saturating_add(1)..);
                for (seq, id) in it.by_ref().take(limit) {
                    if let Some(removal) = self.removed.get(seq) {
                        out.push(removal.clone());
                        continue;
                    }
                    let found = self.vms.get(&**id).and_then(|e| {
                        let h = &e.rec.history;
                        h.binary_search_by_key(seq, |t| t.seq).ok().map(|i| Event::new(id, &h[i]))
                    });
                    out.extend(found);
                }
                Ok((out, it.next().is_some()))
            }
        }
    }
}

impl Manager {
    /// The one place a state changes: checks the table, numbers the transition, records it
    /// in the VM's ring, queues the VM's file for the writer and broadcasts the event. It
    /// never waits for the disk: it returns the writer's ticket (see [`Manager::persisted`]).
    /// A write that fails is retried by the writer, so the transition stands either way.
    pub(super) fn transition_with(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        to: VmState,
        reason: impl Into<String>,
        update: impl FnOnce(&mut Record),
    ) -> Result<u64, VmError> {
        let reason = reason.into();
        let mut r = self.records();
        let from = match r.get(vm_id) {
            Some(e) if Arc::ptr_eq(&e.slot, slot) => e.rec.state,
            _ => return Err(VmError::no_such_vm(vm_id)),
        };
        fsm::check(vm_id, from, to)?;
        let seq = self.next_seq(&mut r);
        let t = Transition { seq, at: now(), from: Some(from), to, reason };
        let ring = self.inner.ring_capacity;
        let records = &mut *r;
        let Some(entry) = records.vms.get_mut(vm_id) else {
            return Err(VmError::no_such_vm(vm_id));
        };
        let rec = &mut entry.rec;
        rec.state = to;
        match to {
            VmState::Provisioning => rec.last_error = None,
            VmState::StartFailed | VmState::Failed => rec.last_error = Some(t.reason.clone()),
            _ => {}
        }
        update(rec);
        rec.history.push_back(t.clone());
        records.index.insert(seq, Arc::from(vm_id));
        while rec.history.len() > ring {
            if let Some(old) = rec.history.pop_front() {
                records.index.remove(&old.seq);
                records.floor = records.floor.max(old.seq);
            }
        }
        // Queued under the records lock, so the writer sees a VM's files in order.
        let ticket = self.inner.writer.write_vm(rec.to_file(vm_id));
        tracing::info!(vm = vm_id, seq, from = %from, to = %to, reason = %t.reason, "transition");
        let _ = self.inner.events.send(Event::new(vm_id, &t));
        Ok(ticket)
    }

    /// Makes a created VM visible, recording its first transition (`from` null, to
    /// `pending`) and broadcasting it, all under the records lock like any transition.
    /// Returns the writer's ticket for the file with that history.
    pub(super) fn record_created(&self, vm_id: &str) -> Option<u64> {
        let mut r = self.records();
        // Its time is the VM's `created_at`.
        let at = r.any(vm_id)?.rec.created_at.clone();
        let seq = self.next_seq(&mut r);
        let t = Transition { seq, at, from: None, to: VmState::Pending, reason: "created".into() };
        r.index.insert(seq, Arc::from(vm_id));
        let entry = r.any(vm_id)?;
        entry.creating = false;
        entry.rec.history.push_back(t.clone());
        let ticket = self.inner.writer.write_vm(entry.rec.to_file(vm_id));
        tracing::info!(vm = vm_id, seq, "VM created");
        let _ = self.inner.events.send(Event::new(vm_id, &t));
        Some(ticket)
    }

    /// Forgets a VM's record and history and records its removal event in their place.
    /// The caller holds the records lock (`r`).
    pub(super) fn record_removed(&self, r: &mut Records, vm_id: &str) {
        let Some(entry) = r.remove(vm_id) else { return };
        let seq = self.next_seq(r);
        let event = Event {
            seq,
            vm_id: vm_id.to_string(),
            at: now(),
            from: Some(entry.rec.state),
            to: super::events::EventTo::Removed,
            reason: "removed".into(),
        };
        tracing::info!(vm = vm_id, seq, "VM removed");
        let _ = self.inner.events.send(event.clone());
        r.record_removal(event);
    }

    /// A transition that the operation waits to see written (or tried) before its next
    /// step, so that after a crash the file is at most one step behind the world.
    pub(super) async fn record(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        to: VmState,
        reason: impl Into<String>,
        update: impl FnOnce(&mut Record),
    ) -> Result<(), VmError> {
        let ticket = self.transition_with(vm_id, slot, to, reason, update)?;
        self.persisted(ticket).await;
        Ok(())
    }

    /// Waits until the writer has tried to write everything up to `ticket`.
    pub(super) async fn persisted(&self, ticket: u64) {
        self.inner.writer.attempted(ticket).await;
    }

    /// The next sequence number. Numbers are reserved on disk a block at a time, and the
    /// next block is asked for when half of the current one is used, so a number is
    /// normally on disk before it is handed out. When the writer falls behind (or the
    /// sequence file cannot be written), numbers are handed out all the same; docs/state-json.md
    /// says how a restart then avoids repeating them.
    pub(super) fn next_seq(&self, r: &mut Records) -> u64 {
        r.last_seq += 1;
        self.reserve_ahead(r);
        r.last_seq
    }

    pub(super) fn reserve_ahead(&self, r: &mut Records) {
        let block = self.inner.seq_block;
        if r.last_seq + block / 2 > r.reserved {
            r.reserved = r.last_seq + block;
            self.inner.writer.write_sequence(r.reserved);
        }
    }

    // ---- Queries: memory only, never a disk ----

    pub fn status(&self, vm_id: &str) -> Result<VmStatus, VmError> {
        let r = self.records();
        let e = r.get(vm_id).ok_or_else(|| VmError::no_such_vm(vm_id))?;
        Ok(VmStatus {
            vm_id: vm_id.to_string(),
            state: e.rec.state,
            spec: e.rec.spec.clone(),
            pid: e.rec.pid,
            last_error: e.rec.last_error.clone(),
            created_at: e.rec.created_at.clone(),
            last_seq: e.rec.history.back().map(|t| t.seq),
        })
    }

    pub fn state(&self, vm_id: &str) -> Result<VmState, VmError> {
        self.records().get(vm_id).map(|e| e.rec.state).ok_or_else(|| VmError::no_such_vm(vm_id))
    }

    pub fn list(&self) -> Vec<VmSummary> {
        self.records()
            .vms
            .iter()
            .filter(|(_, e)| !e.creating)
            .map(|(id, e)| VmSummary {
                vm_id: id.clone(),
                state: e.rec.state,
                labels: e.rec.spec.as_ref().map(|s| s.labels.clone()).unwrap_or_default(),
            })
            .collect()
    }

    /// The last sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        self.records().last_seq
    }

    /// Whether the sequence file is behind the numbers handed out (its write failed).
    pub fn sequence_behind(&self) -> bool {
        self.inner.writer.sequence_behind()
    }

    /// Transitions after `since`, oldest first, at most `limit`.
    pub fn tail(&self, vm_id: Option<&str>, since: u64, limit: usize) -> Result<Tail, VmError> {
        let r = self.records();
        let (events, more) = r.page(vm_id, since, limit)?;
        let next_seq = if more { events.last().map_or(since, |e| e.seq) } else { r.last_seq.max(since) };
        let floor = r.floor_of(vm_id)?;
        let truncated = since < floor;
        Ok(Tail { events, next_seq, truncated, oldest_seq: truncated.then_some(floor) })
    }

    /// Starts following transitions after `since` (or after the newest one, when `None`).
    /// The live broadcast is subscribed under the same lock that orders transitions, and the
    /// follower reads the history after its cursor a page at a time, so no event falls
    /// between the two; it drops duplicates by sequence number.
    pub fn follow(&self, vm_id: Option<String>, since: Option<u64>) -> Result<Follower, VmError> {
        let r = self.records();
        if let Some(id) = &vm_id {
            r.get(id).ok_or_else(|| VmError::no_such_vm(id))?;
        }
        let rx = self.inner.events.subscribe();
        let since = since.unwrap_or(r.last_seq);
        let floor = r.floor_of(vm_id.as_deref())?;
        if since < floor {
            return Err(VmError::CursorTruncated { since, oldest_seq: floor });
        }
        drop(r);
        Ok(Follower::new(self.clone(), rx, vm_id, since))
    }

    /// At most `limit` events after `since`, for a follower catching up; `Err` with the
    /// oldest whole cursor when events after `since` have left the history meanwhile.
    pub(crate) fn history_page(&self, vm_id: Option<&str>, since: u64, limit: usize) -> Result<Vec<Event>, u64> {
        let r = self.records();
        match r.floor_of(vm_id) {
            Ok(floor) if since < floor => Err(floor),
            _ => Ok(r.page(vm_id, since, limit).map(|(events, _)| events).unwrap_or_default()),
        }
    }
}
