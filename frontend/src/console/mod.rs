//! Serial consoles and logs. The frontend is cloud-hypervisor's only serial client: for each
//! VMM it runs it takes a serial fd from the broker (`Connect` with the serial role, again
//! after a frontend restart), writes what the guest prints to the VM's serial log
//! ([`log`]), and serves a console socket `<console-dir>/<vm-id>.sock` that several clients
//! may attach to ([`hub`]). Replay comes from the log file, so nothing is buffered for a VM
//! without clients.

pub mod hub;
pub mod log;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use my_hypervisor_broker_proto::ExitStatus;
use tokio::sync::watch;

use crate::broker::BrokerClient;

/// The largest `--console-replay-bytes`.
pub const MAX_REPLAY_BYTES: u64 = 1 << 20;

/// The console and log settings, as frontend flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleLimits {
    /// Bytes of serial output kept per log file; the log rotates once (to `<vm-id>.log.1`)
    /// when full, so up to twice this is kept per VM.
    #[arg(long = "console-log-bytes", default_value_t = 8 << 20,
          value_parser = clap::value_parser!(u64).range(log::MIN_LOG_BYTES..=1 << 30))]
    pub log_bytes: u64,
    /// Bytes of recent output replayed to a console client when it attaches (each attached
    /// client holds up to this much while it is sent).
    #[arg(long = "console-replay-bytes", default_value_t = 64 << 10,
          value_parser = clap::value_parser!(u64).range(0..=MAX_REPLAY_BYTES))]
    pub replay_bytes: u64,
}

impl Default for ConsoleLimits {
    fn default() -> Self {
        ConsoleLimits { log_bytes: 8 << 20, replay_bytes: 64 << 10 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("VM {0:?} has no running VMM")]
    NotRunning(String),
    #[error("read the {what} of VM {vm_id:?}")]
    Read {
        what: &'static str,
        vm_id: String,
        #[source]
        source: std::io::Error,
    },
}

/// What is held for one VMM: its hub's stop switch and a read fd of its own output file.
struct Attached {
    id: u64,
    stop: watch::Sender<bool>,
    vmm_log: Arc<File>,
}

/// Every VM's console; one per frontend.
pub struct Consoles {
    pub console_dir: PathBuf,
    pub log_dir: PathBuf,
    pub limits: ConsoleLimits,
    broker: BrokerClient,
    vms: Mutex<HashMap<String, Attached>>,
    next_id: AtomicU64,
}

static CONSOLES: OnceLock<Arc<Consoles>> = OnceLock::new();

/// The frontend's consoles, once [`install`]ed (a frontend without a broker has none).
pub fn installed() -> Option<Arc<Consoles>> {
    CONSOLES.get().cloned()
}

/// Makes the log dir and installs the consoles of this process.
pub fn install(
    console_dir: &Path,
    log_dir: &Path,
    limits: ConsoleLimits,
    broker: BrokerClient,
) -> std::io::Result<Arc<Consoles>> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(log_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    // Sockets an earlier frontend left: those of VMMs still running are bound again when
    // they are taken up; the others must not linger.
    for entry in std::fs::read_dir(console_dir)?.flatten() {
        if entry.file_name().to_string_lossy().ends_with(".sock") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let c = Arc::new(Consoles {
        console_dir: console_dir.to_path_buf(),
        log_dir: log_dir.to_path_buf(),
        limits,
        broker,
        vms: Mutex::default(),
        next_id: AtomicU64::new(1),
    });
    let _ = CONSOLES.set(Arc::clone(&c));
    Ok(c)
}

impl Consoles {
    /// The console socket of a VM.
    pub fn socket_path(&self, vm_id: &str) -> PathBuf {
        self.console_dir.join(format!("{vm_id}.sock"))
    }

    /// A VMM was spawned or taken up again: serve its console until it exits (or until
    /// [`Consoles::detach`]). `vmm_log` is a read fd of its output file.
    pub fn attach(self: &Arc<Self>, vm_id: &str, exit: watch::Receiver<Option<ExitStatus>>, vmm_log: Arc<File>) {
        let (stop, stopped) = watch::channel(false);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let attached = Attached { id, stop, vmm_log };
        if let Some(old) = self.vms.lock().expect("consoles").insert(vm_id.into(), attached) {
            let _ = old.stop.send(true);
        }
        tokio::spawn(hub::run(Arc::clone(self), vm_id.to_string(), id, exit, stopped));
    }

    /// The VM's resources are released: its console goes.
    pub fn detach(&self, vm_id: &str) {
        if let Some(old) = self.vms.lock().expect("consoles").remove(vm_id) {
            let _ = old.stop.send(true);
        }
    }

    /// The VM is removed: its serial log goes too.
    pub fn forget(&self, vm_id: &str) {
        self.detach(vm_id);
        log::remove(&self.log_dir, vm_id);
    }

    /// The console socket of a VM whose VMM is served.
    pub fn endpoint(&self, vm_id: &str) -> Result<PathBuf, ConsoleError> {
        if self.vms.lock().expect("consoles").contains_key(vm_id) {
            Ok(self.socket_path(vm_id))
        } else {
            Err(ConsoleError::NotRunning(vm_id.into()))
        }
    }

    /// The last `max` bytes of the VM's serial log, and whether older output was left out.
    pub fn console_tail(&self, vm_id: &str, max: u64) -> Result<(Vec<u8>, bool), ConsoleError> {
        log::tail(&self.log_dir, vm_id, max).map_err(|source| ConsoleError::Read {
            what: "serial log",
            vm_id: vm_id.into(),
            source,
        })
    }

    /// The last `max` bytes of the VMM's own output, while it runs.
    pub fn vmm_tail(&self, vm_id: &str, max: u64) -> Result<(Vec<u8>, bool), ConsoleError> {
        let file = match self.vms.lock().expect("consoles").get(vm_id) {
            Some(a) => Arc::clone(&a.vmm_log),
            None => return Err(ConsoleError::NotRunning(vm_id.into())),
        };
        log::file_tail(&file, max).map_err(|source| ConsoleError::Read { what: "VMM log", vm_id: vm_id.into(), source })
    }

    /// Whether a newer hub than `id` serves the VM.
    fn superseded(&self, vm_id: &str, id: u64) -> bool {
        self.vms.lock().expect("consoles").get(vm_id).is_some_and(|a| a.id != id)
    }

    /// The hub `id` ended on its own (its VMM exited): the VM has no console any more.
    fn ended(&self, vm_id: &str, id: u64) {
        let mut vms = self.vms.lock().expect("consoles");
        if vms.get(vm_id).is_some_and(|a| a.id == id) {
            vms.remove(vm_id);
        }
    }
}
