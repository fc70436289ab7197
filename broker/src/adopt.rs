//! A restarted daemon takes up the VMs its journal lists. Each recorded VMM is adopted only
//! if, through a pidfd taken first, it is still the process the journal names
//! (`policy::journal::check_vmm`: start time, uid, PID 1 of its own namespace); it is then
//! watched by that pidfd, since it is no child of this broker. The frontend pings its API
//! socket when it reconnects (`frontend::vmm::driver`). Every other process in the VM uid
//! range is ended, and each VM whose VMM is gone is released: its taps (by name), grants
//! (from the recorded owner, ACL bytes and inode) and run dir.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use my_hypervisor_policy::journal::{self, Entry, check_vmm};
use my_hypervisor_policy::sandbox::status_uids;
use my_hypervisor_policy::vmm::RELEASE_WAIT_MS;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::images::Grant;
use crate::table::{Broker, Tap, Vm, Vmm};
use crate::vmm::{self, Outputs};

/// The journal an earlier broker left, checked; none is an empty one.
pub fn read(path: &Path, vm_uids: &std::ops::RangeInclusive<u32>) -> Result<Vec<Entry>, String> {
    match std::fs::read(path) {
        Ok(bytes) => journal::decode(&bytes, vm_uids).map_err(|e| format!("{} {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, and returns a new fd or -1.
    let fd = crate::unpriv::sys("pidfd_open", unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the fd was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The pidfd of the recorded VMM if it is still that process.
fn find_vmm(e: &Entry) -> Result<(u32, OwnedFd), String> {
    let pid = e.pid.ok_or("no VMM was recorded as running")?;
    let pidfd = pidfd_open(pid).map_err(|_| format!("pid {pid} is gone"))?;
    let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).map_err(|_| format!("pid {pid} is gone"));
    let (stat, status) = (read("stat")?, read("status")?);
    check_vmm(e, &stat, &status).map_err(|e| e.to_string())?;
    // A pidfd is readable once its process has exited (a zombie still shows in /proc).
    if poll(&mut [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)], PollTimeout::ZERO).is_ok_and(|n| n > 0) {
        return Err(format!("pid {pid} has exited"));
    }
    Ok((pid, pidfd))
}

/// Takes up every VM of the journal, ends the strays, and releases the VMs whose VMM is gone.
pub fn take_up(b: &mut Broker, entries: Vec<Entry>) {
    let mut gone = Vec::new();
    for e in entries {
        let dir = vmm::run_dir_fd(b, &e.vm);
        let grants = e.grants.iter().filter_map(|r| {
            let g = Grant::adopt(b, e.uid, r);
            g.inspect_err(
                |why| tracing::error!(vm = %e.vm, error = %why, "a journal grant cannot be taken up; undo it by hand"),
            )
            .ok()
        });
        let grants = grants.collect();
        let taps = e.taps.iter().map(|name| Tap { name: name.clone(), mac: None, fd: None }).collect();
        let adopted = find_vmm(&e).and_then(|(pid, pidfd)| {
            let dir = dir.as_ref().map_err(|err| format!("run dir: {err}"))?;
            let (outputs, exe) = (Outputs::open(dir)?, e.exe.clone().unwrap_or_default());
            Ok(Vmm::Alive { pid, pidfd, exe, outputs, adopted: true, start_time: e.start_time })
        });
        let adopted = adopted
            .inspect(|_| tracing::info!(vm = %e.vm, uid = e.uid, pid = ?e.pid, "VMM re-adopted from the journal"));
        let vmm = adopted.unwrap_or_else(|why| {
            tracing::warn!(vm = %e.vm, uid = e.uid, pid = ?e.pid, reason = %why, "VMM not adopted; the VM is released");
            gone.push(e.vm.clone());
            Vmm::NotSpawned
        });
        // A VM that is released at once never uses its dir handle.
        let Some(dir) = dir.ok().or_else(|| b.run_fd.try_clone().ok()) else { continue };
        b.vms.insert(e.vm, Vm { uid: e.uid, dir, grants, taps, vmm });
    }
    end_strays(b);
    vmm::release_each(b, gone, "releasing a VM whose VMM is gone failed");
}

/// Ends every process in the VM uid range that no adopted VM owns (a VMM of a VM that is
/// not taken up, or one spawned just before a crash and never journalled), each logged.
fn end_strays(b: &Broker) {
    let adopted: Vec<u32> = b.vms.values().filter(|v| matches!(v.vmm, Vmm::Alive { .. })).map(|v| v.uid).collect();
    let procs = vmm::proc_uids().unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot list processes: strays under VM uids are not ended");
        vec![]
    });
    for pid in journal::strays(&procs, &b.vm_uids, &adopted) {
        // The pidfd first, then the uids again, so that a pid reused meanwhile is spared.
        let Ok(pidfd) = pidfd_open(pid) else { continue };
        let uids = std::fs::read_to_string(format!("/proc/{pid}/status")).map(|s| status_uids(&s)).unwrap_or_default();
        if journal::strays(&[(pid, uids.clone())], &b.vm_uids, &adopted).is_empty() {
            continue;
        }
        tracing::error!(pid, ?uids, "a process runs under a VM uid that no journalled VM holds: killing it");
        // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo and no flags.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGKILL, 0, 0) };
        if r == 0 {
            // Its taps and files go with it; wait, so that a release after this finds them free.
            let _ = poll(&mut [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)], PollTimeout::from(RELEASE_WAIT_MS));
        }
    }
}

/// The pidfds of the adopted VMMs, which turn readable when one exits.
pub fn watched(b: &Broker) -> Vec<(u32, std::os::fd::BorrowedFd<'_>)> {
    let adopted = b.vms.values().filter_map(|v| match &v.vmm {
        Vmm::Alive { pid, pidfd, adopted: true, .. } => Some((*pid, pidfd.as_fd())),
        _ => None,
    });
    adopted.collect()
}
