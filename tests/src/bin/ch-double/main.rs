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
//! Faults are asked for on the kernel command line (see `faults.rs`).
//!
//! The source: `cli.rs` and `options.rs` (the command line), `faults.rs`, `vmm.rs` (the VMM
//! model and its message loop) with `info.rs` (vm.info), `devices.rs` (serial, vsock, disks,
//! taps, the guest), `http.rs` (the REST API's framing), `events.rs` (the event monitor),
//! `process.rs` (signals, the API listener, exiting) and this thin `main`.

mod cli;
mod devices;
mod events;
mod faults;
mod http;
mod info;
mod options;
mod process;
mod vmm;

use std::io::Read;
use std::sync::mpsc::channel;

use cli::Endpoint;
use faults::Faults;
use process::{api_listener, fatal, install_signal_handlers};
use vmm::{Msg, Vmm};

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
    let quiet = faults.quiet_exit;
    Vmm::new(cfg, faults, tx).run(rx, quiet, api_path.as_deref())
}
