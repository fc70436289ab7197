//! The driver that runs VMs for real: the broker for everything privileged, cloud-hypervisor's
//! REST API (over api-socket fds the broker connects) for boot checks and the staged stop, and
//! the VMM's event-monitor file plus the broker's exit events for what happens in between.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::Method;
use my_hypervisor_broker_proto::{
    Event, ExitStatus, Image, ImageRole, Reply, Request, SocketRole, VmmConfig, VmmSignal,
};
use tokio::sync::{broadcast, mpsc, watch};

use my_hypervisor_policy::vmm::LOG_TRIM_AT;

use crate::broker::{BrokerClient, BrokerError};
use crate::vm::driver::{
    Boot, DriverError, DriverFuture, Reattached, SandboxView, Spawned, StopOptions, VmDriver, VmmEvent, VmmReport,
};
use crate::vm::spec::VmSpec;
use crate::vmm::agent::{self, AgentWait};
use crate::vmm::{api, monitor};

/// How long a boot may take (from the spawn to vm.info saying Running) before the start fails.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// After vm.shutdown and vmm.shutdown, and again after SIGKILL, how long to wait for the exit.
const FORCE_WAIT: Duration = Duration::from_secs(5);
/// How often a VMM's event file is read, and vm.info asked during a boot.
const POLL: Duration = Duration::from_millis(100);
/// How often at most a chatty VMM's log is trimmed (broker `TrimLog`, past
/// [`LOG_TRIM_AT`] bytes held).
const TRIM_EVERY: Duration = Duration::from_secs(1);
/// The most a VMM's log may hold (what trims have not freed) or its event file may be (they
/// live on the host, in its runtime dir); past it, the VMM is killed and its VM fails: a
/// flood faster than the trims keep up with. The event file is read up to
/// the same bound ([`monitor::MAX_EVENT_FILE`]).
pub const MAX_VMM_OUTPUT: u64 = monitor::MAX_EVENT_FILE;
/// The most of a VMM's event file read in one go; a flood is read in steps of this size, and
/// the reboots of each step become one report.
const READ_STEP: u64 = 1024 * 1024;

const BOOTING: u8 = 0;
const RUNNING: u8 = 1;
const STOPPING: u8 = 2;

/// What the driver holds for a VM whose VMM it spawned, or took up again after a restart.
struct Runtime {
    /// Tells this VMM from earlier ones of the same VM; every report carries it.
    generation: u64,
    /// The event file showed `vm`/`booted`.
    booted: AtomicBool,
    events: std::fs::File,
    /// Shared with the VM's console, which serves its tail (`compute.vm.logs`).
    log: Arc<std::fs::File>,
    offset: AtomicU64,
    exit: watch::Sender<Option<ExitStatus>>,
    /// When the grace period of the stop in progress ends; a later stop may bring it forward.
    grace_end: watch::Sender<Option<Instant>>,
    /// BOOTING, RUNNING or STOPPING: only exits and guest events of a RUNNING VM are
    /// reported; a start or a stop in progress watches the exit itself.
    phase: AtomicU8,
}

struct Inner {
    broker: BrokerClient,
    next_generation: AtomicU64,
    vms: Mutex<HashMap<String, Arc<Runtime>>>,
    /// Exits that arrived for a VM not tracked yet (the exit event can overtake the spawn's
    /// reply, or come between an inventory and the re-attach); `track` applies them.
    early_exits: Mutex<HashMap<String, ExitStatus>>,
    /// Exits, panics and reboots of running VMs, for the manager.
    report: mpsc::UnboundedSender<(String, VmmReport)>,
}

/// Cheap to clone; every clone drives the same VMs.
#[derive(Clone)]
pub struct BrokerDriver {
    inner: Arc<Inner>,
}

fn step(what: &'static str) -> impl FnOnce(BrokerError) -> DriverError {
    move |e| DriverError::new(format!("{what}: {e}"))
}

pub fn describe(status: ExitStatus) -> String {
    match status {
        ExitStatus::Code(c) => format!("exit status {c}"),
        ExitStatus::Signal(s) => format!("killed by signal {s}"),
        ExitStatus::Unknown => {
            "exit status unknown (the VMM was adopted after a daemon restart, so it was not the broker's child)".into()
        }
    }
}

impl BrokerDriver {
    /// Starts the driver's watch on the broker's exit events. What happens to running VMs
    /// arrives on the returned receiver, for `Manager::report`.
    pub fn start(broker: BrokerClient) -> (BrokerDriver, mpsc::UnboundedReceiver<(String, VmmReport)>) {
        let (report, rx) = mpsc::unbounded_channel();
        let inner = Inner {
            broker,
            next_generation: AtomicU64::new(1),
            vms: Mutex::default(),
            early_exits: Mutex::default(),
            report,
        };
        let d = BrokerDriver { inner: Arc::new(inner) };
        tokio::spawn(d.clone().watch_exits());
        (d, rx)
    }

    fn runtime(&self, vm_id: &str) -> Option<Arc<Runtime>> {
        self.inner.vms.lock().expect("vms").get(vm_id).cloned()
    }

    /// Marks VMMs that exited; after a lag in the event stream, the broker's inventory says
    /// which ones did.
    async fn watch_exits(self) {
        let mut events = self.inner.broker.events();
        loop {
            match events.recv().await {
                Ok(Event::VmmExited { vm, status, .. }) => self.exited(&vm, status),
                Ok(Event::Shutdown) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "broker events missed; reading the inventory");
                    if let Ok((Reply::Inventory { vms }, _)) = self.inner.broker.call(Request::Inventory).await {
                        for v in vms {
                            if let Some(status) = v.exit {
                                self.exited(&v.vm, status);
                            }
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn exited(&self, vm_id: &str, status: ExitStatus) {
        let Some(rt) = self.runtime(vm_id) else {
            self.inner.early_exits.lock().expect("exits").insert(vm_id.to_string(), status);
            return;
        };
        if rt.exit.send_replace(Some(status)).is_some() {
            return;
        }
        // The exit is published before the phase is read, and a boot that turns RUNNING
        // reads the exit after storing the phase: one of the two sees the other.
        if rt.phase.load(Ordering::SeqCst) == RUNNING {
            let clean = status == ExitStatus::Code(0);
            let event = VmmEvent::Exited { clean, detail: describe(status) };
            let _ = self
                .inner
                .report
                .send((vm_id.to_string(), VmmReport { generation: rt.generation, offset: None, event }));
        }
    }

    /// Follows the VMM's event file while it lives: guest panics and reboots of a running VM
    /// go to the manager, the reboots of each step merged into one report.
    fn watch_events(&self, vm_id: String, rt: Arc<Runtime>) {
        let report = self.inner.report.clone();
        let mut exit = rt.exit.subscribe();
        let driver = self.clone();
        tokio::spawn(async move {
            let mut last_trim: Option<Instant> = None;
            loop {
                let done = exit.borrow().is_some();
                // The log counts by what it holds on its tmpfs: trims punch holes in it and
                // keep its size. The event file is never trimmed (its offsets are stored).
                let events = rt.events.metadata().map_or(0, |m| m.len());
                let log = rt.log.metadata().map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
                let output = events.max(log);
                if !done && output > MAX_VMM_OUTPUT {
                    let why = format!("it wrote {output} bytes of log or events, more than {MAX_VMM_OUTPUT}");
                    tracing::warn!(vm = %vm_id, %why, "killing the VMM");
                    let kill = Request::Signal { vm: vm_id.clone(), signal: VmmSignal::Kill };
                    let _ = driver.inner.broker.call(kill).await;
                    if rt.phase.swap(STOPPING, Ordering::SeqCst) == RUNNING {
                        let event = VmmEvent::Misbehaved(why);
                        let _ =
                            report.send((vm_id.clone(), VmmReport { generation: rt.generation, offset: None, event }));
                    }
                    return;
                }
                if !done && log > LOG_TRIM_AT && last_trim.is_none_or(|t| t.elapsed() >= TRIM_EVERY) {
                    last_trim = Some(Instant::now());
                    if let Err(e) = driver.inner.broker.call(Request::TrimLog { vm: vm_id.clone() }).await {
                        tracing::warn!(vm = %vm_id, error = %e, "cannot trim the VMM's log");
                    }
                }
                let from = rt.offset.load(Ordering::SeqCst);
                let mut more = false;
                match monitor::read_from(&rt.events, from, READ_STEP) {
                    Ok((events, offset)) => {
                        more = offset - from >= READ_STEP;
                        let running = rt.phase.load(Ordering::SeqCst) == RUNNING;
                        let mut out = merge(&rt, &events);
                        if let Some(last) = out.last_mut() {
                            last.offset = Some(offset);
                        }
                        rt.offset.store(offset, Ordering::SeqCst);
                        for r in out.into_iter().filter(|_| running) {
                            let _ = report.send((vm_id.clone(), r));
                        }
                    }
                    Err(e) => tracing::warn!(vm = %vm_id, error = %e, "cannot read the VMM's event file"),
                }
                if more {
                    tokio::task::yield_now().await;
                    continue;
                }
                if done || Arc::strong_count(&rt) == 1 {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(POLL) => {}
                    _ = exit.changed() => {}
                }
            }
        });
    }

    fn track(&self, vm_id: &str, outputs: Vec<OwnedFd>, offset: u64, phase: u8) -> Result<Arc<Runtime>, DriverError> {
        let [events, log] = <[OwnedFd; 2]>::try_from(outputs).map_err(|_| DriverError::new("expected 2 output fds"))?;
        let rt = Arc::new(Runtime {
            generation: self.inner.next_generation.fetch_add(1, Ordering::SeqCst),
            booted: AtomicBool::new(false),
            events: events.into(),
            log: Arc::new(log.into()),
            offset: AtomicU64::new(offset),
            exit: watch::channel(None).0,
            grace_end: watch::channel(None).0,
            phase: AtomicU8::new(phase),
        });
        self.inner.vms.lock().expect("vms").insert(vm_id.to_string(), Arc::clone(&rt));
        self.watch_events(vm_id.to_string(), Arc::clone(&rt));
        if let Some(consoles) = crate::console::installed() {
            consoles.attach(vm_id, rt.exit.subscribe(), Arc::clone(&rt.log));
        }
        if let Some(status) = self.inner.early_exits.lock().expect("exits").remove(vm_id) {
            self.exited(vm_id, status);
        }
        Ok(rt)
    }

    async fn api(&self, vm_id: &str) -> Result<std::os::fd::OwnedFd, BrokerError> {
        let (_, fds) = self.inner.broker.call(Request::Connect { vm: vm_id.into(), role: SocketRole::Api }).await?;
        fds.into_iter().next().ok_or(BrokerError::Closed)
    }

    /// One action on the VMM's API; how it went, for the stop's reason.
    async fn action(&self, vm_id: &str, what: &'static str) -> String {
        match self.api(vm_id).await {
            Ok(sock) => match api::call(sock, Method::PUT, what, api::ACTION).await {
                Ok(_) => what.to_string(),
                Err(e) => format!("{what} ({e})"),
            },
            Err(e) => format!("{what} (no api connection: {e})"),
        }
    }

    /// Waits for the exit until the grace period ends, following it when a later stop brings
    /// it forward. Returns the exit, and whether the wait was shortened.
    async fn wait_grace(rt: &Runtime, grace: Duration) -> (Option<ExitStatus>, bool) {
        let end = Instant::now() + grace;
        // A later stop may already have asked for less, before this one got here.
        rt.grace_end.send_modify(|e| *e = Some(e.map_or(end, |cur| cur.min(end))));
        let (mut exit, mut cut) = (rt.exit.subscribe(), rt.grace_end.subscribe());
        let r = loop {
            let until = cut.borrow_and_update().unwrap_or(end);
            tokio::select! {
                s = exit.wait_for(Option::is_some) => break (s.ok().and_then(|s| *s), until < end),
                () = tokio::time::sleep_until(until.into()) => break (None, until < end),
                _ = cut.changed() => {}
            }
        };
        rt.grace_end.send_replace(None);
        r
    }

    /// A later stop asks for less: bring the grace period of the one in progress forward.
    fn shorten(&self, vm_id: &str, opts: StopOptions) {
        let Some(rt) = self.runtime(vm_id) else { return };
        let new = if opts.force { Instant::now() } else { Instant::now() + opts.grace };
        rt.grace_end.send_if_modified(|end| match end {
            Some(cur) if new >= *cur => false,
            _ => {
                *end = Some(new);
                true
            }
        });
    }

    async fn wait_exit(rt: &Runtime, limit: Duration) -> Option<ExitStatus> {
        let mut rx = rt.exit.subscribe();
        let r = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
        r.ok().and_then(|v| v.ok().and_then(|s| *s))
    }

    async fn prepare_vm(&self, vm_id: &str, spec: &VmSpec) -> Result<(), DriverError> {
        let image = |path: &String, role| Image { path: path.clone(), role };
        let mut images: Vec<Image> = [
            (&spec.kernel, ImageRole::Kernel),
            (&spec.initramfs, ImageRole::Initramfs),
            (&spec.firmware, ImageRole::Firmware),
        ]
        .into_iter()
        .filter_map(|(p, role)| p.as_ref().map(|p| image(p, role)))
        .collect();
        images.extend(spec.disks.iter().map(|d| image(&d.path, ImageRole::Disk { readonly: d.readonly })));
        let broker = &self.inner.broker;
        broker.call(Request::Prepare { vm: vm_id.into(), images }).await.map_err(step("prepare"))?;
        for net in &spec.nets {
            let req =
                Request::CreateTap { vm: vm_id.into(), mac: net.mac.clone(), mtu: net.mtu, bridge: net.bridge.clone() };
            broker.call(req).await.map_err(step("create tap"))?;
        }
        Ok(())
    }

    async fn spawn_vm(&self, vm_id: &str, spec: &VmSpec) -> Result<Spawned, DriverError> {
        self.inner.early_exits.lock().expect("exits").remove(vm_id);
        let memory_mib = u32::try_from(spec.memory_mib).map_err(|_| DriverError::new("memory_mib too large"))?;
        let config = VmmConfig { vcpus: spec.vcpus, memory_mib, cmdline: spec.boot_cmdline(), vsock: spec.vsock };
        let (reply, fds) =
            self.inner.broker.call(Request::Spawn { vm: vm_id.into(), config }).await.map_err(step("spawn"))?;
        let Reply::Spawned { pid, .. } = reply else {
            return Err(DriverError::new(format!("spawn: unexpected reply {reply:?}")));
        };
        let rt = self.track(vm_id, fds, 0, BOOTING)?;
        Ok(Spawned { pid, generation: rt.generation })
    }

    async fn wait_running_vm(&self, vm_id: &str, spec: &VmSpec) -> Result<Boot, DriverError> {
        let rt = self.runtime(vm_id).ok_or_else(|| DriverError::new("no VMM was spawned"))?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut last = String::from("no answer yet");
        loop {
            if let Some(status) = *rt.exit.borrow() {
                return exited_in_boot(&rt, status, spec.agent());
            }
            if Instant::now() >= deadline {
                return Err(DriverError::new(format!("not running after {BOOT_TIMEOUT:?} (last: {last})")));
            }
            match self.api(vm_id).await {
                Ok(sock) => match api::vm_info(sock).await {
                    Ok(info) if info.state == "Running" => {
                        rt.booted.store(true, Ordering::SeqCst);
                        if spec.agent() {
                            return self.wait_agent_vm(vm_id, &rt, deadline).await;
                        }
                        return Self::now_running(&rt);
                    }
                    Ok(info) => last = format!("vm.info says {}", info.state),
                    // A timeout is a busy VMM, not a dead one: ask again until the deadline.
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The VM counts as running from now on, unless its VMM already exited.
    fn now_running(rt: &Runtime) -> Result<Boot, DriverError> {
        rt.phase.store(RUNNING, Ordering::SeqCst);
        if let Some(status) = *rt.exit.borrow() {
            return exited_in_boot(rt, status, false);
        }
        Ok(Boot::Running)
    }

    /// The guest runs; with `agent: true` it is running only once guest-init answers. A clean
    /// exit before that is a guest that powered off; no answer by the deadline fails the boot.
    async fn wait_agent_vm(&self, vm_id: &str, rt: &Runtime, deadline: Instant) -> Result<Boot, DriverError> {
        let exit = rt.exit.subscribe();
        match agent::wait_agent(&self.inner.broker, vm_id, exit, deadline.into()).await {
            AgentWait::Answered => Self::now_running(rt),
            AgentWait::Exited(status @ ExitStatus::Code(0)) => {
                Ok(Boot::PoweredOff(format!("the guest powered off before its agent answered ({})", describe(status))))
            }
            AgentWait::Exited(status) => {
                Err(DriverError::new(format!("the VMM exited before the guest agent answered ({})", describe(status))))
            }
            AgentWait::NoAnswer(last) => Err(DriverError::new(format!(
                "the guest agent did not answer within {BOOT_TIMEOUT:?} of the spawn (last: {last})"
            ))),
        }
    }

    /// The staged stop: power button, grace, vm.shutdown and vmm.shutdown, SIGKILL. A forced
    /// stop starts at vm.shutdown.
    async fn stop_vm(&self, vm_id: &str, opts: StopOptions) -> Result<String, DriverError> {
        let Some(rt) = self.runtime(vm_id) else { return Ok("no VMM was running".into()) };
        rt.phase.store(STOPPING, Ordering::SeqCst);
        if let Some(status) = *rt.exit.borrow() {
            return Ok(format!("the VMM had already exited ({})", describe(status)));
        }
        let mut steps = Vec::new();
        if opts.force {
            steps.push("forced: no power button".to_string());
        } else {
            let started = Instant::now();
            steps.push(self.action(vm_id, "vm.power-button").await);
            let (exited, shortened) = Self::wait_grace(&rt, opts.grace).await;
            if let Some(status) = exited {
                steps.push(format!("the guest shut down after {:.1?} ({})", started.elapsed(), describe(status)));
                return Ok(steps.join(", "));
            }
            if shortened {
                steps.push(format!("no shutdown within {:.1?}: a later stop shortened the wait", started.elapsed()));
            } else {
                steps.push(format!("no shutdown within {:?}", opts.grace));
            }
        }
        steps.push(self.action(vm_id, "vm.shutdown").await);
        steps.push(self.action(vm_id, "vmm.shutdown").await);
        if let Some(status) = Self::wait_exit(&rt, FORCE_WAIT).await {
            steps.push(format!("the VMM exited ({})", describe(status)));
            return Ok(steps.join(", "));
        }
        let kill = Request::Signal { vm: vm_id.into(), signal: VmmSignal::Kill };
        self.inner.broker.call(kill).await.map_err(step("SIGKILL"))?;
        steps.push("SIGKILL".into());
        match Self::wait_exit(&rt, FORCE_WAIT).await {
            Some(status) => steps.push(format!("the VMM exited ({})", describe(status))),
            None => steps.push("no exit seen yet; release reaps it".into()),
        }
        Ok(steps.join(", "))
    }

    async fn release_vm(&self, vm_id: &str) -> Result<(), DriverError> {
        if let Some(consoles) = crate::console::installed() {
            consoles.detach(vm_id);
        }
        self.inner.broker.call(Request::Release { vm: vm_id.into() }).await.map_err(step("release"))?;
        self.inner.vms.lock().expect("vms").remove(vm_id);
        self.inner.early_exits.lock().expect("exits").remove(vm_id);
        Ok(())
    }

    fn forget_vm(&self, vm_id: &str) {
        if let Some(consoles) = crate::console::installed() {
            consoles.forget(vm_id);
        }
        self.inner.vms.lock().expect("vms").remove(vm_id);
        self.inner.early_exits.lock().expect("exits").remove(vm_id);
    }

    async fn reattach_vm(&self, vm_id: &str, pid: Option<u32>, offset: u64) -> Result<Reattached, DriverError> {
        let (reply, _) = self.inner.broker.call(Request::Inventory).await.map_err(step("inventory"))?;
        let Reply::Inventory { vms } = reply else {
            return Err(DriverError::new("inventory: unexpected reply"));
        };
        let Some(held) = vms.into_iter().find(|v| v.vm == vm_id) else {
            // A restarted daemon releases each VM whose VMM it cannot adopt (docs/lifecycle.md).
            let why = "the broker holds nothing for it: its VMM ended, or could not be adopted again, while the daemon was down, and what it held was released";
            return Ok(Reattached::Gone(why.into()));
        };
        if !held.alive || pid.is_some_and(|p| held.pid != Some(p)) {
            let how = held.exit.map_or("not running".to_string(), describe);
            return Ok(Reattached::Gone(format!("its VMM (pid {:?}) is gone: {how}", held.pid)));
        }
        // Its API must answer: after a daemon restart the broker checked the process, not
        // that it still serves (inside its PID namespace the VMM is pid 1, so ping's pid
        // says nothing).
        let sock = self.api(vm_id).await.map_err(step("connect to the VMM's API"))?;
        api::call(sock, Method::GET, "vmm.ping", api::QUICK)
            .await
            .map_err(|e| DriverError::new(format!("vmm.ping: {e}")))?;
        let (_, fds) =
            self.inner.broker.call(Request::OpenOutputs { vm: vm_id.into() }).await.map_err(step("open outputs"))?;
        let rt = self.track(vm_id, fds, offset, RUNNING)?;
        Ok(Reattached::Alive { generation: rt.generation })
    }
}

impl VmDriver for BrokerDriver {
    fn vsock<'a>(&'a self, vm_id: &'a str) -> DriverFuture<'a, OwnedFd> {
        Box::pin(async move { agent::vsock(&self.inner.broker, vm_id).await.map_err(DriverError::new) })
    }

    fn prepare<'a>(&'a self, vm_id: &'a str, spec: &'a VmSpec) -> DriverFuture<'a, ()> {
        Box::pin(self.prepare_vm(vm_id, spec))
    }

    fn spawn<'a>(&'a self, vm_id: &'a str, spec: &'a VmSpec) -> DriverFuture<'a, Spawned> {
        Box::pin(self.spawn_vm(vm_id, spec))
    }

    fn wait_running<'a>(&'a self, vm_id: &'a str, spec: &'a VmSpec) -> DriverFuture<'a, Boot> {
        Box::pin(self.wait_running_vm(vm_id, spec))
    }

    fn stop<'a>(&'a self, vm_id: &'a str, opts: StopOptions) -> DriverFuture<'a, String> {
        Box::pin(self.stop_vm(vm_id, opts))
    }

    fn release<'a>(&'a self, vm_id: &'a str) -> DriverFuture<'a, ()> {
        Box::pin(self.release_vm(vm_id))
    }

    fn forget(&self, vm_id: &str) {
        self.forget_vm(vm_id);
    }

    fn reattach<'a>(&'a self, vm_id: &'a str, pid: Option<u32>, offset: u64) -> DriverFuture<'a, Reattached> {
        Box::pin(self.reattach_vm(vm_id, pid, offset))
    }

    fn shorten_stop(&self, vm_id: &str, opts: StopOptions) {
        self.shorten(vm_id, opts);
    }

    fn sandbox<'a>(&'a self, vm_id: &'a str) -> DriverFuture<'a, SandboxView> {
        Box::pin(async move {
            let (reply, _) =
                self.inner.broker.call(Request::Sandbox { vm: vm_id.into() }).await.map_err(step("sandbox"))?;
            match reply {
                Reply::Sandbox { planned, applied } => Ok(SandboxView { planned, applied }),
                _ => Err(DriverError::new("sandbox: unexpected reply")),
            }
        })
    }
}

/// The reports of one step of the event file: panics as they come, consecutive reboots as
/// one report with their count. Notes `vm`/`booted` on the way.
fn merge(rt: &Runtime, events: &[monitor::VmmEvent]) -> Vec<VmmReport> {
    let mut out: Vec<VmmReport> = Vec::new();
    for ev in events {
        let event = match (ev.source.as_str(), ev.event.as_str()) {
            ("vm", "booted") => {
                rt.booted.store(true, Ordering::SeqCst);
                continue;
            }
            // The VM fails on the panic: nothing after it in this step matters.
            ("guest", "panic") => {
                out.push(VmmReport { generation: rt.generation, offset: None, event: VmmEvent::GuestPanic });
                break;
            }
            ("vm", "rebooted") => {
                if let Some(VmmEvent::GuestReboot { count }) = out.last_mut().map(|r| &mut r.event) {
                    *count += 1;
                    continue;
                }
                VmmEvent::GuestReboot { count: 1 }
            }
            _ => continue,
        };
        out.push(VmmReport { generation: rt.generation, offset: None, event });
    }
    out
}

/// The VMM exited before the VM counted as running. Exit status 0 after the guest booted
/// (vm.info said Running, or the event file shows `vm`/`booted`) is a guest that powered
/// itself off; anything else is a failed boot.
fn exited_in_boot(rt: &Runtime, status: ExitStatus, agent: bool) -> Result<Boot, DriverError> {
    let booted = rt.booted.load(Ordering::SeqCst)
        || monitor::read_from(&rt.events, rt.offset.load(Ordering::SeqCst), READ_STEP)
            .is_ok_and(|(evs, _)| evs.iter().any(|e| e.source == "vm" && e.event == "booted"));
    if status == ExitStatus::Code(0) && booted {
        let when = if agent { "before its agent answered" } else { "right after it booted" };
        return Ok(Boot::PoweredOff(format!("the guest powered off {when} ({})", describe(status))));
    }
    Err(DriverError::new(format!("the VMM exited during boot ({})", describe(status))))
}
