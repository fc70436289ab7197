//! The broker protocol: every message that may cross the frontend/broker boundary.
//!
//! One postcard-encoded [`Envelope`] per SOCK_SEQPACKET datagram, at most [`MAX_MESSAGE`]
//! bytes, with at most [`MAX_FDS`] fds attached by SCM_RIGHTS. The envelope declares how many
//! fds travel with it, and each body declares how many it must have: a mismatch, a truncated
//! datagram, trailing bytes, an unknown variant or an unexpected fd is malformed, and the
//! receiver drops the channel rather than guess. docs/adr/0002-broker.md describes
//! every message and the checks the broker applies.

mod wire;

use serde::{Deserialize, Serialize};

pub use wire::{WireError, decode, encode, recv, recv_keeping_fds, send};

/// Bumped on any change to the messages below.
pub const PROTOCOL_VERSION: u16 = 2;
/// The largest datagram either side sends or accepts.
pub const MAX_MESSAGE: usize = 128 * 1024;
/// The most fds one message may carry.
pub const MAX_FDS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u16,
    /// Chosen by the frontend, echoed in the reply; 0 on broker events.
    pub id: u64,
    /// How many fds travel with this datagram.
    pub fds: u8,
    pub body: T,
}

/// Everything the frontend may ask. There is deliberately no generic request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Open /dev/kvm, check its API version and the extensions cloud-hypervisor needs.
    KvmCheck,
    /// Allocate a uid, create the runtime dir and grant the VM its images.
    Prepare { vm: String, images: Vec<Image> },
    /// Create a tap for a prepared VM; the broker names it and keeps its fd for the spawn.
    CreateTap { vm: String, mac: Option<String>, mtu: Option<u32>, bridge: Option<String> },
    /// Start the VMM of a prepared VM, once. Reply: [`Reply::Spawned`] with 2 fds.
    Spawn { vm: String, config: VmmConfig },
    /// A connected stream to one of the VMM's sockets. Reply: [`Reply::Connected`] with 1 fd.
    Connect { vm: String, role: SocketRole },
    /// Fresh read-only fds of the VMM's event-monitor file and log (after a frontend restart).
    OpenOutputs { vm: String },
    /// Send a signal to the VMM the broker spawned for this VM.
    Signal { vm: String, signal: VmmSignal },
    /// Kill the VMM if alive and undo everything Prepare and CreateTap did. Idempotent.
    Release { vm: String },
    /// Every VM the broker holds, and whether its VMM is alive.
    Inventory,
    /// Free all but the newest bytes of the VMM's log (a hole punched over the rest; the
    /// file keeps its size, so offsets stay valid).
    TrimLog { vm: String },
    /// The live VMM's sandbox: the report stored at spawn, and what the kernel shows applied.
    Sandbox { vm: String },
    /// The frontend serves the RPC socket: the broker tells the service manager (READY=1),
    /// once per daemon.
    Serving,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub path: String,
    pub role: ImageRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageRole {
    Kernel,
    Initramfs,
    Firmware,
    Disk { readonly: bool },
}

impl ImageRole {
    /// A writable disk: handed to the VM's uid, and held by one VM at a time.
    pub fn writable(self) -> bool {
        matches!(self, ImageRole::Disk { readonly: false })
    }
}

/// The validated fields the broker turns into cloud-hypervisor's argv. Paths are not here:
/// they come from the broker's own record of what Prepare granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmConfig {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub cmdline: Option<String>,
    pub vsock: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SocketRole {
    Api,
    Serial,
    Vsock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmmSignal {
    Term,
    Kill,
    Cont,
}

/// What the broker sends: replies to requests, and events of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromBroker {
    Reply(Reply),
    Event(Event),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Kvm {
        api_version: i32,
        extensions: Vec<(String, bool)>,
    },
    Prepared {
        uid: u32,
        run_dir: String,
    },
    Tap {
        name: String,
    },
    /// fds: the event-monitor file and the VMM's log, both read-only. The VMM's effective
    /// sandbox is in `sandbox.txt` in its runtime dir.
    Spawned {
        pid: u32,
    },
    /// fd: a connected stream socket.
    Connected,
    /// fds: as for Spawned.
    Outputs,
    Signalled,
    Released,
    Trimmed,
    Noted,
    Inventory {
        vms: Vec<HeldVm>,
    },
    /// `planned`: the report written at spawn (bounded); `applied`: the summary of the live
    /// VMM's `/proc/<pid>/status`, one line each.
    Sandbox {
        planned: String,
        applied: Vec<String>,
    },
    /// The request was refused; nothing changed. The reason names the check that failed.
    Refused {
        reason: String,
    },
}

impl Reply {
    /// How many fds must travel with this reply.
    pub fn fd_count(&self) -> u8 {
        match self {
            Reply::Spawned { .. } | Reply::Outputs => 2,
            Reply::Connected => 1,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldVm {
    pub vm: String,
    pub uid: u32,
    pub pid: Option<u32>,
    pub alive: bool,
    /// Set once a spawned VMM has exited and been reaped.
    pub exit: Option<ExitStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A VMM the broker spawned has exited and been reaped.
    VmmExited { vm: String, pid: u32, status: ExitStatus },
    /// The daemon is stopping with `--stop-vms-on-exit`: the frontend records its VMs
    /// stopped and exits; then the broker releases every VM.
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// A VMM re-adopted after a daemon restart is not the broker's child: its exit is seen
    /// through its pidfd, and its status cannot be read.
    Unknown,
}
