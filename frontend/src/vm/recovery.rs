//! After a (re)start of the frontend: taking up the VMs whose VMM may still run.

use std::sync::Arc;

use super::driver::{DEFAULT_STOP_GRACE, DriverError, Reattached, StopOptions, VmDriver};
use super::error::VmError;
use super::fsm::VmState;
use super::manager::{Manager, Slot};

impl Manager {
    /// Takes up the VMs whose VMM may still run, each in its own task. A live VMM's VM stays
    /// Running and is watched again; a start or stop cut short by the restart is finished (a
    /// start cut short before its VMM was known ends StartFailed, after a release that reaps
    /// any VMM it spawned); a VM whose VMM is gone becomes Failed, or Stopped if it was being
    /// stopped. A VM whose VMM cannot be checked becomes Failed with its pid kept, so that a
    /// stop can still release it.
    pub fn recover(&self) {
        let Some(driver) = self.inner.driver.clone() else { return };
        let busy = [VmState::Provisioning, VmState::Configured, VmState::Starting, VmState::Running, VmState::Stopping];
        let ids = self.records().ids_in(&busy);
        for vm_id in ids {
            let (this, driver) = (self.clone(), Arc::clone(&driver));
            // Each VM's lock is taken before this returns (nothing else holds it yet), so no
            // operation from a client can come before its recovery.
            let Ok(slot) = self.slot(&vm_id) else { continue };
            let Ok(guard) = Arc::clone(&slot.op).try_lock_owned() else { continue };
            tokio::spawn(async move {
                if let Err(e) = this.recover_one(&vm_id, &slot, &*driver).await {
                    tracing::error!(vm = %vm_id, error = %e, "taking up the VM after a restart failed");
                }
                drop(guard);
            });
        }
    }

    /// The daemon stops with `--stop-vms-on-exit`: each running, starting or stopping VM is
    /// recorded `stopped` ("daemon shutdown") before the broker releases it (each under its
    /// lock, so that no operation runs meanwhile).
    pub async fn daemon_shutdown(&self) {
        let ids = self.records().ids_in(&[VmState::Starting, VmState::Running, VmState::Stopping]);
        for vm_id in ids {
            let Ok(slot) = self.slot(&vm_id) else { continue };
            let _guard = Arc::clone(&slot.op).lock_owned().await;
            let Ok(state) = self.with_entry(&vm_id, &slot, |e| e.rec.state) else { continue };
            if state != VmState::Stopping {
                let _ = self.record(&vm_id, &slot, VmState::Stopping, "daemon shutdown", |_| ()).await;
            }
            let clear = |r: &mut super::records::Record| {
                r.pid = None;
                r.generation = None;
            };
            if let Err(e) = self.record(&vm_id, &slot, VmState::Stopped, "daemon shutdown", clear).await {
                tracing::error!(vm = %vm_id, error = %e, "recording the daemon's shutdown failed");
            }
        }
    }

    async fn recover_one(&self, vm_id: &str, slot: &Arc<Slot>, driver: &dyn VmDriver) -> Result<(), VmError> {
        let (state, pid, offset, spec) = self.with_entry(vm_id, slot, |e| {
            (e.rec.state, e.rec.pid, e.rec.event_offset.unwrap_or(0), e.rec.spec.clone())
        })?;
        if matches!(state, VmState::Provisioning | VmState::Configured) {
            // A VMM may have been spawned just before the restart; releasing reaps it.
            let why = "the frontend restarted while the VM was being started; start it again".to_string();
            self.release_then(vm_id, slot, driver, VmState::StartFailed, why).await?;
            return Ok(());
        }
        let found = driver.reattach(vm_id, pid, offset).await;
        tracing::info!(vm = vm_id, %state, ?found, "taking up the VM after a restart");
        let clear_pid = |r: &mut super::records::Record| {
            r.pid = None;
            r.generation = None;
        };
        match (state, found) {
            (VmState::Running, Ok(Reattached::Alive { generation })) => {
                self.with_entry(vm_id, slot, |e| e.rec.generation = Some(generation))
            }
            (VmState::Starting, Ok(Reattached::Alive { generation })) => {
                self.with_entry(vm_id, slot, |e| e.rec.generation = Some(generation))?;
                let Some(spec) = spec else {
                    let why = format!("boot failed: {}", DriverError::new("its spec is unreadable"));
                    let _ = self.start_failed(vm_id, slot, driver, why).await;
                    return Ok(());
                };
                match driver.wait_running(vm_id, &spec).await {
                    Ok(boot) => {
                        let why = "VM running (start finished after a frontend restart)";
                        self.booted(vm_id, slot, driver, &spec, boot, why).await.map(|_| ())
                    }
                    Err(e) => {
                        let _ = self.start_failed(vm_id, slot, driver, format!("boot failed: {e}")).await;
                        Ok(())
                    }
                }
            }
            (VmState::Stopping, found) => {
                let how = match found {
                    Ok(Reattached::Alive { .. }) => {
                        match driver.stop(vm_id, StopOptions::graceful(DEFAULT_STOP_GRACE)).await {
                            Ok(how) => how,
                            Err(e) => format!("stop failed: {e}"),
                        }
                    }
                    Ok(Reattached::Gone(how)) => how,
                    Err(e) => e.to_string(),
                };
                let why = format!("stop finished after a frontend restart: {how}");
                self.release_then(vm_id, slot, driver, VmState::Stopped, why).await.map(|_| ())
            }
            (_, Ok(Reattached::Gone(how))) => {
                let why = format!("the VMM went away while the frontend was down: {how}");
                self.record(vm_id, slot, VmState::Failed, why, clear_pid).await
            }
            (_, Err(e)) => {
                // Whether the VMM still runs is unknown: the pid stays, so a stop releases it.
                let why = format!("cannot take up the VMM after a frontend restart: {e}");
                self.record(vm_id, slot, VmState::Failed, why, |_| ()).await
            }
            (_, Ok(Reattached::Alive { .. })) => Ok(()),
        }
    }
}
