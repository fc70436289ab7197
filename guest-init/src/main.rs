//! `my_hypervisor-init`, the guest's PID 1: mounts, modules, hostname and MTUs from its
//! config, reaps every zombie, serves the exec protocol on vsock, and on SIGTERM, SIGINT or
//! the ACPI power button stops every process, syncs and powers off. It never exits and
//! never panics as PID 1: a failed step is logged to the console and the boot goes on.
//!
//! `--listen-unix PATH` is the test mode: the same service on a Unix socket, inside its own
//! mount, UTS and network namespaces, with no module loading; it powers off only as PID 1
//! of a child PID namespace, where that ends the namespace. docs/guest-init.md has the rest.

/// Logs one line to the console. Unlike eprintln!, a console that fails never panics PID 1.
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod config;
mod exec;
mod modules;
mod power;
mod reaper;
mod server;
mod signals;
mod system;

use std::os::unix::net::UnixListener;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use config::Config;
use reaper::Reaper;
use server::{Listener, Service};

const USAGE: &str = "usage: my_hypervisor-init                    (as PID 1 of a guest)
       my_hypervisor-init --listen-unix PATH [--config FILE] [--cmdline WORDS]
                                             (test mode: serve on a Unix socket)";

enum Mode {
    Guest,
    Test { socket: PathBuf, config: Option<PathBuf>, cmdline: Option<String> },
}

fn parse_args(args: &[String]) -> Result<Option<Mode>, String> {
    let mut socket = None;
    let (mut config, mut cmdline) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--listen-unix" => socket = Some(PathBuf::from(value()?)),
            "--config" => config = Some(PathBuf::from(value()?)),
            "--cmdline" => cmdline = Some(value()?),
            "--help" | "-h" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match socket {
        Some(socket) => Ok(Some(Mode::Test { socket, config, cmdline })),
        None if config.is_some() || cmdline.is_some() => {
            Err("--config and --cmdline are for test mode (--listen-unix)".into())
        }
        None => Ok(Some(Mode::Guest)),
    }
}

fn main() {
    std::panic::set_hook(Box::new(|info| log!("my_hypervisor-init: internal error: {info}")));
    let pid1 = std::process::id() == 1;
    // Read before anything mounts a /proc of this PID namespace (which would show one entry).
    let child_ns = system::pid1_of_child_namespace();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match parse_args(&args) {
        Ok(Some(m)) => m,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        // The kernel hands init the command-line words it does not know: as PID 1 they
        // are not ours to refuse.
        Err(_) if pid1 => Mode::Guest,
        Err(e) => {
            log!("my_hypervisor-init: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if matches!(mode, Mode::Guest) && (!pid1 || child_ns) {
        // PID 1 of a child PID namespace is a container on some host, not a guest: guest
        // mode's mounts there could reach the host.
        log!("my_hypervisor-init: without --listen-unix it must run as PID 1 of a guest");
        std::process::exit(2);
    }
    if std::env::var_os("PATH").is_none() {
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") };
    }
    // Before any thread exists, so that every thread inherits the mask.
    signals::block();
    let reaper = Arc::new(Reaper::default());
    let shutdown = Arc::new(AtomicBool::new(false));
    if !pid1 {
        // Test mode outside a PID namespace: the commands' orphans come back to us to reap,
        // rather than to the host's init.
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
            log!("my_hypervisor-init: PR_SET_CHILD_SUBREAPER: {}", std::io::Error::last_os_error());
        }
    }
    let guest = matches!(mode, Mode::Guest);
    // A panic in setup (say, a thread that cannot be created) is logged by the hook; PID 1
    // goes on to reap and wait for the shutdown signal.
    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| match mode {
        Mode::Guest => boot_guest(&reaper, &shutdown),
        Mode::Test { socket, config, cmdline } => {
            if let Err(e) = start_test(&reaper, &socket, config, cmdline) {
                log!("my_hypervisor-init: {e}");
                if !pid1 {
                    std::process::exit(1);
                }
            }
        }
    }));
    run_until_shutdown(&reaper, &shutdown, pid1);
    if guest || child_ns {
        system::power_off();
    }
    if pid1 && !child_ns {
        // The power-off was refused, or this is PID 1 somewhere reboot() must not be
        // called: PID 1 never exits, it goes on reaping.
        loop {
            let _ = std::panic::catch_unwind(|| signals::wait_once(&reaper));
        }
    }
}

fn boot_guest(reaper: &Arc<Reaper>, shutdown: &Arc<AtomicBool>) {
    system::guest_mounts();
    let file = std::fs::read_to_string(config::CONFIG_FILE).ok();
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok();
    let cfg = apply_config(file.as_deref(), cmdline.as_deref(), true);
    let flag = Arc::clone(shutdown);
    thread::spawn(move || power::watch(flag));
    let svc = Service::new(Arc::clone(reaper));
    thread::spawn(move || {
        // The vsock transport may come late (its module): retry, logging now and then.
        for attempt in 0u64.. {
            match Listener::vsock(cfg.port) {
                Ok(l) => {
                    log!("my_hypervisor-init: serving exec on vsock port {}", cfg.port);
                    return svc.serve(l);
                }
                Err(e) if attempt % 60 == 0 => {
                    log!("my_hypervisor-init: vsock port {} (retrying): {e}", cfg.port)
                }
                Err(_) => {}
            }
            thread::sleep(Duration::from_secs(1));
        }
    });
}

fn start_test(
    reaper: &Arc<Reaper>,
    socket: &std::path::Path,
    config: Option<PathBuf>,
    cmdline: Option<String>,
) -> Result<(), String> {
    let file = match config {
        Some(p) => Some(std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    // Bound before the namespaces, so the socket is on the caller's file system.
    let listener = UnixListener::bind(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    if system::test_namespaces() {
        apply_config(file.as_deref(), cmdline.as_deref(), false);
    }
    let svc = Service::new(Arc::clone(reaper));
    thread::spawn(move || svc.serve(Listener::Unix(listener)));
    Ok(())
}

/// Loads the config and applies it: modules (guest only), hostname, lo up, MTUs.
fn apply_config(file: Option<&str>, cmdline: Option<&str>, guest: bool) -> Config {
    let (cfg, problems) = Config::load(file, cmdline);
    for p in problems {
        log!("my_hypervisor-init: {p}");
    }
    if guest {
        let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned());
        match release {
            Ok(r) => modules::load(&PathBuf::from("/lib/modules").join(r), &cfg.modules),
            Err(e) => log!("my_hypervisor-init: uname: {e}"),
        }
    }
    if let Some(h) = &cfg.hostname {
        system::set_hostname(h);
    }
    system::link_up("lo");
    for (nic, mtu) in &cfg.mtus {
        // A NIC appears when its driver has probed, shortly after its module loaded.
        for _ in 0..50 {
            if system::mtu_of(nic).is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        system::set_mtu(nic, *mtu);
    }
    cfg
}

/// Reaps on SIGCHLD until SIGTERM, SIGINT or the power button, then stops every process
/// (SIGTERM, a grace period, SIGKILL) and syncs.
fn run_until_shutdown(reaper: &Arc<Reaper>, shutdown: &AtomicBool, pid1: bool) {
    loop {
        let stop = std::panic::catch_unwind(|| signals::wait_once(reaper)).unwrap_or(false);
        if stop || shutdown.load(Ordering::SeqCst) {
            break;
        }
    }
    log!("my_hypervisor-init: shutting down");
    let _ = std::panic::catch_unwind(|| signals::stop_everything(reaper, pid1));
    nix::unistd::sync();
}
