//! A test-only [`StateStore`]: the real store, with writes that can be slowed (a slow fsync)
//! or made to fail, and the size of every batch of VM files counted.

use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use my_hypervisor_frontend::vm::StateStore;
use my_hypervisor_frontend::vm::store::{Store, VmFile};

pub struct TestStore {
    inner: Store,
    /// How long each write takes on top of the real one.
    pub delay: Mutex<Duration>,
    /// When set, writing the sequence file fails.
    pub fail_sequence: AtomicBool,
    pub sequence_writes: AtomicUsize,
    /// The number of VM files in each batch written.
    pub batches: Mutex<Vec<usize>>,
}

impl TestStore {
    pub fn new(dir: &Path) -> TestStore {
        TestStore {
            inner: Store::new(dir),
            delay: Mutex::new(Duration::ZERO),
            fail_sequence: AtomicBool::new(false),
            sequence_writes: AtomicUsize::new(0),
            batches: Mutex::new(Vec::new()),
        }
    }

    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    fn pause(&self) {
        let d = *self.delay.lock().unwrap();
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

impl StateStore for TestStore {
    fn write_vms(&self, files: &[&VmFile]) -> Vec<io::Result<()>> {
        self.pause();
        self.batches.lock().unwrap().push(files.len());
        self.inner.write_vms(files)
    }

    fn remove_vm(&self, vm_id: &str) -> io::Result<()> {
        self.pause();
        self.inner.remove_vm(vm_id)
    }

    fn write_sequence(&self, high_water: u64) -> io::Result<()> {
        self.sequence_writes.fetch_add(1, Ordering::SeqCst);
        if self.fail_sequence.load(Ordering::SeqCst) {
            return Err(io::Error::other("the sequence file cannot be written (test fault)"));
        }
        self.pause();
        self.inner.write_sequence(high_water)
    }
}
