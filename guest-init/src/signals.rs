//! Signals PID 1 handles: SIGCHLD (reap), SIGTERM and SIGINT (shut down). They are blocked
//! in every thread and taken with sigtimedwait by the main thread; a no-op handler is also
//! installed, because a namespace's init drops signals left at their default action.

use std::time::{Duration, Instant};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::unistd::Pid;

use crate::exec;
use crate::reaper::Reaper;

/// Between SIGTERM and SIGKILL at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

extern "C" fn ignore(_: libc::c_int) {}

fn set() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        s.add(sig);
    }
    s
}

pub fn block() {
    let action = SigAction::new(SigHandler::Handler(ignore), SaFlags::SA_RESTART, SigSet::empty());
    for sig in set().iter() {
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        if let Err(e) = unsafe { sigaction(sig, &action) } {
            log!("my_hypervisor-init: sigaction {sig}: {e}");
        }
    }
    if let Err(e) = set().thread_block() {
        log!("my_hypervisor-init: blocking signals: {e}");
    }
}

/// In a command between fork and exec: PID 1's blocked signals must not stay blocked in it
/// (the standard library keeps the mask). Async-signal-safe.
pub fn unblock_in_child() -> std::io::Result<()> {
    // SAFETY: sigemptyset initialises the set we own; pthread_sigmask reads it.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut())
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::from_raw_os_error(rc)) }
}

/// Waits up to 250 ms for a signal and reaps; true on SIGTERM or SIGINT.
pub fn wait_once(reaper: &Reaper) -> bool {
    let ts = libc::timespec { tv_sec: 0, tv_nsec: 250_000_000 };
    // SAFETY: the set and the timespec are valid for the call; no siginfo is asked for.
    let sig = unsafe { libc::sigtimedwait(set().as_ref(), std::ptr::null_mut(), &ts) };
    reaper.reap_all();
    sig == libc::SIGTERM || sig == libc::SIGINT
}

fn no_children() -> bool {
    // SAFETY: waitid with WNOHANG|WNOWAIT only looks; the siginfo is ours and zeroed.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD)
}

/// SIGTERM to everything (as PID 1: every process; otherwise our commands' groups), a grace
/// period, then SIGKILL; reaps them all and lets the exec threads send their exit frames.
pub fn stop_everything(reaper: &Reaper, pid1: bool) {
    for (sig, wait) in [(Signal::SIGTERM, SHUTDOWN_GRACE), (Signal::SIGKILL, Duration::from_secs(2))] {
        if pid1 {
            // kill(-1) from PID 1 reaches every process but itself, in its PID namespace.
            let _ = kill(Pid::from_raw(-1), sig);
        } else {
            reaper.signal_all(sig);
        }
        let until = Instant::now() + wait;
        while Instant::now() < until {
            reaper.reap_all();
            if (pid1 && no_children()) || (!pid1 && reaper.running() == 0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let until = Instant::now() + Duration::from_secs(3);
    while exec::active() > 0 && Instant::now() < until {
        reaper.reap_all();
        std::thread::sleep(Duration::from_millis(20));
    }
}
