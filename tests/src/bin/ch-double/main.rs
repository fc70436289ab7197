//! A test double of cloud-hypervisor v53 for the project's tests: it runs where CH runs (the
//! VMM sandbox, exec'd by the launcher with CH's argv), creates and boots the VM at start,
//! and speaks CH's interfaces the way CH does:
//!
//! - the command line: the flags the project passes and CH's option-string syntax; an
//!   unknown flag is a usage error (exit 2, as clap), a bad option string a configuration
//!   error (exit 1);
//! - the REST API on `--api-socket fd=N|path=P` with micro_http's framing (see `http.rs`):
//!   `vmm.ping`, `vm.info`, `vm.boot`, `vm.shutdown` (the VM goes back to `Created`),
//!   `vm.reboot`, `vm.power-button`, `vm.pause`, `vm.resume`, `vm.delete`, `vmm.shutdown`,
//!   with CH's status codes and error bodies; requests wait while the VMM is busy booting;
//! - the event monitor (`--event-monitor fd=N|path=P`): pretty-printed JSON objects
//!   separated by blank lines, timestamps from the VMM's start (see `events.rs`);
//! - the serial socket (`--serial socket=P`): listening, one client at a time, output
//!   buffered (1 MiB) while nobody is connected and replayed on connect;
//! - hybrid vsock (`--vsock cid=N,socket=P`): `CONNECT <port>\n` is answered
//!   `OK <host-side port>\n` and forwarded to the Unix socket `guest-vsock-<port>.sock` in
//!   the vsock socket's directory, which plays the guest's listener; with no such listener
//!   the stream is closed without an answer, as when the guest resets the connection;
//! - sockets are created with umask 077; SIGTERM and SIGINT shut the VMM down cleanly
//!   (exit 0); a guest power-off ends the VMM (exit 0) unless `--no-shutdown` is given.
//!
//! The guest is read from the kernel file. The project's PVH test guest (an ELF with the Xen
//! PVH note) prints its line on the serial console at each boot and, in its shutdown
//! variant, powers off through the ACPI port 0x600; like real CH running it, the double
//! ignores the power button for it (the guest has no ACPI). Any other kernel is taken for
//! an idle guest with ACPI support, which powers off on the power button.
//!
//! Faults are asked for on the kernel command line with words `ch_double.fault=NAME` or
//! `ch_double.fault=NAME=MS` (several words, or several comma-separated faults in one word);
//! MS counts from `vm/booted`. An unknown fault name is an error (exit 1).
//!
//! | fault | effect |
//! |---|---|
//! | `exit-at-boot` | boot fails after `vm/booting`: CH's failed-boot events, exit 1 |
//! | `hang` | nothing happens: no events, the API never answers, SIGTERM is ignored |
//! | `hang=MS` | the VMM stops answering the API and signals MS after boot |
//! | `slow-boot=MS` | boot takes MS more; API requests wait until it is done |
//! | `slow-create=MS` | for MS before booting, the API answers and vm.info says `Created` (real CH has this window between its vm.create and vm.boot) |
//! | `crash=MS` | the VMM kills itself with SIGKILL MS after boot |
//! | `crash-exit=MS` | the VMM fails with exit status 1 MS after boot |
//! | `ignore-power-button` | the guest ignores the power button |
//! | `honour-power-button` | the guest powers off on the power button |
//! | `guest-shutdown=MS` | the guest powers off MS after boot |
//! | `guest-reboot=MS` | the guest reboots MS after boot (once per boot) |
//! | `panic=MS` | the guest panics MS after boot: `guest/panic` with `--pvpanic`; it keeps running |
//! | `quiet-exit` | events not yet written when the VMM exits are lost |
//! | `flood-log=MS` | the VMM writes to its log without end, MS after boot |

mod cli;
mod devices;
mod events;
mod http;

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cli::{Config, Endpoint, Serial};
use devices::{Guest, SerialOut, SerialSocket, VsockMuxer};
use serde_json::{Value, json};

/// A request the HTTP thread hands to the VMM loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiReq {
    Ping,
    Info,
    Counters,
    Create,
    Boot,
    Shutdown,
    Reboot,
    PowerButton,
    Pause,
    Resume,
    Delete,
    VmmShutdown,
}

/// The VMM loop's answer; `written` is told once the response is on the wire.
pub struct ApiResp {
    pub status: u16,
    pub body: Option<String>,
    pub written: Option<Sender<()>>,
}

/// What the VMM loop waits for.
pub enum Msg {
    Api(ApiReq, Sender<ApiResp>),
    /// SIGTERM or SIGINT.
    Exit,
    /// Guest events, for the VM of the given boot generation.
    Guest(u64, GuestEvent),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEvent {
    PowerOff,
    Reboot,
    Panic,
    Crash,
    CrashExit,
    Hang,
}

#[derive(Debug, Default, Clone)]
struct Faults {
    exit_at_boot: bool,
    hang: bool,
    hang_after: Option<u64>,
    slow_boot: Option<u64>,
    slow_create: Option<u64>,
    crash: Option<u64>,
    crash_exit: Option<u64>,
    power_button: Option<bool>,
    guest_shutdown: Option<u64>,
    guest_reboot: Option<u64>,
    panic: Option<u64>,
    quiet_exit: bool,
    flood_log: Option<u64>,
}

impl Faults {
    fn parse(cmdline: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        for word in cmdline.split_whitespace() {
            let Some(list) = word.strip_prefix("ch_double.fault=") else { continue };
            for item in list.split(',') {
                let (name, arg) = match item.split_once('=') {
                    Some((n, a)) => (n, Some(a)),
                    None => (item, None),
                };
                let ms = || -> Result<u64, String> {
                    arg.ok_or_else(|| format!("fault {name} needs =MS"))?
                        .parse()
                        .map_err(|_| format!("fault {name}: {arg:?} is not a number of milliseconds"))
                };
                match name {
                    "exit-at-boot" => f.exit_at_boot = true,
                    "hang" if arg.is_none() => f.hang = true,
                    "hang" => f.hang_after = Some(ms()?),
                    "slow-boot" => f.slow_boot = Some(ms()?),
                    "slow-create" => f.slow_create = Some(ms()?),
                    "crash" => f.crash = Some(ms()?),
                    "crash-exit" => f.crash_exit = Some(ms()?),
                    "ignore-power-button" => f.power_button = Some(false),
                    "honour-power-button" => f.power_button = Some(true),
                    "guest-shutdown" => f.guest_shutdown = Some(ms()?),
                    "guest-reboot" => f.guest_reboot = Some(ms()?),
                    "panic" => f.panic = Some(ms()?),
                    "quiet-exit" => f.quiet_exit = true,
                    "flood-log" => f.flood_log = Some(ms()?),
                    _ => return Err(format!("unknown ch_double fault {item:?}")),
                }
            }
        }
        Ok(f)
    }
}

/// The VM object: it exists from boot until shutdown.
struct Vm {
    paused: bool,
    _serial: Option<SerialSocket>,
    _vsock: Option<VsockMuxer>,
    _disks: Vec<File>,
}

struct Vmm {
    cfg: Config,
    faults: Faults,
    tx: Sender<Msg>,
    /// The VM's config exists (until vm.delete).
    created: bool,
    vm: Option<Vm>,
    guest: Guest,
    generation: u64,
    serial_out: Arc<Mutex<SerialOut>>,
    /// The device ids CH gives: `_disk0`, `_net1`, … numbered in creation order.
    ids: Vec<String>,
}

fn chain(top: &[&str], rest: Vec<String>) -> Vec<String> {
    top.iter().map(|s| s.to_string()).chain(rest).collect()
}

impl Vmm {
    /// vm.create: CH makes the console devices here. The serial socket is made at boot in
    /// the double, just before `vm/booting`, which no test can tell apart.
    fn boot(&mut self) -> Result<(), (bool, Vec<String>)> {
        events::event("vm", "booting", &[]);
        let serial = match &self.cfg.serial {
            Serial::Socket(p) => Some(
                SerialSocket::create(Path::new(p), self.serial_out.clone())
                    .map_err(|e| (false, vec!["Error creating console devices".into(), e.to_string()]))?,
            ),
            _ => None,
        };
        let mut disks = Vec::new();
        for d in &self.cfg.disks {
            disks.push(devices::open_disk(&d.path, d.readonly).map_err(|e| (false, e))?);
        }
        for n in &self.cfg.nets {
            for &fd in &n.fds {
                devices::check_tap(fd).map_err(|e| (false, e))?;
            }
        }
        let vsock = match &self.cfg.vsock {
            Some(v) => Some(VsockMuxer::create(Path::new(&v.socket)).map_err(|e| {
                (
                    false,
                    vec!["Error from device manager".into(), "Cannot create virtio-vsock device".into(), e.to_string()],
                )
            })?),
            None => None,
        };
        // From here on the VM object exists: a failure is followed by `vm/shutdown`.
        if let Some(ms) = self.faults.slow_boot {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if self.faults.exit_at_boot {
            return Err((true, vec!["ch_double fault: exit-at-boot".into()]));
        }
        let payload = self.cfg.kernel.as_ref().or(self.cfg.firmware.as_ref()).cloned().unwrap_or_default();
        let kernel =
            std::fs::read(&payload).map_err(|e| (true, vec!["Cannot open kernel file".into(), e.to_string()]))?;
        if let Some(i) = &self.cfg.initramfs {
            File::open(i).map_err(|e| (true, vec!["Cannot open initramfs file".into(), e.to_string()]))?;
        }
        self.guest = devices::inspect(&kernel);
        self.ids = self.device_ids();
        self.vm = Some(Vm { paused: false, _serial: serial, _vsock: vsock, _disks: disks });
        self.start_guest();
        events::event("vm", "booted", &[]);
        Ok(())
    }

    fn device_ids(&self) -> Vec<String> {
        let mut n = 0;
        let mut next = |prefix: &str| {
            let id = format!("_{prefix}{n}");
            n += 1;
            id
        };
        let mut ids: Vec<String> = self.cfg.disks.iter().map(|_| next("disk")).collect();
        ids.extend(self.cfg.nets.iter().map(|_| next("net")));
        ids.extend(self.cfg.vsock.iter().map(|_| next("vsock")));
        ids
    }

    /// Runs the guest of this boot: its serial line, its power-off, and the timed faults.
    fn start_guest(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        if let Guest::Pvh { line, shutdown } = &self.guest {
            devices_write(&self.serial_out, line);
            if *shutdown {
                let _ = self.tx.send(Msg::Guest(generation, GuestEvent::PowerOff));
            }
        }
        let f = &self.faults;
        let timed = [
            (f.guest_shutdown, GuestEvent::PowerOff),
            (f.guest_reboot, GuestEvent::Reboot),
            (f.panic, GuestEvent::Panic),
            (f.crash, GuestEvent::Crash),
            (f.crash_exit, GuestEvent::CrashExit),
            (f.hang_after, GuestEvent::Hang),
        ];
        if let Some(ms) = f.flood_log {
            // A VMM gone wrong: it writes to its log without end.
            let _ = std::thread::Builder::new().name("ch-double-flood".into()).spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                let chunk = vec![b'x'; 1 << 20];
                while std::io::Write::write_all(&mut std::io::stderr(), &chunk).is_ok() {}
            });
        }
        for (ms, ev) in timed {
            if let Some(ms) = ms {
                let tx = self.tx.clone();
                let _ = std::thread::Builder::new().name("ch-double-fault".into()).spawn(move || {
                    std::thread::sleep(Duration::from_millis(ms));
                    let _ = tx.send(Msg::Guest(generation, ev));
                });
            }
        }
    }

    fn honours_power_button(&self) -> bool {
        self.faults.power_button.unwrap_or(self.guest == Guest::Other)
    }

    /// vm.shutdown: the VM object goes, its config stays (state `Created`).
    fn vm_shutdown(&mut self) -> bool {
        if self.vm.take().is_none() {
            return false;
        }
        self.generation += 1;
        events::event("vm", "shutdown", &[]);
        true
    }

    fn vm_delete(&mut self) {
        if !self.created {
            return;
        }
        self.vm_shutdown();
        self.created = false;
        events::event("vm", "deleted", &[]);
    }

    fn vm_reboot(&mut self) -> ApiResp {
        events::event("vm", "rebooting", &[]);
        if self.vm.is_none() {
            return error(404, &["Error from API", "The VM could not reboot", "VM is not created"]);
        }
        // Devices are made anew; the guest runs again from its entry point.
        self.vm = None;
        if let Err((_, e)) = self.reboot_devices() {
            let mut c = vec!["Error from API".to_string(), "The VM could not reboot".into()];
            c.extend(e);
            return ApiResp { status: 500, body: serde_json::to_string(&c).ok(), written: None };
        }
        events::event("vm", "rebooted", &[]);
        no_content()
    }

    fn reboot_devices(&mut self) -> Result<(), (bool, Vec<String>)> {
        let serial = match &self.cfg.serial {
            Serial::Socket(p) => Some(
                SerialSocket::create(Path::new(p), self.serial_out.clone())
                    .map_err(|e| (false, vec![e.to_string()]))?,
            ),
            _ => None,
        };
        let mut disks = Vec::new();
        for d in &self.cfg.disks {
            disks.push(devices::open_disk(&d.path, d.readonly).map_err(|e| (false, e))?);
        }
        let vsock = match &self.cfg.vsock {
            Some(v) => Some(VsockMuxer::create(Path::new(&v.socket)).map_err(|e| (false, vec![e.to_string()]))?),
            None => None,
        };
        self.vm = Some(Vm { paused: false, _serial: serial, _vsock: vsock, _disks: disks });
        self.start_guest();
        Ok(())
    }

    fn info(&self) -> Value {
        let c = &self.cfg;
        let mut payload = serde_json::Map::new();
        for (k, v) in
            [("firmware", &c.firmware), ("kernel", &c.kernel), ("cmdline", &c.cmdline), ("initramfs", &c.initramfs)]
        {
            if let Some(v) = v {
                payload.insert(k.into(), json!(v));
            }
        }
        let id = |i: usize| self.ids.get(i).cloned();
        let disks: Vec<Value> = c
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                json!({"id": id(i), "pci_segment": 0, "path": d.path, "readonly": d.readonly, "direct": false,
                "num_queues": 1, "queue_size": 128, "vhost_user": false, "disable_io_uring": false,
                "disable_aio": false, "backing_files": false, "sparse": true,
                "image_type": d.image_type.clone().map_or("Raw".into(), |t| capitalise(&t)),
                "lock_granularity": "ByteRange"})
            })
            .collect();
        let nets: Vec<Value> = c
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                json!({"id": id(c.disks.len() + i), "pci_segment": 0,
                "mac": n.mac.clone().unwrap_or_else(|| default_mac(i)), "num_queues": n.num_queues,
                "queue_size": 256, "vhost_user": false, "vhost_mode": "Client", "fds": n.fds,
                "offload_tso": true, "offload_ufo": true, "offload_csum": true})
            })
            .collect();
        let mode = |s: &Serial| match s {
            Serial::Off => json!({"mode": "Off"}),
            Serial::Null => json!({"mode": "Null"}),
            Serial::Tty => json!({"mode": "Tty"}),
            Serial::Pty => json!({"mode": "Pty"}),
            Serial::File(p) => json!({"mode": "File", "file": p}),
            Serial::Socket(p) => json!({"mode": "Socket", "socket": p}),
        };
        let mut console = match cli_console(&c.console) {
            Some(s) => mode(&s),
            None => json!({"mode": "Tty"}),
        };
        console["pci_segment"] = json!(0);
        let mut config = json!({
            "cpus": {"boot_vcpus": c.boot_vcpus, "max_vcpus": c.max_vcpus, "kvm_hyperv": false,
                "max_phys_bits": 46, "features": {"amx": false}, "nested": true,
                "core_scheduling": "Vm", "profile": "Host"},
            "memory": {"size": c.memory, "mergeable": false, "hotplug_method": "Acpi", "shared": false,
                "hugepages": false, "prefault": false, "reserve": false, "thp": true},
            "payload": payload,
            "rng": {"pci_segment": 0, "src": "/dev/urandom"},
            "serial": mode(&c.serial),
            "console": console,
            "debug_console": {"mode": "Off", "iobase": 233},
            "pvpanic": c.pvpanic,
            "iommu": false,
            "watchdog": false,
            "landlock_enable": c.landlock,
        });
        if !disks.is_empty() {
            config["disks"] = json!(disks);
        }
        if !nets.is_empty() {
            config["net"] = json!(nets);
        }
        if let Some(v) = &c.vsock {
            config["vsock"] = json!({"id": id(c.disks.len() + c.nets.len()), "pci_segment": 0,
                "cid": v.cid, "socket": v.socket});
        }
        let (state, tree) = match &self.vm {
            None => ("Created", Value::Null),
            Some(vm) => (if vm.paused { "Paused" } else { "Running" }, self.device_tree()),
        };
        json!({"config": config, "state": state, "memory_actual_size": c.memory, "device_tree": tree})
    }

    fn device_tree(&self) -> Value {
        let mut tree = serde_json::Map::new();
        let leaf = |id: &str, parent: Option<String>| {
            let mut v = json!({"id": id, "resources": [], "children": []});
            if let Some(p) = parent {
                v["parent"] = json!(p);
            }
            v
        };
        tree.insert("__serial".into(), leaf("__serial", None));
        tree.insert("__ioapic".into(), leaf("__ioapic", None));
        let mut slot = 1;
        let mut bar: u64 = 0xe800_0000;
        let mut pci = |tree: &mut serde_json::Map<String, Value>, id: &str| {
            let dev = format!("_virtio-pci-{id}");
            tree.insert(id.into(), leaf(id, Some(dev.clone())));
            tree.insert(
                dev.clone(),
                json!({"id": dev, "resources": [{"PciBar": {"index": 0, "base": bar, "size": 524288,
                    "type_": "Mmio32", "prefetchable": false}}], "children": [id],
                    "pci_bdf": format!("0000:00:{slot:02x}.0")}),
            );
            slot += 1;
            bar += 0x8_0000;
        };
        let n = self.cfg.disks.len() + self.cfg.nets.len();
        for id in &self.ids[..n.min(self.ids.len())] {
            pci(&mut tree, id);
        }
        pci(&mut tree, "__rng");
        for id in self.ids.iter().skip(n) {
            pci(&mut tree, id);
        }
        if self.cfg.pvpanic {
            tree.insert(
                "__pvpanic".into(),
                json!({"id": "__pvpanic", "resources": [{"PciBar": {"index": 0, "base": 0xe7ff_fff0u64,
                    "size": 2, "type_": "Mmio32", "prefetchable": false}}], "children": [],
                    "pci_bdf": format!("0000:00:{slot:02x}.0")}),
            );
        }
        Value::Object(tree)
    }

    /// One API request; None means the VMM exits after answering.
    fn api(&mut self, req: ApiReq) -> (ApiResp, bool) {
        let not_running = |what: &str| error(500, &["Error from API", what, "VM is not running"]);
        let r = match req {
            ApiReq::Ping => ApiResp {
                status: 200,
                body: Some(
                    json!({"build_version": "v53.0", "version": "53.0.0", "pid": std::process::id(),
                        "features": ["io_uring", "kvm"]})
                    .to_string(),
                ),
                written: None,
            },
            ApiReq::Info if !self.created => {
                error(404, &["Error from API", "The VM info is not available", "VM is not created"])
            }
            ApiReq::Info => ApiResp { status: 200, body: Some(self.info().to_string()), written: None },
            ApiReq::Counters => ApiResp { status: 200, body: Some("{}".into()), written: None },
            ApiReq::Create if self.created => {
                error(500, &["Error from API", "The VM could not be created", "VM is already created"])
            }
            ApiReq::Create => error(
                500,
                &["Error from API", "The VM could not be created", "Not supported by the cloud-hypervisor test double"],
            ),
            ApiReq::Boot if self.vm.is_some() => {
                error(500, &["Error from API", "The VM could not boot", "VM is already created"])
            }
            ApiReq::Boot if !self.created => {
                events::event("vm", "booting", &[]);
                error(404, &["Error from API", "The VM could not boot", "VM config is missing"])
            }
            ApiReq::Boot => match self.boot() {
                Ok(()) => no_content(),
                Err((vm_exists, e)) => {
                    if vm_exists {
                        self.vm = None;
                    }
                    let c = chain(&["Error from API", "The VM could not boot"], e);
                    ApiResp { status: 500, body: serde_json::to_string(&c).ok(), written: None }
                }
            },
            ApiReq::Shutdown => {
                if self.vm_shutdown() {
                    no_content()
                } else {
                    not_running("The VM could not shutdown")
                }
            }
            ApiReq::Reboot => self.vm_reboot(),
            ApiReq::PowerButton => match &self.vm {
                None => not_running("Error triggering power button"),
                Some(_) => {
                    if self.honours_power_button() {
                        let (tx, generation) = (self.tx.clone(), self.generation);
                        let _ = std::thread::Builder::new().name("acpi".into()).spawn(move || {
                            // The guest's ACPI daemon takes a moment to power off.
                            std::thread::sleep(Duration::from_millis(100));
                            let _ = tx.send(Msg::Guest(generation, GuestEvent::PowerOff));
                        });
                    }
                    no_content()
                }
            },
            ApiReq::Pause => match &mut self.vm {
                None => not_running("The VM could not be paused"),
                Some(vm) if vm.paused => error(
                    500,
                    &["Error from API", "The VM could not be paused", "Invalid VM state transition: Paused to Paused"],
                ),
                Some(vm) => {
                    events::event("vm", "pausing", &[]);
                    vm.paused = true;
                    events::event("vm", "paused", &[]);
                    no_content()
                }
            },
            ApiReq::Resume => match &mut self.vm {
                None => not_running("The VM could not resume"),
                Some(vm) if !vm.paused => {
                    error(500, &["Error from API", "The VM could not resume", "VM is not paused"])
                }
                Some(vm) => {
                    events::event("vm", "resuming", &[]);
                    vm.paused = false;
                    events::event("vm", "resumed", &[]);
                    no_content()
                }
            },
            ApiReq::Delete => {
                self.vm_delete();
                no_content()
            }
            ApiReq::VmmShutdown => {
                self.vm_delete();
                events::event("vmm", "shutdown", &[]);
                return (ApiResp { status: 200, body: None, written: None }, true);
            }
        };
        (r, false)
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c.flat_map(|x| x.to_lowercase())).collect()).unwrap_or_default()
}

fn default_mac(i: usize) -> String {
    let pid = std::process::id();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", (pid >> 16) as u8, (pid >> 8) as u8, pid as u8, i as u8)
}

fn cli_console(s: &str) -> Option<Serial> {
    Some(match s {
        "off" => Serial::Off,
        "null" => Serial::Null,
        "pty" => Serial::Pty,
        "tty" => Serial::Tty,
        _ => return None,
    })
}

fn devices_write(out: &Arc<Mutex<SerialOut>>, bytes: &[u8]) {
    out.lock().unwrap_or_else(|e| e.into_inner()).write(bytes);
}

fn error(status: u16, chain: &[&str]) -> ApiResp {
    ApiResp { status, body: serde_json::to_string(chain).ok(), written: None }
}

fn no_content() -> ApiResp {
    ApiResp { status: 204, body: None, written: None }
}

/// The write end of the signal pipe, for the handler.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let b = 1u8;
    // SAFETY: write(2) is async-signal-safe; the buffer is a valid byte.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// SIGTERM and SIGINT become `Msg::Exit` through a self-pipe, as CH's signal thread turns
/// them into its exit event. Returns the reading end.
fn install_signal_handlers() -> std::io::Result<File> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a valid handler, installed for a catchable signal.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: SIG_IGN for SIGCHLD, as CH's start_vmm does.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    // SAFETY: fds[0] is the pipe's fresh read end, owned from here on.
    Ok(unsafe { File::from_raw_fd(fds[0]) })
}

/// The api listener: an inherited listening fd, or CH v53's path handling (an OFD lock on
/// `<path>.lock`, then unlink and bind).
fn api_listener(endpoint: &Endpoint) -> Result<UnixListener, String> {
    match endpoint {
        // SAFETY: the fd was handed to us, bound and listening, to own (as micro_http does).
        Endpoint::Fd(fd) => Ok(unsafe { UnixListener::from_raw_fd(*fd as RawFd) }),
        Endpoint::Path(p) => {
            let lock = File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(format!("{p}.lock"))
                .map_err(|e| format!("Error creating API socket lock file: {e}"))?;
            // SAFETY: a zeroed flock is valid; l_type is set below.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as i16;
            // SAFETY: F_OFD_SETLK with a valid flock on an fd we own.
            if unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::F_OFD_SETLK, &fl) } < 0 {
                return Err("API socket is already in use".into());
            }
            std::mem::forget(lock); // held until exit
            let _ = std::fs::remove_file(p);
            UnixListener::bind(p).map_err(|e| format!("Error binding to UNIX domain socket: {e}"))
        }
    }
}

fn fatal(chain: &[String]) -> ! {
    eprintln!("Error: Cloud Hypervisor exited with the following chain of errors:");
    for (i, c) in chain.iter().enumerate() {
        eprintln!("  {i}: {c}");
    }
    finish(1, false, None)
}

/// Exits like CH's main: the api socket (path mode) is removed after a clean run.
fn finish(code: i32, quiet: bool, api_path: Option<&str>) -> ! {
    if quiet {
        events::silence();
    } else {
        events::flush();
    }
    if code == 0
        && let Some(p) = api_path
    {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(code)
}

fn main() {
    // SAFETY: umask only changes this process's file-creation mask, as CH's main does first.
    unsafe { libc::umask(0o077) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match cli::parse(&args) {
        Ok(c) => c,
        Err(cli::CliError::Usage(m)) => {
            eprintln!("{m}");
            std::process::exit(2)
        }
        Err(cli::CliError::Info(m)) => {
            println!("{m}");
            std::process::exit(0)
        }
        Err(cli::CliError::Config(c)) => fatal(&c),
    };
    let faults = match Faults::parse(cfg.cmdline.as_deref().unwrap_or("")) {
        Ok(f) => f,
        Err(e) => fatal(&["ch_double: bad fault request".into(), e]),
    };
    let signals = match install_signal_handlers() {
        Ok(s) => s,
        Err(e) => fatal(&["Error setting up signal handlers".into(), e.to_string()]),
    };
    if faults.hang {
        // A VMM stuck before it does anything: the API socket listens, nothing answers, and
        // the signal pipe is never read.
        let _keep = cfg.api.as_ref().map(api_listener);
        loop {
            std::thread::park();
        }
    }
    if let Some(em) = &cfg.event_monitor
        && let Err(e) = events::open(em)
    {
        fatal(&["Error opening event monitor".into(), e.to_string()]);
    }
    events::event("vmm", "starting", &[]);
    let (tx, rx) = channel::<Msg>();
    let api_path = match &cfg.api {
        Some(Endpoint::Path(p)) => Some(p.clone()),
        _ => None,
    };
    if let Some(ep) = &cfg.api {
        let listener = match api_listener(ep) {
            Ok(l) => l,
            Err(e) => fatal(&["Error creating API socket".into(), e]),
        };
        if let Err(e) = http::start(listener, tx.clone()) {
            fatal(&["Error spawning HTTP thread".into(), e.to_string()]);
        }
    }
    {
        let tx = tx.clone();
        let mut signals = signals;
        let _ = std::thread::Builder::new().name("signal_handler".into()).spawn(move || {
            let mut b = [0u8; 1];
            while let Ok(1) = signals.read(&mut b) {
                let _ = tx.send(Msg::Exit);
            }
        });
    }
    let payload = cfg.kernel.is_some() || cfg.firmware.is_some();
    let quiet = faults.quiet_exit;
    let mut vmm = Vmm {
        cfg,
        faults,
        tx,
        created: payload,
        vm: None,
        guest: Guest::Other,
        generation: 0,
        serial_out: Arc::new(Mutex::new(SerialOut::default())),
        ids: Vec::new(),
    };
    if let Some(ms) = vmm.faults.slow_create {
        // Between CH's vm.create and vm.boot the API answers, and vm.info says Created.
        let end = std::time::Instant::now() + Duration::from_millis(ms);
        while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
            if let Ok(msg) = rx.recv_timeout(left) {
                handle(&mut vmm, msg, quiet, api_path.as_deref());
            }
        }
    }
    if payload
        && vmm.vm.is_none()
        && let Err((vm_exists, e)) = vmm.boot()
    {
        // main writes the exit event: vmm_shutdown runs, then the process exits 1.
        if vm_exists {
            events::event("vm", "shutdown", &[]);
        }
        vmm.vm = None;
        events::event("vm", "deleted", &[]);
        events::event("vmm", "shutdown", &[]);
        fatal(&chain(&["Error booting VM", "The VM could not boot"], e));
    }
    control_loop(vmm, rx, quiet, api_path.as_deref())
}

fn control_loop(mut vmm: Vmm, rx: Receiver<Msg>, quiet: bool, api_path: Option<&str>) -> ! {
    while let Ok(msg) = rx.recv() {
        handle(&mut vmm, msg, quiet, api_path);
    }
    finish(1, quiet, api_path)
}

/// One message for the VMM loop; it returns unless the VMM exits.
fn handle(vmm: &mut Vmm, msg: Msg, quiet: bool, api_path: Option<&str>) {
    match msg {
        Msg::Api(req, reply) => {
            let (mut resp, exit) = vmm.api(req);
            if exit {
                let (ack, written) = channel();
                resp.written = Some(ack);
                let _ = reply.send(resp);
                let _ = written.recv_timeout(Duration::from_secs(1));
                finish(0, quiet, api_path);
            }
            let _ = reply.send(resp);
        }
        Msg::Exit => {
            vmm.vm_delete();
            events::event("vmm", "shutdown", &[]);
            finish(0, quiet, api_path);
        }
        Msg::Guest(generation, ev) if generation == vmm.generation && vmm.vm.is_some() => match ev {
            GuestEvent::PowerOff if vmm.cfg.no_shutdown => {
                vmm.vm_shutdown();
            }
            GuestEvent::PowerOff => {
                vmm.vm_delete();
                events::event("vmm", "shutdown", &[]);
                finish(0, quiet, api_path);
            }
            GuestEvent::Reboot => {
                vmm.vm_reboot();
            }
            GuestEvent::Panic => {
                if vmm.cfg.pvpanic {
                    events::event("guest", "panic", &[("event", "panic")]);
                }
            }
            GuestEvent::Crash => {
                // SAFETY: kill(2) on our own pid.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                // As PID 1 of its own PID namespace (how the daemon runs every VMM), its own
                // SIGKILL is ignored. The kernel's is not: reach the CPU-time hard limit.
                let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                // SAFETY: clock_gettime writes one timespec we own.
                unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
                let cpu = t.tv_sec as u64 + 1;
                let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CPU, cpu, cpu);
                loop {
                    std::hint::spin_loop();
                }
            }
            GuestEvent::CrashExit => {
                fatal(&["ch_double fault: crash-exit".into()]);
            }
            GuestEvent::Hang => loop {
                std::thread::park();
            },
        },
        Msg::Guest(..) => {}
    }
}
