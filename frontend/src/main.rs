//! `my_hypervisor-frontend`: started by the daemon, never by hand. It inherits the bound RPC
//! listener and its end of the broker channel as fds, and runs with no privileges at all.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "my_hypervisor-frontend",
    version,
    about = "Unprivileged JSON-RPC frontend (started by my_hypervisor-daemon)"
)]
struct Args {
    /// The inherited, already bound and listening RPC socket.
    #[arg(long)]
    listen_fd: RawFd,
    /// The inherited SOCK_SEQPACKET channel to the broker.
    #[arg(long)]
    broker_fd: RawFd,
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long)]
    console_dir: PathBuf,
    #[arg(long, default_value = "text")]
    log_format: String,
    /// A root that images may come from (repeatable), as given to the daemon.
    #[arg(long = "image-root")]
    image_roots: Vec<PathBuf>,
    #[command(flatten)]
    limits: my_hypervisor_frontend::rpc::Limits,
    #[command(flatten)]
    console: my_hypervisor_frontend::console::ConsoleLimits,
}

fn main() -> ExitCode {
    let args = Args::parse();
    my_hypervisor_frontend::init_logging(&args.log_format);
    // PID 1 of its PID namespace gets no signal it has no handler for (SIGKILL aside): the
    // broker's SIGTERM at shutdown must still stop it, at once, as it would any process. The
    // state on disk is whole at every instant (each file is replaced by rename).
    // SAFETY: the handler only calls _exit, which is async-signal-safe.
    if unsafe { libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t) } == libc::SIG_ERR {
        tracing::error!(error = %std::io::Error::last_os_error(), "install the SIGTERM handler");
        return ExitCode::FAILURE;
    }
    let Some(listen) = take_fd(args.listen_fd) else {
        tracing::error!(fd = args.listen_fd, "the listening socket fd is not open");
        return ExitCode::FAILURE;
    };
    let Some(broker) = take_fd(args.broker_fd) else {
        tracing::error!(fd = args.broker_fd, "the broker channel fd is not open");
        return ExitCode::FAILURE;
    };
    let cfg = my_hypervisor_frontend::Config {
        state_dir: args.state_dir,
        console_dir: args.console_dir,
        image_roots: args.image_roots,
        limits: args.limits,
        console: args.console,
    };
    match my_hypervisor_frontend::run(cfg, listen, broker) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "frontend stopped");
            ExitCode::FAILURE
        }
    }
}

/// Takes ownership of an inherited fd after checking that it is open, and marks it
/// close-on-exec.
fn take_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_SETFD on an integer fd has no memory effects; it fails on a closed fd.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: the fd is open, was inherited for us alone, and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

extern "C" fn on_sigterm(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe and runs no destructors.
    unsafe { libc::_exit(0) }
}
