//! What happens to a running VM's VMM outside any operation (exits, guest panics, reboots,
//! a VMM killed for misbehaving): the driver's reports reach the VM's record in order, through
//! one queue and one task per VM, so a slow VM holds up no other.
//!
//! A queue merges reboots that come together into one report with a count, so a flood of
//! them becomes one transition, not one per line, and keeps nothing about a VMM after the
//! report that ends its VM's run (a panic, an exit). A queue and its task exist only while
//! reports wait; removing the VM drops its queue.

use std::collections::VecDeque;
use std::sync::Arc;

use super::driver::{VmmEvent, VmmReport};
use super::error::VmError;
use super::fsm::VmState;
use super::manager::{Manager, Slot, lock};
use super::records::Record;

/// The reports waiting for one VM.
#[derive(Default)]
pub(super) struct Reports {
    queue: VecDeque<VmmReport>,
}

impl Reports {
    fn push(&mut self, r: VmmReport) {
        // After a panic, an exit or a kill of this VMM, the VM is no longer running: later
        // reports about the same VMM would be ignored anyway, so they are not kept.
        let ends = |e: &VmmEvent| !matches!(e, VmmEvent::GuestReboot { .. });
        if self.queue.iter().any(|q| q.generation == r.generation && ends(&q.event)) {
            return;
        }
        if let (Some(last), VmmEvent::GuestReboot { count }) = (self.queue.back_mut(), &r.event)
            && last.generation == r.generation
            && let VmmEvent::GuestReboot { count: merged } = &mut last.event
        {
            *merged = merged.saturating_add(*count);
            last.offset = r.offset.or(last.offset);
            return;
        }
        self.queue.push_back(r);
    }
}

impl Manager {
    /// Queues a report about a VM's VMM; it is applied after the reports before it, by a task
    /// of the VM's own. A report about an unknown VM is dropped.
    pub fn report(&self, vm_id: &str, report: VmmReport) {
        if self.slot(vm_id).is_err() {
            tracing::debug!(vm = vm_id, ?report, "VMM report about an unknown VM; dropped");
            return;
        }
        let mut queues = lock(&self.inner.reports);
        if let Some(q) = queues.get_mut(vm_id) {
            q.push(report);
            return;
        }
        let mut q = Reports::default();
        q.push(report);
        queues.insert(vm_id.to_string(), q);
        drop(queues);
        let (this, id) = (self.clone(), vm_id.to_string());
        tokio::spawn(async move { this.drain_reports(id).await });
    }

    async fn drain_reports(self, vm_id: String) {
        loop {
            let next = {
                let mut queues = lock(&self.inner.reports);
                let Some(q) = queues.get_mut(&vm_id) else { return };
                match q.queue.pop_front() {
                    Some(r) => r,
                    None => {
                        queues.remove(&vm_id);
                        return;
                    }
                }
            };
            if let Err(e) = self.vmm_event(&vm_id, next).await {
                tracing::warn!(vm = %vm_id, error = %e, "recording a VMM event failed");
            }
        }
    }

    /// Drops the VM's queue of reports; its task ends.
    pub(super) fn forget_reports(&self, vm_id: &str) {
        lock(&self.inner.reports).remove(vm_id);
    }

    /// How many VMs have reports waiting (each has a queue and a task).
    pub fn report_queues(&self) -> usize {
        lock(&self.inner.reports).len()
    }

    /// Applies one report now (after the VM's operation in progress, if any). A report about
    /// another generation of VMM than the VM's current one, or about a VM that is not
    /// Running, is stale and changes nothing. Returns the state.
    pub async fn vmm_event(&self, vm_id: &str, report: VmmReport) -> Result<VmState, VmError> {
        let slot = self.slot(vm_id)?;
        let (this, id) = (self.clone(), vm_id.to_string());
        self.in_task("VMM event", vm_id, async move { this.vmm_event_op(&id, &slot, report).await }).await
    }

    async fn vmm_event_op(&self, vm_id: &str, slot: &Arc<Slot>, report: VmmReport) -> Result<VmState, VmError> {
        let _guard = Arc::clone(&slot.op).lock_owned().await;
        let (state, generation) = self.with_entry(vm_id, slot, |e| (e.rec.state, e.rec.generation))?;
        if generation != Some(report.generation) {
            tracing::debug!(vm = vm_id, ?report, ?generation, "report about another VMM; ignored");
            return Ok(state);
        }
        if state != VmState::Running {
            tracing::debug!(vm = vm_id, ?report, %state, "VMM report for a VM that is not running; ignored");
            return Ok(state);
        }
        let offset = report.offset;
        let (to, reason, gone) = match report.event {
            VmmEvent::Exited { clean: true, detail } => {
                let why = format!("the guest shut down ({detail})");
                return match &self.inner.driver {
                    Some(d) => self.release_then(vm_id, slot, &**d, VmState::Stopped, why).await.map(|(to, _)| to),
                    None => {
                        self.record(vm_id, slot, VmState::Stopped, why, forget_vmm).await?;
                        Ok(VmState::Stopped)
                    }
                };
            }
            VmmEvent::Exited { clean: false, detail } => {
                (VmState::Failed, format!("the VMM exited unexpectedly: {detail}"), true)
            }
            VmmEvent::GuestPanic => (VmState::Failed, "the guest panicked".to_string(), false),
            VmmEvent::GuestReboot { count: 0 | 1 } => (VmState::Running, "the guest rebooted".to_string(), false),
            VmmEvent::GuestReboot { count } => (VmState::Running, format!("the guest rebooted {count} times"), false),
            VmmEvent::Misbehaved(why) => (VmState::Failed, format!("the VMM was killed: {why}"), true),
        };
        self.record(vm_id, slot, to, reason, |r| {
            if let Some(o) = offset {
                r.event_offset = Some(o);
            }
            if gone {
                forget_vmm(r);
            }
        })
        .await?;
        Ok(to)
    }
}

fn forget_vmm(r: &mut Record) {
    r.pid = None;
    r.generation = None;
}
