//! The operations: create, start, stop and remove. Each runs in a task of its own
//! ([`Manager::in_task`]) under the VM's operation lock; every step that ends an attempt goes
//! through [`Manager::release_then`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::driver::{Boot, DEFAULT_STOP_GRACE, StopOptions, VmDriver};
use super::error::VmError;
use super::fsm::{self, VmState};
use super::manager::{Manager, Slot, StopResult, lock};
use super::records::{Entry, Record, now};
use super::spec::VmSpec;

/// How a start's wait for the boot ended.
enum Waited {
    Boot(Result<Boot, super::driver::DriverError>),
    StopAsked(StopOptions),
}

impl Manager {
    /// Records a new VM in state `pending`; it does not start it. An identical spec under an
    /// existing id returns that VM; a different one is refused. It answers once the VM's file
    /// is written; if that fails, the VM is not created.
    pub async fn create(&self, spec: VmSpec) -> Result<VmState, VmError> {
        spec.validate(&self.inner.image_roots)?;
        let spec = spec.normalized();
        let id = spec.id.clone();
        let written = {
            let mut r = self.records();
            let max = self.inner.max_vms;
            let full = r.len() >= max;
            if let Some(e) = r.any(&id) {
                let busy = |detail: &str| VmError::Busy { vm_id: id.clone(), detail: detail.into() };
                if e.creating {
                    return Err(busy("it is being created"));
                }
                if e.removing {
                    return Err(busy("it is being removed"));
                }
                if e.rec.spec.as_ref() == Some(&spec) {
                    return Ok(e.rec.state);
                }
                return Err(VmError::AlreadyExists { vm_id: id });
            }
            if full {
                return Err(VmError::TooManyVms { max });
            }
            let rec = Record {
                state: VmState::Pending,
                spec: Some(spec),
                created_at: now(),
                last_error: None,
                pid: None,
                generation: None,
                event_offset: None,
                history: VecDeque::new(),
            };
            let written = self.inner.writer.write_vm_checked(rec.to_file(&id));
            r.insert(id.clone(), Entry { slot: Arc::default(), rec, removing: false, creating: true });
            written
        };
        let why = match written.await {
            Ok(Ok(())) => {
                if let Some(ticket) = self.record_created(&id) {
                    self.persisted(ticket).await;
                }
                return Ok(VmState::Pending);
            }
            Ok(Err(why)) => why,
            Err(_) => "the state writer is gone".to_string(),
        };
        let mut r = self.records();
        r.remove(&id);
        // In case the file was renamed into place before the failure (a failed dir sync).
        self.inner.writer.remove_vm(&id);
        Err(VmError::store(format!("creating VM {id:?}"), std::io::Error::other(why)))
    }

    /// Forgets a VM in which no VMM can be alive. A `failed` VM's leftovers are released
    /// first. Nothing of the VM is kept: its record, its queue of VMM reports, what the driver
    /// knew of it; its file is deleted (once the sequence mark covers its numbers).
    pub async fn remove(&self, vm_id: &str) -> Result<(), VmError> {
        let slot = self.slot(vm_id)?;
        let (this, id) = (self.clone(), vm_id.to_string());
        self.in_task("remove", vm_id, async move { this.remove_op(&id, &slot).await }).await
    }

    async fn remove_op(&self, vm_id: &str, slot: &Arc<Slot>) -> Result<(), VmError> {
        let _guard = self.lock_op(vm_id, slot).await?;
        let state = self.with_entry(vm_id, slot, |e| {
            if e.rec.state.removable() {
                e.removing = true;
            }
            e.rec.state
        })?;
        if !state.removable() {
            return Err(VmError::IllegalTransition {
                vm_id: vm_id.to_string(),
                from: state.to_string(),
                to: "removed".into(),
            });
        }
        if state == VmState::Failed {
            let released = match self.driver("compute.vm.remove") {
                Ok(driver) => driver.release(vm_id).await.map_err(|e| VmError::Vmm {
                    vm_id: vm_id.to_string(),
                    detail: format!("releasing what is left: {e}"),
                }),
                Err(e) => Err(e),
            };
            if let Err(e) = released {
                let _ = self.with_entry(vm_id, slot, |e| e.removing = false);
                return Err(e);
            }
        }
        let ticket = {
            let mut r = self.records();
            self.record_removed(&mut r, vm_id);
            self.inner.writer.remove_vm(vm_id)
        };
        self.forget_reports(vm_id);
        if let Some(d) = &self.inner.driver {
            d.forget(vm_id);
        }
        self.persisted(ticket).await;
        Ok(())
    }

    /// Starts a VM: provisions it, spawns its VMM and waits until it runs. On Running it is a
    /// no-op. Returns the state it ends in.
    pub async fn start(&self, vm_id: &str) -> Result<VmState, VmError> {
        let driver = self.driver("compute.vm.start")?;
        let slot = self.slot(vm_id)?;
        let (this, id) = (self.clone(), vm_id.to_string());
        self.in_task("start", vm_id, async move { this.start_op(&id, &slot, &*driver).await }).await
    }

    async fn start_op(&self, vm_id: &str, slot: &Arc<Slot>, driver: &dyn VmDriver) -> Result<VmState, VmError> {
        let _guard = self.lock_op(vm_id, slot).await?;
        let (state, spec) = self.with_entry(vm_id, slot, |e| (e.rec.state, e.rec.spec.clone()))?;
        if state == VmState::Running {
            return Ok(state);
        }
        // Refuse through the table, so the error is the documented one.
        fsm::check(vm_id, state, VmState::Provisioning)?;
        let spec = spec.ok_or_else(|| {
            VmError::invalid_spec("spec", "this VM's state file was unreadable; remove it and create it again")
        })?;
        if state == VmState::Failed {
            driver.release(vm_id).await.map_err(|e| VmError::Vmm {
                vm_id: vm_id.to_string(),
                detail: format!("releasing what the failed VM left: {e}"),
            })?;
        }
        self.record(vm_id, slot, VmState::Provisioning, "start requested", |_| ()).await?;
        if let Err(e) = driver.prepare(vm_id, &spec).await {
            return self.start_failed(vm_id, slot, driver, format!("provisioning failed: {e}")).await;
        }
        self.record(vm_id, slot, VmState::Configured, "resources ready", |_| ()).await?;
        let vmm = match driver.spawn(vm_id, &spec).await {
            Ok(vmm) => vmm,
            Err(e) => return self.start_failed(vm_id, slot, driver, format!("spawning the VMM failed: {e}")).await,
        };
        self.record(vm_id, slot, VmState::Starting, format!("VMM spawned (pid {})", vmm.pid), |r| {
            r.pid = Some(vmm.pid);
            r.generation = Some(vmm.generation);
            r.event_offset = None;
        })
        .await?;
        match self.wait_boot(slot, driver, vm_id, &spec).await {
            Waited::Boot(Ok(boot)) => self.booted(vm_id, slot, driver, &spec, boot, "VM running").await,
            Waited::Boot(Err(e)) => self.start_failed(vm_id, slot, driver, format!("boot failed: {e}")).await,
            // A stop asked for while starting: this start stops the VM itself, and the stop,
            // which waits for the lock, then finds it stopped.
            Waited::StopAsked(opts) => {
                self.stop_locked(vm_id, slot, driver, opts, "stop requested while starting").await
            }
        }
    }

    /// Waits for the boot, unless a stop is asked for first. A stop that gave up waiting
    /// (busy) withdraws its request, and the boot is waited for again.
    async fn wait_boot(&self, slot: &Slot, driver: &dyn VmDriver, vm_id: &str, spec: &VmSpec) -> Waited {
        let boot = driver.wait_running(vm_id, spec);
        tokio::pin!(boot);
        loop {
            let notified = slot.stop_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(opts) = lock(&slot.stop_request).take() {
                return Waited::StopAsked(opts);
            }
            tokio::select! {
                r = &mut boot => return Waited::Boot(r),
                () = notified => {}
            }
        }
    }

    /// The boot ended well: Running, or, when the guest powered itself off right after it
    /// booted, Running and then Stopped.
    pub(super) async fn booted(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        driver: &dyn VmDriver,
        spec: &VmSpec,
        boot: Boot,
        why: &str,
    ) -> Result<VmState, VmError> {
        let why = if spec.agent() { format!("{why}; guest agent answers") } else { why.to_string() };
        self.record(vm_id, slot, VmState::Running, why, |_| ()).await?;
        match boot {
            Boot::Running => Ok(VmState::Running),
            Boot::PoweredOff(how) => {
                let (to, reason) = self.release_then(vm_id, slot, driver, VmState::Stopped, how).await?;
                if to == VmState::Stopped {
                    Ok(to)
                } else {
                    Err(VmError::Vmm { vm_id: vm_id.to_string(), detail: reason })
                }
            }
        }
    }

    pub(super) async fn start_failed(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        driver: &dyn VmDriver,
        reason: String,
    ) -> Result<VmState, VmError> {
        // StartFailed promises that nothing is left; when releasing fails, that is not so.
        let (_, reason) = self.release_then(vm_id, slot, driver, VmState::StartFailed, reason).await?;
        Err(VmError::Vmm { vm_id: vm_id.to_string(), detail: reason })
    }

    /// The one way an attempt ends: release everything held for the VM, then record `done`
    /// (Stopped or StartFailed) with the VMM forgotten, or Failed, keeping the pid, when
    /// releasing fails. Returns the state reached and its reason.
    pub(super) async fn release_then(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        driver: &dyn VmDriver,
        done: VmState,
        reason: String,
    ) -> Result<(VmState, String), VmError> {
        let (to, reason) = match driver.release(vm_id).await {
            Ok(()) => (done, format!("{reason}; resources released")),
            Err(e) => (VmState::Failed, format!("{reason}; releasing failed: {e}")),
        };
        self.record(vm_id, slot, to, reason.clone(), |r| {
            if to == done {
                r.pid = None;
                r.generation = None;
            }
        })
        .await?;
        Ok((to, reason))
    }

    /// Stops a VM (Running, Starting, or Failed with a VMM that may still run) and releases
    /// its resources. On Stopped it is a no-op; concurrent stops of one VM join one operation.
    pub async fn stop(&self, vm_id: &str, grace: Option<Duration>) -> Result<VmState, VmError> {
        self.stop_with(vm_id, StopOptions::graceful(grace.unwrap_or(DEFAULT_STOP_GRACE))).await
    }

    /// [`Manager::stop`] with all its options: `force` skips the power button and the grace
    /// period. A stop that joins one in progress gets that one's answer.
    pub async fn stop_with(&self, vm_id: &str, opts: StopOptions) -> Result<VmState, VmError> {
        let driver = self.driver("compute.vm.stop")?;
        let slot = self.slot(vm_id)?;
        let rx = {
            let mut join = lock(&slot.stop_join);
            if let Some(rx) = join.as_ref() {
                driver.shorten_stop(vm_id, opts);
                rx.clone()
            } else {
                let (tx, rx) = watch::channel(None);
                *join = Some(rx.clone());
                drop(join);
                // A start in progress sees this and stops the VM itself.
                *lock(&slot.stop_request) = Some(opts);
                slot.stop_notify.notify_waiters();
                let (this, id) = (self.clone(), vm_id.to_string());
                tokio::spawn(async move {
                    let r = this.stop_op(&id, &slot, &*driver, opts).await;
                    *lock(&slot.stop_request) = None;
                    *lock(&slot.stop_join) = None;
                    let _ = tx.send(Some(r));
                });
                rx
            }
        };
        wait_stop(vm_id, rx).await
    }

    async fn stop_op(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        driver: &dyn VmDriver,
        opts: StopOptions,
    ) -> Result<VmState, VmError> {
        let _guard = self.lock_op(vm_id, slot).await?;
        let (state, pid) = self.with_entry(vm_id, slot, |e| (e.rec.state, e.rec.pid))?;
        match state {
            VmState::Stopped => Ok(state),
            VmState::Failed if pid.is_some() => {
                self.stop_locked(vm_id, slot, driver, opts, "stop requested; the failed VM's VMM may still run").await
            }
            VmState::Pending | VmState::StartFailed | VmState::Failed => {
                Err(VmError::NotRunning { vm_id: vm_id.to_string() })
            }
            _ => self.stop_locked(vm_id, slot, driver, opts, "stop requested").await,
        }
    }

    /// Stopping, the staged stop, then release: Stopped (or Failed). The caller holds the lock.
    async fn stop_locked(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        driver: &dyn VmDriver,
        opts: StopOptions,
        why: &str,
    ) -> Result<VmState, VmError> {
        self.record(vm_id, slot, VmState::Stopping, why, |_| ()).await?;
        let how = match driver.stop(vm_id, opts).await {
            Ok(how) => how,
            Err(e) => {
                let reason = format!("stop failed: {e}");
                self.record(vm_id, slot, VmState::Failed, reason.clone(), |_| ()).await?;
                return Err(VmError::Vmm { vm_id: vm_id.to_string(), detail: reason });
            }
        };
        let (to, reason) = self.release_then(vm_id, slot, driver, VmState::Stopped, how).await?;
        if to == VmState::Stopped { Ok(to) } else { Err(VmError::Vmm { vm_id: vm_id.to_string(), detail: reason }) }
    }
}

async fn wait_stop(vm_id: &str, mut rx: watch::Receiver<StopResult>) -> Result<VmState, VmError> {
    let ended = || VmError::Ended { what: "stop", vm_id: vm_id.to_string() };
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone().unwrap_or_else(|| Err(ended())),
        Err(_) => Err(ended()),
    }
}
