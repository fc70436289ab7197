//! The process around the VMM: signals, the API listener, and exiting like CH.

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::cli::Endpoint;
use crate::events;

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
pub fn install_signal_handlers() -> std::io::Result<File> {
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
pub fn api_listener(endpoint: &Endpoint) -> Result<UnixListener, String> {
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

pub fn fatal(chain: &[String]) -> ! {
    eprintln!("Error: Cloud Hypervisor exited with the following chain of errors:");
    for (i, c) in chain.iter().enumerate() {
        eprintln!("  {i}: {c}");
    }
    finish(1, false, None)
}

/// Exits like CH's main: the api socket (path mode) is removed after a clean run.
pub fn finish(code: i32, quiet: bool, api_path: Option<&str>) -> ! {
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
