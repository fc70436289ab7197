//! A test-only [`VmDriver`]: every step succeeds unless told to fail, steps can be slowed or
//! made to hang, a boot can end with the guest powering off, a restart can find the VMM alive
//! or not, and every call is counted.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use my_hypervisor_frontend::vm::{
    Boot, DriverError, DriverFuture, Reattached, SandboxView, Spawned, StopOptions, VmDriver, VmSpec,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Prepare,
    Spawn,
    WaitRunning,
    Stop,
    Release,
    Reattach,
    Forget,
}

#[derive(Default)]
pub struct TestDriver {
    /// Steps that fail (for every VM).
    pub fail: Mutex<HashSet<Step>>,
    /// Steps that take this long.
    pub delay: Mutex<HashMap<Step, Duration>>,
    /// When set, wait_running never resolves.
    pub hang_boot: std::sync::atomic::AtomicBool,
    pub calls: Mutex<HashMap<Step, u32>>,
    /// VMs currently inside a driver call, and the most ever seen at once per VM.
    busy: Mutex<HashMap<String, u32>>,
    pub max_per_vm: AtomicU32,
    pub max_total: AtomicU32,
    next_pid: AtomicU32,
    /// The generation of the last VMM spawned or taken up.
    pub generation: AtomicU64,
    /// When set, a boot ends with the guest powering itself off.
    pub power_off_at_boot: AtomicBool,
    /// What a reattach finds; by default the VMM is gone.
    pub reattach: Mutex<Option<Result<bool, String>>>,
}

impl TestDriver {
    pub fn calls(&self, step: Step) -> u32 {
        self.calls.lock().unwrap().get(&step).copied().unwrap_or(0)
    }

    pub fn set_fail(&self, step: Step, on: bool) {
        let mut f = self.fail.lock().unwrap();
        if on {
            f.insert(step);
        } else {
            f.remove(&step);
        }
    }

    pub fn set_delay(&self, step: Step, d: Duration) {
        self.delay.lock().unwrap().insert(step, d);
    }

    async fn step(&self, vm: &str, step: Step) -> Result<(), DriverError> {
        *self.calls.lock().unwrap().entry(step).or_default() += 1;
        {
            let mut b = self.busy.lock().unwrap();
            let n = b.entry(vm.to_string()).or_default();
            *n += 1;
            self.max_per_vm.fetch_max(*n, Ordering::SeqCst);
            let total: u32 = b.values().sum();
            self.max_total.fetch_max(total, Ordering::SeqCst);
        }
        let delay = self.delay.lock().unwrap().get(&step).copied();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        *self.busy.lock().unwrap().get_mut(vm).unwrap() -= 1;
        if self.fail.lock().unwrap().contains(&step) {
            return Err(DriverError::new(format!("{step:?} failed on request")));
        }
        Ok(())
    }
}

impl VmDriver for TestDriver {
    fn prepare<'a>(&'a self, vm: &'a str, _: &'a VmSpec) -> DriverFuture<'a, ()> {
        Box::pin(self.step(vm, Step::Prepare))
    }

    fn spawn<'a>(&'a self, vm: &'a str, _: &'a VmSpec) -> DriverFuture<'a, Spawned> {
        Box::pin(async move {
            self.step(vm, Step::Spawn).await?;
            let pid = 1000 + self.next_pid.fetch_add(1, Ordering::SeqCst);
            Ok(Spawned { pid, generation: self.generation.fetch_add(1, Ordering::SeqCst) + 1 })
        })
    }

    fn wait_running<'a>(&'a self, vm: &'a str, _: &'a VmSpec) -> DriverFuture<'a, Boot> {
        Box::pin(async move {
            if self.hang_boot.load(Ordering::SeqCst) {
                *self.calls.lock().unwrap().entry(Step::WaitRunning).or_default() += 1;
                std::future::pending::<()>().await;
            }
            self.step(vm, Step::WaitRunning).await?;
            if self.power_off_at_boot.load(Ordering::SeqCst) {
                return Ok(Boot::PoweredOff("the guest powered off right after it booted (exit status 0)".into()));
            }
            Ok(Boot::Running)
        })
    }

    fn stop<'a>(&'a self, vm: &'a str, opts: StopOptions) -> DriverFuture<'a, String> {
        Box::pin(async move {
            self.step(vm, Step::Stop).await?;
            if opts.force {
                return Ok("forced: vm.shutdown, no power button".to_string());
            }
            Ok(format!("stopped by the power button (grace {}s)", opts.grace.as_secs()))
        })
    }

    fn release<'a>(&'a self, vm: &'a str) -> DriverFuture<'a, ()> {
        Box::pin(self.step(vm, Step::Release))
    }

    fn forget(&self, _: &str) {
        *self.calls.lock().unwrap().entry(Step::Forget).or_default() += 1;
    }

    /// A report in the broker's shape, and what the kernel would show.
    fn sandbox<'a>(&'a self, vm: &'a str) -> DriverFuture<'a, SandboxView> {
        Box::pin(async move {
            let planned = format!(
                "sandbox of VM {vm}\n\n[identity]\nuid 63299 gid 63299, no supplementary groups\n\
                 capabilities: all sets empty\n\n[landlock] ABI 6 (hard requirement)\n/x: ReadFile\n\
                 \n[seccomp] default action: KillProcess\nallow read\n"
            );
            Ok(SandboxView {
                planned,
                applied: vec!["uid (real, effective, saved, fs): 63299 63299 63299 63299".into()],
            })
        })
    }

    fn reattach<'a>(&'a self, vm: &'a str, _: Option<u32>, _: u64) -> DriverFuture<'a, Reattached> {
        Box::pin(async move {
            self.step(vm, Step::Reattach).await?;
            match self.reattach.lock().unwrap().clone() {
                Some(Ok(true)) => {
                    Ok(Reattached::Alive { generation: self.generation.fetch_add(1, Ordering::SeqCst) + 1 })
                }
                Some(Err(e)) => Err(DriverError::new(e)),
                Some(Ok(false)) | None => Ok(Reattached::Gone("the test driver has no VMM".into())),
            }
        })
    }
}
