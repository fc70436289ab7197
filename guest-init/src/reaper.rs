//! Reaps every child, orphans included, and hands the statuses of the commands it was told
//! about to whoever waits for them.
//!
//! One lock covers both spawning and reaping: a command is registered before the reaper can
//! see it exit, and the standard library's own wait on a spawn that failed to exec cannot lose
//! its child to the reaper.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use my_hypervisor_exec_proto::ExitStatus;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

#[derive(Default)]
pub struct Reaper {
    /// Registered commands: None while running, then their status until taken.
    wanted: Mutex<HashMap<i32, Option<ExitStatus>>>,
    exited: Condvar,
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Option<ExitStatus>>> {
        // A thread that panicked holding the lock left the map consistent: use it.
        self.wanted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `cmd` and registers it, under the reaping lock.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, i32)> {
        let mut wanted = self.lock();
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        wanted.insert(pid, None);
        Ok((child, pid))
    }

    /// Reaps every child that has exited. A registered command's process group goes with it,
    /// at once, before its pid can be reused.
    pub fn reap_all(&self) -> usize {
        let mut wanted = self.lock();
        let mut reaped = 0;
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    log!("my_hypervisor-init: waitpid: {e}");
                    break;
                }
            };
            reaped += 1;
            let (pid, st) = status;
            if let Some(slot) = wanted.get_mut(&pid.as_raw()) {
                *slot = Some(st);
                let _ = killpg(pid, Signal::SIGKILL);
            }
        }
        if reaped > 0 {
            self.exited.notify_all();
        }
        reaped
    }

    /// Waits until the registered `pid` has been reaped, or `until` passes. Takes the status.
    pub fn wait(&self, pid: i32, until: Instant) -> Option<ExitStatus> {
        let mut wanted = self.lock();
        loop {
            if let Some(Some(st)) = wanted.get(&pid) {
                let st = *st;
                wanted.remove(&pid);
                return Some(st);
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            wanted = match self.exited.wait_timeout(wanted, until - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Sends `sig` to the process group of every registered command still running.
    pub fn signal_all(&self, sig: Signal) {
        for (pid, st) in self.lock().iter() {
            if st.is_none() {
                let _ = killpg(Pid::from_raw(*pid), sig);
            }
        }
    }

    /// Registered commands not yet reaped.
    pub fn running(&self) -> usize {
        self.lock().values().filter(|s| s.is_none()).count()
    }
}
