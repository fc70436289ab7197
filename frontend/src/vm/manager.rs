//! The VM manager: the handle every caller uses, its configuration, and loading the records
//! at start. The rest of it lives by concern: [`super::records`] (transitions, sequence
//! numbers, the broadcast and the queries), [`super::ops`] (create, start, stop, remove),
//! [`super::recovery`] (after a frontend restart) and [`super::vmm_events`] (what happens to a
//! running VMM).
//!
//! Locking: one short-held records lock covers every record, the sequence counter and the
//! broadcast, so sequence numbers are handed out, recorded and broadcast in one order; it is
//! never held across a disk write or an await (the [`Writer`] persists). Each VM also has an
//! operation lock (an async mutex): operations on one VM run one after another, operations
//! on different VMs in parallel. Operations run in tasks of their own, so a client that
//! disconnects halfway never leaves a VM between two steps.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, OwnedMutexGuard, broadcast, watch};

use super::driver::{StopOptions, VmDriver};
use super::error::VmError;
use super::fsm::VmState;
use super::records::{Entry, Record, Records, now};
use super::spec::VmSpec;
use super::store::{Loaded, Store};
use super::vmm_events::Reports;
use super::writer::{StateStore, Writer};

/// Default number of transitions kept per VM.
pub const DEFAULT_RING_CAPACITY: usize = 128;
/// Default longest wait for another operation on the same VM before answering busy.
pub const DEFAULT_OP_WAIT: Duration = Duration::from_secs(120);
/// Sequence numbers are reserved on disk this many at a time, the next block as soon as half
/// of the current one is used.
pub const SEQ_BLOCK: u64 = 4096;
/// When the sequence mark cannot be trusted (missing, unreadable, or below a number in a VM
/// file), numbering resumes this far above the highest number found in the VM files.
pub const SEQ_RECOVERY_GAP: u64 = 1 << 32;
/// The most VMs one frontend records by default (each has a state file and a history in memory).
pub const MAX_VMS: usize = 4096;

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub state_dir: PathBuf,
    pub image_roots: Vec<PathBuf>,
    pub ring_capacity: usize,
    pub op_wait: Duration,
    /// The most VMs recorded at once.
    pub max_vms: usize,
    /// Sequence numbers reserved on disk at a time.
    pub seq_block: u64,
}

impl ManagerConfig {
    pub fn new(state_dir: impl Into<PathBuf>, image_roots: Vec<PathBuf>) -> Self {
        ManagerConfig {
            state_dir: state_dir.into(),
            image_roots,
            ring_capacity: DEFAULT_RING_CAPACITY,
            op_wait: DEFAULT_OP_WAIT,
            max_vms: MAX_VMS,
            seq_block: SEQ_BLOCK,
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
    /// When create recorded it (RFC 3339, UTC).
    pub created_at: String,
    /// The seq of its last recorded transition (none for a VM whose history is empty).
    pub last_seq: Option<u64>,
}

/// A VM as `compute.vm.list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmSummary {
    pub vm_id: String,
    pub state: VmState,
    pub labels: BTreeMap<String, String>,
}

/// Handle to the manager; cheap to clone.
#[derive(Clone)]
pub struct Manager {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) image_roots: Vec<PathBuf>,
    pub(super) driver: Option<Arc<dyn VmDriver>>,
    pub(super) ring_capacity: usize,
    pub(super) op_wait: Duration,
    pub(super) max_vms: usize,
    pub(super) seq_block: u64,
    pub(super) records: Mutex<Records>,
    pub(super) events: broadcast::Sender<super::Event>,
    /// The per-VM queues of VMM reports, each drained by a task of its own.
    pub(super) reports: Mutex<HashMap<String, Reports>>,
    pub(super) writer: Writer,
}

pub(super) type StopResult = Option<Result<VmState, VmError>>;

/// Per-VM coordination.
#[derive(Default)]
pub(super) struct Slot {
    /// Held for the whole of an operation.
    pub(super) op: Arc<tokio::sync::Mutex<()>>,
    /// A stop asked for while another operation (a start) holds the lock: the start stops
    /// the VM itself, with these options, as soon as it can.
    pub(super) stop_request: Mutex<Option<StopOptions>>,
    pub(super) stop_notify: Notify,
    /// The stop in progress, which later stops join.
    pub(super) stop_join: Mutex<Option<watch::Receiver<StopResult>>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Live events buffered per follower before it counts as lagging (it then catches up from
/// the histories).
const EVENT_BUFFER: usize = 1024;

impl Manager {
    /// Loads every VM from the state dir. It calls no driver: a restart touches no VM. An
    /// unreadable VM file gives a VM in state `failed` whose `last_error` says why; only an
    /// unreadable state dir is an error.
    pub fn open(cfg: ManagerConfig, driver: Option<Arc<dyn VmDriver>>) -> io::Result<Manager> {
        let store = Arc::new(Store::new(&cfg.state_dir));
        Manager::open_with_store(cfg, driver, store)
    }

    /// [`Manager::open`] with the writes going to `store` (the state dir is still read
    /// directly): tests slow it down or make it fail.
    pub fn open_with_store(
        cfg: ManagerConfig,
        driver: Option<Arc<dyn VmDriver>>,
        store: Arc<dyn StateStore>,
    ) -> io::Result<Manager> {
        let reader = Store::new(&cfg.state_dir);
        let ring = cfg.ring_capacity.max(1);
        let loaded = reader.load_all()?;
        let any_file = !loaded.is_empty();
        let mut records = Records::default();
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
                        generation: None,
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
                        generation: None,
                        event_offset: None,
                        history: VecDeque::new(),
                    };
                    (vm_id, rec, true)
                }
            };
            if rewrite && let Err(e) = reader.write_vm(&rec.to_file(&vm_id)) {
                tracing::error!(vm = %vm_id, error = %e, "cannot write the state file of a failed VM");
            }
            records.insert(vm_id, Entry { slot: Arc::default(), rec, removing: false, creating: false });
        }
        let last_seq = resume_seq(reader.read_sequence(), max_seen, any_file);
        records.last_seq = last_seq;
        records.reserved = last_seq;
        // Removal events are kept in memory only, so after a restart any cursor from before
        // it may have missed one.
        records.floor = last_seq;
        tracing::info!(vms = records.len(), last_seq, "loaded VM records");
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let writer = Writer::start(store)?;
        let m = Manager {
            inner: Arc::new(Inner {
                image_roots: cfg.image_roots,
                driver,
                ring_capacity: ring,
                op_wait: cfg.op_wait,
                max_vms: cfg.max_vms,
                seq_block: cfg.seq_block.max(2),
                records: Mutex::new(records),
                events,
                reports: Mutex::default(),
                writer,
            }),
        };
        // Reserve the first block now, so the first transition need not wait for it.
        m.reserve_ahead(&mut m.records());
        Ok(m)
    }

    pub(super) fn records(&self) -> MutexGuard<'_, Records> {
        lock(&self.inner.records)
    }

    pub(super) fn driver(&self, method: &'static str) -> Result<Arc<dyn VmDriver>, VmError> {
        self.inner.driver.clone().ok_or(VmError::NotReady { method })
    }

    pub(super) fn slot(&self, vm_id: &str) -> Result<Arc<Slot>, VmError> {
        self.records().get(vm_id).map(|e| Arc::clone(&e.slot)).ok_or_else(|| VmError::no_such_vm(vm_id))
    }

    /// Waits for the VM's operation lock (at most `op_wait`, then busy), and checks that the
    /// VM was not removed (or removed and created again) meanwhile.
    pub(super) async fn lock_op(&self, vm_id: &str, slot: &Arc<Slot>) -> Result<OwnedMutexGuard<()>, VmError> {
        let guard =
            tokio::time::timeout(self.inner.op_wait, Arc::clone(&slot.op).lock_owned()).await.map_err(|_| {
                VmError::Busy {
                    vm_id: vm_id.to_string(),
                    detail: "another operation on this VM is still in progress".into(),
                }
            })?;
        self.with_entry(vm_id, slot, |_| ())?;
        Ok(guard)
    }

    pub(super) fn with_entry<T>(
        &self,
        vm_id: &str,
        slot: &Arc<Slot>,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> Result<T, VmError> {
        let mut r = self.records();
        match r.get_mut(vm_id) {
            Some(e) if Arc::ptr_eq(&e.slot, slot) => Ok(f(e)),
            _ => Err(VmError::no_such_vm(vm_id)),
        }
    }

    /// Runs one operation in a task of its own, so that it finishes even when its caller
    /// goes away, and answers with its result.
    pub(super) async fn in_task<T, F>(&self, what: &'static str, vm_id: &str, op: F) -> Result<T, VmError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, VmError>> + Send + 'static,
    {
        tokio::spawn(op).await.map_err(|e| VmError::Task { what, vm_id: vm_id.to_string(), source: Arc::new(e) })?
    }
}

/// Where numbering resumes. The mark is trusted only when it is readable and no VM file holds
/// a number above it; otherwise numbering resumes [`SEQ_RECOVERY_GAP`] above the highest
/// number found, because numbers may have been handed out (and removed with their VM) that no
/// file shows. A state dir with no VM file at all and no mark starts at 0.
fn resume_seq(read: Result<Option<u64>, super::store::LoadError>, max_seen: u64, any_vm_file: bool) -> u64 {
    let gap = max_seen.saturating_add(SEQ_RECOVERY_GAP);
    match read {
        Ok(Some(mark)) if mark >= max_seen => mark,
        Ok(Some(mark)) => {
            tracing::error!(mark, max_seen, resume = gap, "the sequence mark is below a recorded number");
            gap
        }
        Ok(None) if !any_vm_file => 0,
        Ok(None) => {
            tracing::error!(
                resume = gap,
                "the sequence file is missing; numbering resumes far above the highest number found"
            );
            gap
        }
        Err(e) => {
            tracing::error!(error = %e, resume = gap, "sequence file unreadable; numbering resumes far above the highest number found");
            gap
        }
    }
}
