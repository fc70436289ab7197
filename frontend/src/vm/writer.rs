//! The state writer: one thread of its own that persists VM files and the sequence mark, so
//! that no runtime worker ever waits on a disk.
//!
//! Transitions are applied in memory first and queued here; queries never wait for this
//! thread. The queue keeps only the newest file of each VM, so transitions that pile up while
//! a write is under way become one write, and a batch of several VMs' files ends with one
//! fsync of the directory. The sequence mark is written before the VM files of its batch. A
//! write that fails is retried (with a growing pause) until it succeeds or a newer one
//! replaces it; deleting a VM's file waits until the sequence mark is on disk, so a removed
//! VM's numbers are always covered by the mark.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::store::{Store, VmFile};

/// First pause after a failed write; it doubles up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Where the writer puts things. [`Store`] is the real one; tests wrap it to slow it down or
/// make it fail.
pub trait StateStore: Send + Sync + 'static {
    /// Writes these VM files (each atomically); one result per file, in order.
    fn write_vms(&self, files: &[&VmFile]) -> Vec<io::Result<()>>;
    fn remove_vm(&self, vm_id: &str) -> io::Result<()>;
    fn write_sequence(&self, high_water: u64) -> io::Result<()>;
}

impl StateStore for Store {
    fn write_vms(&self, files: &[&VmFile]) -> Vec<io::Result<()>> {
        Store::write_vms(self, files)
    }

    fn remove_vm(&self, vm_id: &str) -> io::Result<()> {
        Store::remove_vm(self, vm_id)
    }

    fn write_sequence(&self, high_water: u64) -> io::Result<()> {
        Store::write_sequence(self, high_water)
    }
}

/// What is to be done with one VM's file.
enum Op {
    Write(Box<VmFile>),
    Remove,
}

type Reply = oneshot::Sender<Result<(), String>>;

struct Job {
    op: Op,
    /// Who waits for the first attempt's result. A job with a waiter is not retried: the
    /// waiter decides (create undoes itself).
    waiters: Vec<Reply>,
}

#[derive(Default)]
struct Queue {
    /// The newest sequence mark not yet on disk.
    sequence: Option<u64>,
    vms: BTreeMap<String, Job>,
    /// The number of the last thing queued.
    ticket: u64,
    /// The last sequence write failed and none has worked since.
    sequence_behind: bool,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The highest ticket whose write has been attempted (with whatever result).
    attempted: watch::Sender<u64>,
}

/// Handle to the writer thread; dropping it writes what is queued and ends the thread.
pub struct Writer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Writer {
    pub fn start(store: Arc<dyn StateStore>) -> io::Result<Writer> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            attempted: watch::channel(0).0,
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("state-writer".into()).spawn(move || run(&s, &*store))?;
        Ok(Writer { shared, thread: Some(thread) })
    }

    fn push(&self, f: impl FnOnce(&mut Queue)) -> u64 {
        let mut q = lock(&self.shared.queue);
        f(&mut q);
        q.ticket += 1;
        let t = q.ticket;
        drop(q);
        self.shared.wake.notify_one();
        t
    }

    /// Queues the VM's newest file; returns its ticket for [`Writer::attempted`].
    pub fn write_vm(&self, file: VmFile) -> u64 {
        self.push(|q| replace(q, file.vm_id.clone(), Op::Write(Box::new(file)), None))
    }

    /// Queues a VM's file and a channel that gets the first attempt's result.
    pub fn write_vm_checked(&self, file: VmFile) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        self.push(|q| replace(q, file.vm_id.clone(), Op::Write(Box::new(file)), Some(tx)));
        rx
    }

    pub fn remove_vm(&self, vm_id: &str) -> u64 {
        self.push(|q| replace(q, vm_id.to_string(), Op::Remove, None))
    }

    pub fn write_sequence(&self, high_water: u64) -> u64 {
        self.push(|q| q.sequence = Some(q.sequence.map_or(high_water, |s| s.max(high_water))))
    }

    /// Waits (without blocking a thread) until the writer has tried to write everything
    /// queued up to `ticket`. It does not say whether that worked: a failed write is retried
    /// in the background.
    pub async fn attempted(&self, ticket: u64) {
        let mut rx = self.shared.attempted.subscribe();
        let _ = rx.wait_for(|&t| t >= ticket).await;
    }

    /// Whether the last write of the sequence mark failed (none has worked since).
    pub fn sequence_behind(&self) -> bool {
        lock(&self.shared.queue).sequence_behind
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        lock(&self.shared.queue).closing = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Puts `op` in place of whatever was queued for the VM; the waiters of a replaced job now
/// wait for the new one.
fn replace(q: &mut Queue, vm_id: String, op: Op, waiter: Option<Reply>) {
    let mut waiters = q.vms.remove(&vm_id).map(|j| j.waiters).unwrap_or_default();
    waiters.extend(waiter);
    q.vms.insert(vm_id, Job { op, waiters });
}

fn run(shared: &Shared, store: &dyn StateStore) {
    let mut pause = FIRST_RETRY_PAUSE;
    loop {
        let (sequence, jobs, ticket, closing) = {
            let mut q = lock(&shared.queue);
            while q.sequence.is_none() && q.vms.is_empty() && !q.closing {
                q = shared.wake.wait(q).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            (q.sequence.take(), std::mem::take(&mut q.vms), q.ticket, q.closing)
        };
        if closing && sequence.is_none() && jobs.is_empty() {
            return;
        }
        let failed = write_batch(shared, store, sequence, jobs);
        shared.attempted.send_replace(ticket);
        if failed {
            if closing {
                tracing::error!("the state writer stops with writes that failed");
                return;
            }
            // Retry after a pause, or as soon as something new is queued (it goes in the
            // same batch as the retry) or the writer is closing.
            let q = lock(&shared.queue);
            let _ = shared.wake.wait_timeout_while(q, pause, |q| q.ticket == ticket && !q.closing);
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        } else {
            pause = FIRST_RETRY_PAUSE;
        }
    }
}

/// Writes one batch; what failed goes back on the queue (unless something newer replaced it).
/// Returns whether anything failed.
fn write_batch(shared: &Shared, store: &dyn StateStore, sequence: Option<u64>, jobs: BTreeMap<String, Job>) -> bool {
    let mut failed = false;
    let mut behind = lock(&shared.queue).sequence_behind;
    if let Some(high) = sequence {
        match store.write_sequence(high) {
            Ok(()) => behind = false,
            Err(e) => {
                tracing::error!(error = %e, high, "cannot write the sequence file; retrying");
                failed = true;
                behind = true;
                let mut q = lock(&shared.queue);
                q.sequence = Some(q.sequence.map_or(high, |s| s.max(high)));
            }
        }
        lock(&shared.queue).sequence_behind = behind;
    }
    let mut writes: Vec<(String, Job)> = Vec::new();
    let mut later: Vec<(String, Job, String)> = Vec::new();
    for (vm_id, job) in jobs {
        match job.op {
            Op::Write(_) => writes.push((vm_id, job)),
            // Removing a file takes its numbers off the disk: only once the mark covers them.
            Op::Remove if behind => later.push((vm_id, job, "the sequence file is behind".into())),
            Op::Remove => match store.remove_vm(&vm_id) {
                Ok(()) => reply(job.waiters, Ok(())),
                Err(e) => later.push((vm_id, job, format!("removing state.json: {e}"))),
            },
        }
    }
    let files: Vec<&VmFile> = writes
        .iter()
        .filter_map(|(_, j)| match &j.op {
            Op::Write(f) => Some(&**f),
            Op::Remove => None,
        })
        .collect();
    let results = if files.is_empty() { Vec::new() } else { store.write_vms(&files) };
    for ((vm_id, job), r) in writes.into_iter().zip(results) {
        match r {
            Ok(()) => reply(job.waiters, Ok(())),
            Err(e) => later.push((vm_id, job, format!("writing state.json: {e}"))),
        }
    }
    if later.is_empty() {
        return failed;
    }
    let mut q = lock(&shared.queue);
    for (vm_id, job, why) in later {
        if !job.waiters.is_empty() {
            // The waiter decides what happens; a newer job for the VM stays as it is.
            reply(job.waiters, Err(why));
            continue;
        }
        tracing::error!(vm = %vm_id, %why, "state write failed; retrying");
        failed = true;
        q.vms.entry(vm_id).or_insert(job);
    }
    failed
}

fn reply(waiters: Vec<Reply>, r: Result<(), String>) {
    for w in waiters {
        let _ = w.send(r.clone());
    }
}
