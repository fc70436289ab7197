//! The VMM model: the VM object, CH's API requests and what each does to the VM, guest
//! events, and the loop's handling of each message. vm.info's body is in [`super::info`].

use std::fs::File;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::{Config, Serial};
use crate::devices::{self, Guest, SerialOut, SerialSocket, VsockMuxer};
use crate::events;
use crate::faults::Faults;
use crate::process::{fatal, finish};

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

/// The VM object: it exists from boot until shutdown.
pub struct Vm {
    pub paused: bool,
    pub _serial: Option<SerialSocket>,
    pub _vsock: Option<VsockMuxer>,
    pub _disks: Vec<File>,
}

pub struct Vmm {
    pub cfg: Config,
    pub faults: Faults,
    pub tx: Sender<Msg>,
    /// The VM's config exists (until vm.delete).
    pub created: bool,
    pub vm: Option<Vm>,
    pub guest: Guest,
    pub generation: u64,
    pub serial_out: Arc<Mutex<SerialOut>>,
    /// The device ids CH gives: `_disk0`, `_net1`, … numbered in creation order.
    pub ids: Vec<String>,
}

fn chain(top: &[&str], rest: Vec<String>) -> Vec<String> {
    top.iter().map(|s| s.to_string()).chain(rest).collect()
}

impl Vmm {
    /// The VMM as CH starts it: with a payload on the command line, the VM's config exists.
    pub fn new(cfg: Config, faults: Faults, tx: Sender<Msg>) -> Vmm {
        let created = cfg.kernel.is_some() || cfg.firmware.is_some();
        let echo = faults.serial_echo;
        Vmm {
            cfg,
            faults,
            tx,
            created,
            vm: None,
            guest: Guest::Other,
            generation: 0,
            serial_out: Arc::new(Mutex::new(SerialOut { client: None, buffer: Default::default(), echo })),
            ids: Vec::new(),
        }
    }

    /// Runs the VMM until it exits: the `slow-create` window, the boot of a VM given on the
    /// command line, then the message loop.
    pub fn run(mut self, rx: Receiver<Msg>, quiet: bool, api_path: Option<&str>) -> ! {
        if let Some(ms) = self.faults.slow_create {
            // Between CH's vm.create and vm.boot the API answers, and vm.info says Created.
            let end = Instant::now() + Duration::from_millis(ms);
            while let Some(left) = end.checked_duration_since(Instant::now()) {
                if let Ok(msg) = rx.recv_timeout(left) {
                    handle(&mut self, msg, quiet, api_path);
                }
            }
        }
        if self.created
            && self.vm.is_none()
            && let Err((vm_exists, e)) = self.boot()
        {
            // main writes the exit event: vmm_shutdown runs, then the process exits 1.
            if vm_exists {
                events::event("vm", "shutdown", &[]);
            }
            self.vm = None;
            events::event("vm", "deleted", &[]);
            events::event("vmm", "shutdown", &[]);
            fatal(&chain(&["Error booting VM", "The VM could not boot"], e));
        }
        while let Ok(msg) = rx.recv() {
            handle(&mut self, msg, quiet, api_path);
        }
        finish(1, quiet, api_path)
    }

    /// vm.create: CH makes the console devices here. The serial socket is made at boot in
    /// the double, just before `vm/booting`, which no test can tell apart.
    pub fn boot(&mut self) -> Result<(), (bool, Vec<String>)> {
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
        if let Some(kib) = f.serial_flood {
            // Numbered 8-byte lines, so a reader can tell what it missed.
            let out = self.serial_out.clone();
            let _ = std::thread::Builder::new().name("ch-double-serial".into()).spawn(move || {
                let text: Vec<u8> = (0..kib * 128).flat_map(|i| format!("{i:07}\n").into_bytes()).collect();
                for chunk in text.chunks(4096) {
                    devices_write(&out, chunk);
                }
            });
        }
        if let Some(mib) = f.chatty_log {
            // A chatty VMM, slower than a flood: its log is trimmed, and it lives.
            let _ = std::thread::Builder::new().name("ch-double-chatty".into()).spawn(move || {
                let chunk = vec![b'y'; 1 << 20];
                for _ in 0..mib {
                    let _ = std::io::Write::write_all(&mut std::io::stderr(), &chunk);
                    std::thread::sleep(Duration::from_millis(60));
                }
                let _ = std::io::Write::write_all(&mut std::io::stderr(), b"chatty-done\n");
            });
        }
        if let Some(ms) = f.flood_log {
            // A VMM gone wrong: it writes to its log without end.
            let _ = std::thread::Builder::new().name("ch-double-flood".into()).spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                let chunk = vec![b'x'; 1 << 20];
                while std::io::Write::write_all(&mut std::io::stderr(), &chunk).is_ok() {}
            });
        }
        if let Some(ms) = f.flood_reboots {
            let _ = std::thread::Builder::new().name("ch-double-flood".into()).spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                for _ in 0..100_000 {
                    events::event("vm", "rebooted", &[]);
                }
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

fn devices_write(out: &Arc<Mutex<SerialOut>>, bytes: &[u8]) {
    out.lock().unwrap_or_else(|e| e.into_inner()).write(bytes);
}

fn error(status: u16, chain: &[&str]) -> ApiResp {
    ApiResp { status, body: serde_json::to_string(chain).ok(), written: None }
}

fn no_content() -> ApiResp {
    ApiResp { status: 204, body: None, written: None }
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
