//! What the manager needs from whatever actually runs VMs (the broker and cloud-hypervisor).
//!
//! The manager owns the state machine, the history and the locking; a driver only does the
//! work of each step and reports success or failure. Every call for one VM comes from that
//! VM's serialized operation, so a driver never sees two concurrent calls for the same VM
//! (except [`VmDriver::wait_running`], which a stop may abandon by dropping its future).

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::time::Duration;

use super::spec::VmSpec;

/// A driver step's failure; the text ends up in the transition reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DriverError(pub String);

impl DriverError {
    pub fn new(msg: impl Into<String>) -> Self {
        DriverError(msg.into())
    }
}

pub type DriverFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DriverError>> + Send + 'a>>;

/// How a stop should go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOptions {
    /// How long to wait after the power button before forcing the VMM down.
    pub grace: Duration,
    /// Skip the power button and the grace period: straight to vm.shutdown, then the kill.
    pub force: bool,
}

impl StopOptions {
    /// The staged stop with this grace period.
    pub fn graceful(grace: Duration) -> StopOptions {
        StopOptions { grace, force: false }
    }
}

/// Default grace period of a stop.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(30);

/// The steps of a VM's lifecycle. On a failure the manager calls [`VmDriver::release`] and
/// records StartFailed or Failed; a driver need not clean up after itself.
pub trait VmDriver: Send + Sync + 'static {
    /// Provisioning: take the VM's uid, runtime dir, image grants and taps.
    fn prepare<'a>(&'a self, vm_id: &'a str, spec: &'a VmSpec) -> DriverFuture<'a, ()>;

    /// Configured → Starting: spawn the VMM, which creates and boots the VM.
    fn spawn<'a>(&'a self, vm_id: &'a str, spec: &'a VmSpec) -> DriverFuture<'a, Spawned>;

    /// Starting → Running: resolves once the VM runs (and, when `spec.agent()`, once the guest
    /// agent answers), or once a guest that had booted powered itself off. A stop during
    /// Starting drops this future.
    fn wait_running<'a>(&'a self, vm_id: &'a str, spec: &'a VmSpec) -> DriverFuture<'a, Boot>;

    /// Stopping: bring the VMM down (power button, wait, shutdown, kill). Resolves when the
    /// VMM is gone, with how it went, which becomes part of the reason of the next transition.
    fn stop<'a>(&'a self, vm_id: &'a str, opts: StopOptions) -> DriverFuture<'a, String>;

    /// Release everything held for the VM (process, taps, grants, runtime dir). Idempotent:
    /// releasing a VM that holds nothing succeeds.
    fn release<'a>(&'a self, vm_id: &'a str) -> DriverFuture<'a, ()>;

    /// The VM is removed: forget anything still kept about it (an exit that came after its
    /// release, say).
    fn forget(&self, _vm_id: &str) {}

    /// After a frontend restart: takes up the VMM of a VM recorded as Starting, Running or
    /// Stopping, if it still runs (`pid` is what the record says; the event file resumes at
    /// `event_offset`).
    fn reattach<'a>(&'a self, _vm_id: &'a str, _pid: Option<u32>, _event_offset: u64) -> DriverFuture<'a, Reattached> {
        Box::pin(async { Ok(Reattached::Gone("this driver cannot take up a running VMM".into())) })
    }

    /// A stream connected to the VM's hybrid-vsock socket (its muxer's host side), for exec.
    fn vsock<'a>(&'a self, _vm_id: &'a str) -> DriverFuture<'a, OwnedFd> {
        Box::pin(async { Err(DriverError::new("this driver has no vsock")) })
    }

    /// A stop that joins the one in progress asks for less (`force`, or a shorter grace):
    /// bring that one's grace period forward to it. Never lengthens it.
    fn shorten_stop(&self, _vm_id: &str, _opts: StopOptions) {}

    /// The live VMM's sandbox: the report stored at spawn, and what the kernel shows applied.
    fn sandbox<'a>(&'a self, _vm_id: &'a str) -> DriverFuture<'a, SandboxView> {
        Box::pin(async { Err(DriverError::new("this driver cannot show a sandbox")) })
    }
}

/// A live VMM's sandbox, as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxView {
    /// The whole report the broker stored at spawn.
    pub planned: String,
    /// What the kernel shows of the live process, one line each.
    pub applied: Vec<String>,
}

/// A spawned VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    pub pid: u32,
    /// Unique among the VMMs this driver has spawned or taken up: every report about the VMM
    /// carries it, so a report about an earlier VMM of the same VM is recognised as stale.
    pub generation: u64,
}

/// How a boot ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    Running,
    /// The guest booted and then powered itself off (its VMM exited with status 0) before
    /// the VM counted as running; the text says how.
    PoweredOff(String),
}

/// What [`VmDriver::reattach`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reattached {
    /// The VMM runs and is watched again, as this generation.
    Alive { generation: u64 },
    /// The VMM is gone; the text says how.
    Gone(String),
}

/// A report from the driver about one VMM, for [`super::Manager::report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmReport {
    /// The VMM it is about (see [`Spawned::generation`]).
    pub generation: u64,
    /// How far the VMM's event file has been read once this report is applied; saved with
    /// the VM, so that a restart resumes there. `None` when the report changes nothing there.
    pub offset: Option<u64>,
    pub event: VmmEvent,
}

/// Something that happened to a VMM outside any operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmEvent {
    /// The VMM process exited. `clean` is exit status 0 (a guest-initiated shutdown).
    Exited { clean: bool, detail: String },
    /// The guest panicked (pvpanic); the VMM may still be alive.
    GuestPanic,
    /// The guest rebooted `count` times (reboots that come together are merged); the VM
    /// stays Running and the history records it once.
    GuestReboot { count: u64 },
    /// The VMM broke a limit (the text says which) and the driver has killed it.
    Misbehaved(String),
}
