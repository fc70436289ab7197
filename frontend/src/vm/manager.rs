//! The VM manager: the records of every VM, their state machines and histories, the events
//! broadcast, and the operations (create, start, stop, remove) with their locking.
//!
//! Locking: one short-held journal lock covers every record, the sequence counter and the
//! broadcast, so sequence numbers are handed out, recorded and broadcast in one order. Each
//! VM also has an operation lock (an async mutex): operations on one VM run one after
//! another, operations on different VMs in parallel. Operations run in tasks of their own, so
//! a client that disconnects halfway never leaves a VM between two steps.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{Notify, OwnedMutexGuard, broadcast, watch};

use super::driver::{DEFAULT_STOP_GRACE, DriverError, Reattached, StopOptions, VmDriver, VmmEvent};
use super::events::{Event, Follower};
use super::fsm::{self, VmState};
use super::spec::VmSpec;
use super::store::{Loaded, Store, Transition, VmFile, rfc3339};
use crate::rpc::errors::ApiError;

/// Default number of transitions kept per VM.
pub const DEFAULT_RING_CAPACITY: usize = 128;
/// Default longest wait for another operation on the same VM before answering busy.
pub const DEFAULT_OP_WAIT: Duration = Duration::from_secs(120);
/// Sequence numbers are reserved on disk this many at a time.
pub const SEQ_BLOCK: u64 = 64;
/// When the sequence file is unreadable, numbering resumes this far above the highest number
/// found in the VM files, so numbers of removed VMs cannot come back.
pub const SEQ_RECOVERY_GAP: u64 = 1 << 32;
/// Live events buffered per follower before it counts as lagging (it then catches up from
/// the histories).
const EVENT_BUFFER: usize = 1024;

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub state_dir: PathBuf,
    pub image_roots: Vec<PathBuf>,
    pub ring_capacity: usize,
    pub op_wait: Duration,
    /// The most VMs recorded at once.
    pub max_vms: usize,
}

impl ManagerConfig {
    pub fn new(state_dir: impl Into<PathBuf>, image_roots: Vec<PathBuf>) -> Self {
        ManagerConfig {
            state_dir: state_dir.into(),
            image_roots,
            ring_capacity: DEFAULT_RING_CAPACITY,
            op_wait: DEFAULT_OP_WAIT,
            max_vms: MAX_VMS,
        }
    }
}

/// A VM as `compute.vm.status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmStatus {
    pub vm_id: String,
    pub state: VmState,
    pub spec: Option<VmSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A VM as `compute.vm.list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmSummary {
    pub vm_id: String,
    pub state: VmState,
    pub labels: BTreeMap<String, String>,
}

/// The answer of `compute.vm.events.tail`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tail {
    pub events: Vec<Event>,
    /// The cursor to pass as `since_seq` next time (to tail or to follow).
    pub next_seq: u64,
}

/// The most VMs one frontend records by default (each has a state file and a history in memory).
pub const MAX_VMS: usize = 4096;

/// Handle to the manager; cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    image_roots: Vec<PathBuf>,
    driver: Option<Arc<dyn VmDriver>>,
    ring_capacity: usize,
    op_wait: Duration,
    max_vms: usize,
    journal: Mutex<Journal>,
    events: broadcast::Sender<Event>,
}

struct Journal {
    /// The last sequence number handed out.
    last_seq: u64,
    /// The high-water mark on disk: numbers up to it may have been handed out.
    reserved: u64,
    vms: BTreeMap<String, Entry>,
}

struct Entry {
    slot: Arc<Slot>,
    rec: Record,
    /// A remove is in progress: create must not return this VM as existing.
    removing: bool,
}

struct Record {
    state: VmState,
    spec: Option<VmSpec>,
    created_at: String,
    last_error: Option<String>,
    pid: Option<u32>,
    event_offset: Option<u64>,
    history: VecDeque<Transition>,
}

type StopResult = Option<Result<VmState, ApiError>>;

/// Per-VM coordination.
#[derive(Default)]
struct Slot {
    /// Held for the whole of an operation.
    op: Arc<tokio::sync::Mutex<()>>,
    /// A stop was asked for while a start was in progress.
    stop_requested: AtomicBool,
    stop_notify: Notify,
    /// The stop in progress, which later stops join.
    stop_join: Mutex<Option<watch::Receiver<StopResult>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

fn internal(detail: impl std::fmt::Display) -> ApiError {
    ApiError::Internal { detail: detail.to_string() }
}

impl Record {
    fn to_file(&self, vm_id: &str) -> VmFile {
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

impl Manager {
    /// Loads every VM from the state dir. It calls no driver: a restart touches no VM. An
    /// unreadable VM file gives a VM in state `failed` whose `last_error` says why; only an
    /// unreadable state dir is an error.
    pub fn open(cfg: ManagerConfig, driver: Option<Arc<dyn VmDriver>>) -> io::Result<Manager> {
        let store = Store::new(&cfg.state_dir);
        let ring = cfg.ring_capacity.max(1);
        let loaded = store.load_all()?;
        let mut vms = BTreeMap::new();
        let mut max_seen = 0;
        for l in loaded {
            let (vm_id, rec, rewrite) = match l {
                Loaded::Ok { file, .. } => {
                    let file = *file;
                    let mut history = file.history;
                    while history.len() > ring {
                        history.pop_front();
                    }
                    max_seen = history.iter().map(|t| t.seq).fold(max_seen, u64::max);
                    let rec = Record {
                        state: file.state,
                        spec: file.spec.map(VmSpec::normalized),
                        created_at: file.created_at,
                        last_error: file.last_error,
                        pid: file.pid,
                        event_offset: file.event_offset,
                        history,
                    };
                    (file.vm_id, rec, false)
                }
                Loaded::Corrupt { vm_id, error, moved_to } => {
                    let kept = moved_to.map_or("it could not be moved aside".to_string(), |p| {
                        format!("kept as {}", p.file_name().unwrap_or_default().to_string_lossy())
                    });
                    let rec = Record {
                        state: VmState::Failed,
                        spec: None,
                        created_at: now(),
                        last_error: Some(format!("state file unreadable: {error}; {kept}")),
                        pid: None,
                        event_offset: None,
                        history: VecDeque::new(),
                    };
                    (vm_id, rec, true)
                }
            };
            if rewrite && let Err(e) = store.write_vm(&rec.to_file(&vm_id)) {
                tracing::error!(vm = %vm_id, error = %e, "cannot write the state file of a failed VM");
            }
            vms.insert(vm_id, Entry { slot: Arc::default(), rec, removing: false });
        }
        let high_water = match store.read_sequence() {
            Ok(h) => h.unwrap_or(0),
            Err(e) => {
                let resume = max_seen.saturating_add(SEQ_RECOVERY_GAP);
                tracing::error!(error = %e, resume, "sequence file unreadable; numbering resumes far above the highest number found");
                resume
            }
        };
        let last_seq = high_water.max(max_seen);
        tracing::info!(vms = vms.len(), last_seq, "loaded VM records");
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Manager {
            inner: Arc::new(Inner {
                store,
                image_roots: cfg.image_roots,
                driver,
                ring_capacity: ring,
                op_wait: cfg.op_wait,
                max_vms: cfg.max_vms,
                journal: Mutex::new(Journal { last_seq, reserved: last_seq, vms }),
                events,
            }),
        })
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        lock(&self.inner.journal)
    }

    fn driver(&self, method: &'static str) -> Result<Arc<dyn VmDriver>, ApiError> {
        self.inner.driver.clone().ok_or(ApiError::NotReady { method })
    }

    fn slot(&self, vm_id: &str) -> Result<Arc<Slot>, ApiError> {
        self.journal()
            .vms
            .get(vm_id)
            .map(|e| Arc::clone(&e.slot))
            .ok_or_else(|| ApiError::NoSuchVm { vm_id: vm_id.to_string() })
    }

    /// Waits for the VM's operation lock (at most `op_wait`, then busy), and checks that the
    /// VM was not removed (or removed and created again) meanwhile.
    async fn lock_op(&self, vm_id: &str, slot: &Arc<Slot>) -> Result<OwnedMutexGuard<()>, ApiError> {
        let guard =
            tokio::time::timeout(self.inner.op_wait, Arc::clone(&slot.op).lock_owned()).await.map_err(|_| {
                ApiError::Busy {
                    vm_id: vm_id.to_string(),
                    detail: "another operation on this VM is still in progress".into(),
                }
            })?;
        self.with_entry(vm_id, slot, |_| ())?;
        Ok(guard)
    }

    fn with_entry<T>(&self, vm_id: &str, slot: &Arc<Slot>, f: impl FnOnce(&mut Entry) -> T) -> Result<T, ApiError> {
        let mut j = self.journal();
        match j.vms.get_mut(vm_id) {
            Some(e) if Arc::ptr_eq(&e.slot, slot) => Ok(f(e)),
            _ => Err(ApiError::NoSuchVm { vm_id: vm_id.to_string() }),
        }
    }

    /// The one place a state changes: checks the table, numbers the transition, records it
    /// in the VM's ring, persists the VM and broadcasts the event.
    fn transition(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        to: VmState,
        reason: impl Into<String>,
    ) -> Result<(), ApiError> {
        self.transition_with(vm_id, slot, to, reason, |_| ())
    }

    fn transition_with(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        to: VmState,
        reason: impl Into<String>,
        update: impl FnOnce(&mut Record),
    ) -> Result<(), ApiError> {
        let reason = reason.into();
        let mut j = self.journal();
        let from = match j.vms.get(vm_id) {
            Some(e) if Arc::ptr_eq(&e.slot, slot) => e.rec.state,
            _ => return Err(ApiError::NoSuchVm { vm_id: vm_id.to_string() }),
        };
        fsm::check(vm_id, from, to)?;
        let seq = self.next_seq(&mut j)?;
        let t = Transition { seq, at: now(), from, to, reason };
        let ring = self.inner.ring_capacity;
        let Some(entry) = j.vms.get_mut(vm_id) else {
            return Err(ApiError::NoSuchVm { vm_id: vm_id.to_string() });
        };
        let rec = &mut entry.rec;
        rec.state = to;
        match to {
            VmState::Provisioning => rec.last_error = None,
            VmState::StartFailed | VmState::Failed => rec.last_error = Some(t.reason.clone()),
            _ => {}
        }
        update(rec);
        rec.event_offset = self.inner.driver.as_ref().and_then(|d| d.event_offset(vm_id));
        rec.history.push_back(t.clone());
        while rec.history.len() > ring {
            rec.history.pop_front();
        }
        // The transition has happened in the world (a VMM was spawned, say), so it is applied
        // even when persisting fails; the next write of this VM retries.
        if let Err(e) = self.inner.store.write_vm(&rec.to_file(vm_id)) {
            tracing::error!(vm = vm_id, error = %e, "cannot persist state.json");
        }
        tracing::info!(vm = vm_id, seq, from = %from, to = %to, reason = %t.reason, "transition");
        let _ = self.inner.events.send(Event::new(vm_id, &t));
        Ok(())
    }

    /// The next sequence number. A block of numbers is reserved on disk before any of it is
    /// handed out, so a number never repeats, even after a crash.
    fn next_seq(&self, j: &mut Journal) -> Result<u64, ApiError> {
        let n = j.last_seq + 1;
        if n > j.reserved {
            let high = n + SEQ_BLOCK - 1;
            self.inner.store.write_sequence(high).map_err(|e| internal(format!("persisting the sequence: {e}")))?;
            j.reserved = high;
        }
        j.last_seq = n;
        Ok(n)
    }

    // ---- Queries ----

    pub fn status(&self, vm_id: &str) -> Result<VmStatus, ApiError> {
        let j = self.journal();
        let e = j.vms.get(vm_id).ok_or_else(|| ApiError::NoSuchVm { vm_id: vm_id.to_string() })?;
        Ok(VmStatus {
            vm_id: vm_id.to_string(),
            state: e.rec.state,
            spec: e.rec.spec.clone(),
            pid: e.rec.pid,
            last_error: e.rec.last_error.clone(),
        })
    }

    pub fn state(&self, vm_id: &str) -> Result<VmState, ApiError> {
        Ok(self.status(vm_id)?.state)
    }

    pub fn list(&self) -> Vec<VmSummary> {
        self.journal()
            .vms
            .iter()
            .map(|(id, e)| VmSummary {
                vm_id: id.clone(),
                state: e.rec.state,
                labels: e.rec.spec.as_ref().map(|s| s.labels.clone()).unwrap_or_default(),
            })
            .collect()
    }

    /// The last sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        self.journal().last_seq
    }

    /// Transitions after `since`, oldest first, at most `limit`.
    pub fn tail(&self, vm_id: Option<&str>, since: u64, limit: usize) -> Result<Tail, ApiError> {
        let j = self.journal();
        let mut events = collect(&j, vm_id, since)?;
        let next_seq = if events.len() > limit {
            events.truncate(limit);
            events.last().map_or(since, |e| e.seq)
        } else {
            j.last_seq.max(since)
        };
        Ok(Tail { events, next_seq })
    }

    /// Starts following transitions after `since` (or after the newest one, when `None`).
    /// The live broadcast is subscribed before the history is read, under the same lock that
    /// orders transitions, so no event falls between the two; the follower drops duplicates
    /// by sequence number.
    pub fn follow(&self, vm_id: Option<String>, since: Option<u64>) -> Result<Follower, ApiError> {
        let j = self.journal();
        let rx = self.inner.events.subscribe();
        let since = since.unwrap_or(j.last_seq);
        let backlog = collect(&j, vm_id.as_deref(), since)?;
        drop(j);
        Ok(Follower::new(self.clone(), rx, vm_id, since, backlog))
    }

    /// History after `since` for a follower catching up after it lagged.
    pub(crate) fn history_after(&self, vm_id: Option<&str>, since: u64) -> Vec<Event> {
        collect(&self.journal(), vm_id, since).unwrap_or_default()
    }

    // ---- Operations ----

    /// Records a new VM in state `pending`; it does not start it. An identical spec under an
    /// existing id returns that VM; a different one is refused.
    pub fn create(&self, spec: VmSpec) -> Result<VmState, ApiError> {
        spec.validate(&self.inner.image_roots)?;
        let spec = spec.normalized();
        let mut j = self.journal();
        if let Some(e) = j.vms.get(&spec.id) {
            if e.removing {
                return Err(ApiError::Busy { vm_id: spec.id.clone(), detail: "it is being removed".into() });
            }
            if e.rec.spec.as_ref() == Some(&spec) {
                return Ok(e.rec.state);
            }
            return Err(ApiError::AlreadyExists { vm_id: spec.id.clone() });
        }
        let max = self.inner.max_vms;
        if j.vms.len() >= max {
            return Err(ApiError::invalid_spec(
                "id",
                format!("this host already records {max} VMs, the most it keeps"),
            ));
        }
        let rec = Record {
            state: VmState::Pending,
            spec: Some(spec.clone()),
            created_at: now(),
            last_error: None,
            pid: None,
            event_offset: None,
            history: VecDeque::new(),
        };
        self.inner.store.write_vm(&rec.to_file(&spec.id)).map_err(|e| internal(format!("writing state.json: {e}")))?;
        tracing::info!(vm = %spec.id, "VM created");
        j.vms.insert(spec.id, Entry { slot: Arc::default(), rec, removing: false });
        Ok(VmState::Pending)
    }

    /// Forgets a VM in which no VMM can be alive. A `failed` VM's leftovers are released first.
    pub async fn remove(&self, vm_id: &str) -> Result<(), ApiError> {
        let slot = self.slot(vm_id)?;
        let this = self.clone();
        let id = vm_id.to_string();
        tokio::spawn(async move { this.remove_op(&id, slot).await }).await.map_err(internal)?
    }

    async fn remove_op(&self, vm_id: &str, slot: Arc<Slot>) -> Result<(), ApiError> {
        let _guard = self.lock_op(vm_id, &slot).await?;
        let state = self.with_entry(vm_id, &slot, |e| {
            if e.rec.state.removable() {
                e.removing = true;
            }
            e.rec.state
        })?;
        if !state.removable() {
            return Err(ApiError::IllegalTransition {
                vm_id: vm_id.to_string(),
                from: state.to_string(),
                to: "removed".into(),
            });
        }
        let undo = |e: ApiError| {
            let _ = self.with_entry(vm_id, &slot, |e| e.removing = false);
            e
        };
        if state == VmState::Failed {
            let driver = self.driver("compute.vm.remove").map_err(undo)?;
            driver.release(vm_id).await.map_err(|e| {
                undo(ApiError::Vmm { vm_id: vm_id.to_string(), detail: format!("releasing what is left: {e}") })
            })?;
        }
        let mut j = self.journal();
        self.inner.store.remove_vm(vm_id).map_err(|e| undo(internal(format!("removing state.json: {e}"))))?;
        j.vms.remove(vm_id);
        tracing::info!(vm = vm_id, "VM removed");
        Ok(())
    }

    /// Starts a VM: provisions it, spawns its VMM and waits until it runs. On Running it is a
    /// no-op. Returns the state it ends in.
    pub async fn start(&self, vm_id: &str) -> Result<VmState, ApiError> {
        let driver = self.driver("compute.vm.start")?;
        let slot = self.slot(vm_id)?;
        let this = self.clone();
        let id = vm_id.to_string();
        tokio::spawn(async move { this.start_op(&id, slot, driver).await }).await.map_err(internal)?
    }

    async fn start_op(&self, vm_id: &str, slot: Arc<Slot>, driver: Arc<dyn VmDriver>) -> Result<VmState, ApiError> {
        let guard = self.lock_op(vm_id, &slot).await?;
        let (state, spec) = self.with_entry(vm_id, &slot, |e| (e.rec.state, e.rec.spec.clone()))?;
        if state == VmState::Running {
            return Ok(state);
        }
        // Refuse through the table, so the error is the documented one.
        fsm::check(vm_id, state, VmState::Provisioning)?;
        let spec = spec.ok_or_else(|| {
            ApiError::invalid_spec("spec", "this VM's state file was unreadable; remove it and create it again")
        })?;
        slot.stop_requested.store(false, Ordering::SeqCst);
        if state == VmState::Failed {
            driver.release(vm_id).await.map_err(|e| ApiError::Vmm {
                vm_id: vm_id.to_string(),
                detail: format!("releasing what the failed VM left: {e}"),
            })?;
        }
        self.transition(vm_id, &slot, VmState::Provisioning, "start requested")?;
        if let Err(e) = driver.prepare(vm_id, &spec).await {
            return self.start_failed(vm_id, &slot, &*driver, format!("provisioning failed: {e}")).await;
        }
        self.transition(vm_id, &slot, VmState::Configured, "resources ready")?;
        let pid = match driver.spawn(vm_id, &spec).await {
            Ok(pid) => pid,
            Err(e) => {
                return self.start_failed(vm_id, &slot, &*driver, format!("spawning the VMM failed: {e}")).await;
            }
        };
        self.transition_with(vm_id, &slot, VmState::Starting, format!("VMM spawned (pid {pid})"), |r| {
            r.pid = Some(pid)
        })?;
        let outcome = {
            let notified = slot.stop_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if slot.stop_requested.load(Ordering::SeqCst) {
                None
            } else {
                tokio::select! {
                    r = driver.wait_running(vm_id, &spec) => Some(r),
                    () = notified => None,
                }
            }
        };
        match outcome {
            Some(Ok(())) => {
                let why = if spec.agent() { "VM running; guest agent answers" } else { "VM running" };
                self.transition(vm_id, &slot, VmState::Running, why)?;
                Ok(VmState::Running)
            }
            Some(Err(e)) => self.start_failed(vm_id, &slot, &*driver, format!("boot failed: {e}")).await,
            None => {
                // A stop takes over; the start ends with whatever the stop leaves.
                drop(guard);
                let stop = lock(&slot.stop_join).clone();
                if let Some(rx) = stop {
                    let _ = wait_stop(rx).await;
                }
                self.state(vm_id)
            }
        }
    }

    async fn start_failed(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        driver: &dyn VmDriver,
        reason: String,
    ) -> Result<VmState, ApiError> {
        // StartFailed promises that nothing is left; when releasing fails, that is not so.
        let (to, reason) = match driver.release(vm_id).await {
            Ok(()) => (VmState::StartFailed, format!("{reason}; resources released")),
            Err(e) => (VmState::Failed, format!("{reason}; releasing failed: {e}")),
        };
        self.transition_with(vm_id, slot, to, reason.clone(), |r| {
            if to == VmState::StartFailed {
                r.pid = None;
            }
        })?;
        Err(ApiError::Vmm { vm_id: vm_id.to_string(), detail: reason })
    }

    /// Stops a VM (Running or Starting) and releases its resources. On Stopped it is a no-op;
    /// concurrent stops of one VM join one operation.
    pub async fn stop(&self, vm_id: &str, grace: Option<Duration>) -> Result<VmState, ApiError> {
        let driver = self.driver("compute.vm.stop")?;
        let slot = self.slot(vm_id)?;
        let rx = {
            let mut join = lock(&slot.stop_join);
            if let Some(rx) = join.as_ref() {
                rx.clone()
            } else {
                let (tx, rx) = watch::channel(None);
                *join = Some(rx.clone());
                drop(join);
                if matches!(self.state(vm_id), Ok(VmState::Provisioning | VmState::Configured | VmState::Starting)) {
                    slot.stop_requested.store(true, Ordering::SeqCst);
                    slot.stop_notify.notify_waiters();
                }
                let this = self.clone();
                let id = vm_id.to_string();
                let opts = StopOptions { grace: grace.unwrap_or(DEFAULT_STOP_GRACE) };
                tokio::spawn(async move {
                    let r = this.stop_op(&id, &slot, driver, opts).await;
                    *lock(&slot.stop_join) = None;
                    let _ = tx.send(Some(r));
                });
                rx
            }
        };
        wait_stop(rx).await
    }

    async fn stop_op(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        driver: Arc<dyn VmDriver>,
        opts: StopOptions,
    ) -> Result<VmState, ApiError> {
        let _guard = self.lock_op(vm_id, slot).await?;
        let state = self.with_entry(vm_id, slot, |e| e.rec.state)?;
        match state {
            VmState::Stopped => return Ok(state),
            VmState::Pending | VmState::StartFailed | VmState::Failed => {
                return Err(ApiError::NotRunning { vm_id: vm_id.to_string() });
            }
            _ => {}
        }
        let why = if state == VmState::Starting { "stop requested while starting" } else { "stop requested" };
        self.transition(vm_id, slot, VmState::Stopping, why)?;
        let (to, reason) = match driver.stop(vm_id, opts).await {
            Ok(how) => match driver.release(vm_id).await {
                Ok(()) => (VmState::Stopped, format!("{how}; resources released")),
                Err(e) => (VmState::Failed, format!("{how}; releasing failed: {e}")),
            },
            Err(e) => (VmState::Failed, format!("stop failed: {e}")),
        };
        self.transition_with(vm_id, slot, to, reason.clone(), |r| {
            if to == VmState::Stopped {
                r.pid = None;
            }
        })?;
        slot.stop_requested.store(false, Ordering::SeqCst);
        if to == VmState::Stopped { Ok(to) } else { Err(ApiError::Vmm { vm_id: vm_id.to_string(), detail: reason }) }
    }

    /// After a (re)start of the frontend: takes up the VMs whose VMM may still run, each in
    /// its own task. A live VMM's VM stays Running and is watched again; a start or stop cut
    /// short by the restart is finished; a VM whose VMM went away becomes Failed (or Stopped,
    /// if it was being stopped).
    pub fn recover(&self) {
        let Some(driver) = self.inner.driver.clone() else { return };
        let busy = [VmState::Provisioning, VmState::Configured, VmState::Starting, VmState::Running, VmState::Stopping];
        let vms: Vec<String> =
            self.journal().vms.iter().filter(|(_, e)| busy.contains(&e.rec.state)).map(|(id, _)| id.clone()).collect();
        for vm_id in vms {
            let (this, driver) = (self.clone(), Arc::clone(&driver));
            // Each VM's lock is taken before this returns (nothing else holds it yet), so no
            // operation from a client can come before its recovery.
            let Ok(slot) = self.slot(&vm_id) else { continue };
            let Ok(guard) = Arc::clone(&slot.op).try_lock_owned() else { continue };
            tokio::spawn(async move {
                if let Err(e) = this.recover_one(&vm_id, &slot, driver).await {
                    tracing::error!(vm = %vm_id, error = %e, "taking up the VM after a restart failed");
                }
                drop(guard);
            });
        }
    }

    async fn recover_one(&self, vm_id: &str, slot: &Arc<Slot>, driver: Arc<dyn VmDriver>) -> Result<(), ApiError> {
        let slot = Arc::clone(slot);
        let (state, pid, offset, spec) = self.with_entry(vm_id, &slot, |e| {
            (e.rec.state, e.rec.pid, e.rec.event_offset.unwrap_or(0), e.rec.spec.clone())
        })?;
        let clear_pid = |r: &mut Record| r.pid = None;
        if matches!(state, VmState::Provisioning | VmState::Configured) {
            let why = "the frontend restarted while the VM was being provisioned; start it again";
            return self.transition_with(vm_id, &slot, VmState::Failed, why, clear_pid);
        }
        let found = driver.reattach(vm_id, pid, offset).await;
        tracing::info!(vm = vm_id, %state, ?found, "taking up the VM after a restart");
        match (state, found) {
            (VmState::Running, Ok(Reattached::Alive)) => Ok(()),
            (VmState::Starting, Ok(Reattached::Alive)) => {
                let waited = match &spec {
                    Some(spec) => driver.wait_running(vm_id, spec).await,
                    None => Err(DriverError::new("its spec is unreadable")),
                };
                match waited {
                    Ok(()) => self.transition(
                        vm_id,
                        &slot,
                        VmState::Running,
                        "VM running (start finished after a frontend restart)",
                    ),
                    Err(e) => {
                        let _ = self.start_failed(vm_id, &slot, &*driver, format!("boot failed: {e}")).await;
                        Ok(())
                    }
                }
            }
            (VmState::Stopping, found) => {
                let how = match found {
                    Ok(Reattached::Alive) => {
                        match driver.stop(vm_id, StopOptions { grace: DEFAULT_STOP_GRACE }).await {
                            Ok(how) => how,
                            Err(e) => format!("stop failed: {e}"),
                        }
                    }
                    Ok(Reattached::Gone(how)) => how,
                    Err(e) => e.to_string(),
                };
                let (to, reason) = match driver.release(vm_id).await {
                    Ok(()) => {
                        (VmState::Stopped, format!("stop finished after a frontend restart: {how}; resources released"))
                    }
                    Err(e) => (VmState::Failed, format!("stop after a frontend restart: {how}; releasing failed: {e}")),
                };
                self.transition_with(vm_id, &slot, to, reason, clear_pid)
            }
            (_, Ok(Reattached::Gone(how))) => {
                let why = format!("the VMM went away while the frontend was down: {how}");
                self.transition_with(vm_id, &slot, VmState::Failed, why, clear_pid)
            }
            (_, Err(e)) => {
                let why = format!("cannot take up the VMM after a frontend restart: {e}");
                self.transition_with(vm_id, &slot, VmState::Failed, why, clear_pid)
            }
            (_, Ok(Reattached::Alive)) => Ok(()),
        }
    }

    /// Records something that happened to a running VM's VMM outside any operation. It waits
    /// for the VM's operation in progress, if any; an event about a VM that is no longer
    /// Running is stale (that operation handled it) and changes nothing. Returns the state.
    pub async fn vmm_event(&self, vm_id: &str, event: VmmEvent) -> Result<VmState, ApiError> {
        let slot = self.slot(vm_id)?;
        let this = self.clone();
        let id = vm_id.to_string();
        tokio::spawn(async move { this.vmm_event_op(&id, slot, event).await }).await.map_err(internal)?
    }

    async fn vmm_event_op(&self, vm_id: &str, slot: Arc<Slot>, event: VmmEvent) -> Result<VmState, ApiError> {
        let _guard = Arc::clone(&slot.op).lock_owned().await;
        let state = self.with_entry(vm_id, &slot, |e| e.rec.state)?;
        if state != VmState::Running {
            tracing::debug!(vm = vm_id, ?event, %state, "VMM event for a VM that is not running; ignored");
            return Ok(state);
        }
        let exited = matches!(event, VmmEvent::Exited { .. });
        let (to, reason) = match event {
            VmmEvent::Exited { clean: true, detail } => {
                let released = match &self.inner.driver {
                    Some(d) => d.release(vm_id).await,
                    None => Ok(()),
                };
                match released {
                    Ok(()) => (VmState::Stopped, format!("the guest shut down ({detail}); resources released")),
                    Err(e) => (VmState::Failed, format!("the guest shut down ({detail}); releasing failed: {e}")),
                }
            }
            VmmEvent::Exited { clean: false, detail } => {
                (VmState::Failed, format!("the VMM exited unexpectedly: {detail}"))
            }
            VmmEvent::GuestPanic => (VmState::Failed, "the guest panicked".to_string()),
            VmmEvent::GuestReboot => (VmState::Running, "the guest rebooted".to_string()),
            VmmEvent::Misbehaved(why) => (VmState::Failed, format!("the VMM was killed: {why}")),
        };
        self.transition_with(vm_id, &slot, to, reason, |r| {
            if exited {
                r.pid = None;
            }
        })?;
        Ok(to)
    }
}

async fn wait_stop(mut rx: watch::Receiver<StopResult>) -> Result<VmState, ApiError> {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone().unwrap_or_else(|| Err(internal("the stop ended without a result"))),
        Err(_) => Err(internal("the stop ended without a result")),
    }
}

fn collect(j: &Journal, vm_id: Option<&str>, since: u64) -> Result<Vec<Event>, ApiError> {
    let mut out: Vec<Event> = match vm_id {
        Some(id) => {
            let e = j.vms.get(id).ok_or_else(|| ApiError::NoSuchVm { vm_id: id.to_string() })?;
            e.rec.history.iter().filter(|t| t.seq > since).map(|t| Event::new(id, t)).collect()
        }
        None => j
            .vms
            .iter()
            .flat_map(|(id, e)| e.rec.history.iter().filter(|t| t.seq > since).map(|t| Event::new(id, t)))
            .collect(),
    };
    out.sort_by_key(|e| e.seq);
    Ok(out)
}
