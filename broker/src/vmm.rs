//! The VMM of one VM: spawn it (through the spawn helper), connect to its sockets, signal
//! it, reap it, and release everything the VM held.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

use my_hypervisor_broker_proto::{Event, ExitStatus, ImageRole, Reply, SocketRole, VmmConfig, VmmSignal};
use my_hypervisor_policy::elf;
use my_hypervisor_policy::sandbox::{SandboxSpec, status_uids};
use my_hypervisor_policy::vmm::{
    API_SOCKET, EVENT_FILE, LOG_FILE, RELEASE_WAIT_MS, SANDBOX_REPORT, VmmPlan, check_output_node, check_socket_node,
    exit_status, signal_number, socket_name,
};
use nix::fcntl::{AtFlags, FallocateFlags, OFlag, openat};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::stat::{Mode, fstat};
use nix::sys::wait::waitpid;
use nix::unistd::{Gid, Pid, Uid, UnlinkatFlags, fchownat, unlinkat};

use crate::images::revoke;
use crate::spawner::{self, Order};
use crate::table::{Broker, Handled, Refusal, Vm, Vmm};

/// The broker's read-only handles on a VMM's event-monitor file and log.
pub struct Outputs {
    events: OwnedFd,
    log: OwnedFd,
}

impl Outputs {
    /// The event file and log of a VMM taken up from the journal, opened by name in its run
    /// dir: regular files the broker created (owned by root), never a FIFO or a symlink.
    pub fn open(dir: &OwnedFd) -> Result<Outputs, String> {
        let open = |name: &str| {
            let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
            let fd = openat(dir.as_fd(), name, flags, Mode::empty()).map_err(|e| format!("{name}: {e}"))?;
            let st = fstat(fd.as_fd()).map_err(|e| format!("{name}: {e}"))?;
            check_output_node(name, st.st_mode, st.st_uid).map(|()| fd)
        };
        Ok(Outputs { events: open(EVENT_FILE)?, log: open(LOG_FILE)? })
    }

    /// New open file descriptions of both files, read-only, each with its own offset.
    pub fn reopen(&self) -> Result<Vec<OwnedFd>, Refusal> {
        [&self.events, &self.log].into_iter().map(|fd| Ok(reopen(fd, OFlag::O_RDONLY)?)).collect()
    }

    /// Punches a hole over all but the log's newest bytes (`policy::vmm::log_punch_len`).
    pub fn trim_log(&self) -> Result<(), Refusal> {
        let f = std::fs::OpenOptions::new().write(true).open(format!("/proc/self/fd/{}", self.log.as_raw_fd()))?;
        if let Some(len) = my_hypervisor_policy::vmm::log_punch_len(f.metadata()?.len()) {
            let how = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            nix::fcntl::fallocate(&f, how, 0, len as i64).map_err(|e| Refusal::Vmm(format!("trim log: {e}")))?;
        }
        Ok(())
    }
}

/// Creates `name` in the VM's dir for the VMM to append to: returns (append fd, read fd).
fn create_output(dir: &OwnedFd, name: &str) -> Result<(OwnedFd, OwnedFd), Refusal> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let w = openat(dir.as_fd(), name, flags, Mode::from_bits_truncate(0o600))
        .map_err(Refusal::vmm(format!("create {name}")))?;
    Ok(reopen(&w, OFlag::O_RDONLY).map(|r| (w, r))?)
}

/// A new open file description, with its own offset, of the file `fd` is open on.
pub fn reopen(fd: &impl AsRawFd, flags: OFlag) -> nix::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::fcntl::open(path.as_str(), flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY, Mode::empty())
}

/// Mounts the VM's own size-limited tmpfs on its new run dir `vm` (through the spawn helper)
/// and opens it; the tmpfs is owned by `uid`, mode 0700.
pub fn open_run_dir(b: &Broker, vm: &str, uid: u32) -> Result<OwnedFd, Refusal> {
    spawner::run_dir(&b.spawner, Some(uid), run_dir_fd(b, vm)?).map_err(Refusal::RunDir)?;
    Ok(run_dir_fd(b, vm)?)
}

pub fn run_dir_fd(b: &Broker, vm: &str) -> nix::Result<OwnedFd> {
    openat(b.run_fd.as_fd(), vm, OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
}

/// Unmounts the run dir's tmpfs (EINVAL, not a mount point, if it was never mounted), then
/// removes the dir and anything left below it.
pub fn remove_run_dir(b: &Broker, vm: &str) -> Result<(), String> {
    if let Ok(dir) = run_dir_fd(b, vm) {
        let _ = spawner::run_dir(&b.spawner, None, dir);
    }
    match std::fs::remove_dir_all(b.run_dir.join(vm)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("remove runtime dir: {e}")),
        _ => Ok(()),
    }
}

/// The lowest uid of the range that no VM holds and no process runs under. A uid some
/// process still runs under (something outlived its VM) is never handed out, and each skip
/// is logged as an error. It needs a /proc that shows every process (no hidepid).
pub fn free_uid(b: &Broker) -> Result<u32, Refusal> {
    let running = proc_uids()?;
    for uid in b.vm_uids.clone().filter(|u| b.vms.values().all(|v| v.uid != *u)) {
        let Some((pid, _)) = running.iter().find(|(_, u)| u.contains(&uid)) else { return Ok(uid) };
        tracing::error!(uid, pid, "a process runs under a free VM uid: the uid is not handed out");
    }
    Err(Refusal::NoUid)
}

/// Every process and its uids (real, effective, saved, fs), from /proc/PID/status.
pub fn proc_uids() -> std::io::Result<Vec<(u32, Vec<u32>)>> {
    let mut running = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let Ok(pid) = e?.file_name().to_string_lossy().parse::<u32>() else { continue };
        // A process that exited meanwhile has no status any more.
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        running.push((pid, status_uids(&status)));
    }
    Ok(running)
}

pub fn spawn(b: &mut Broker, id: &str, cfg: &VmmConfig) -> Handled {
    let (ch, major) = b.cloud_hypervisor.clone().map_err(Refusal::CloudHypervisor)?;
    let run_dir = b.run_dir.join(id);
    let vm = b.vms.get_mut(id).ok_or_else(|| Refusal::Vmm(format!("no VM {id}")))?;
    my_hypervisor_policy::ch_binary::check_version(&ch.to_string_lossy(), major, !vm.taps.is_empty())?;
    let images: Vec<(ImageRole, String)> = vm.grants.iter().map(|g| (g.role, g.path.clone())).collect();
    let nets = vm.taps.iter().map(|t| t.mac.clone()).collect();
    let plan = VmmPlan::new(run_dir.to_string_lossy().into_owned(), &images, nets, cfg);
    plan.check()?;
    let exe = ch.to_string_lossy().into_owned();
    let bytes = std::fs::read(&ch).map_err(Refusal::vmm(&exe))?;
    let interpreter = elf::needs(&exe, &bytes).map_err(|e| Refusal::Vmm(e.to_string()))?.interpreter;
    let spec = SandboxSpec::new(id, vm.uid, exe.clone(), interpreter, plan, b.sandbox);
    // On failure, remove what this attempt created, so that it can be tried again.
    let cleanup = |dir: &OwnedFd| {
        [LOG_FILE, EVENT_FILE, SANDBOX_REPORT, API_SOCKET].map(|n| unlinkat(dir, n, UnlinkatFlags::NoRemoveDir))
    };
    let started = (|| {
        let (log_w, log_r) = create_output(&vm.dir, LOG_FILE)?;
        let (events_w, events_r) = create_output(&vm.dir, EVENT_FILE)?;
        let (report_w, _) = create_output(&vm.dir, SANDBOX_REPORT)?;
        std::io::Write::write_all(&mut std::fs::File::from(report_w), spec.report().as_bytes())?;
        let api = UnixListener::bind(run_dir.join(API_SOCKET)).map_err(Refusal::vmm("bind api socket"))?;
        let ids = (Some(Uid::from_raw(vm.uid)), Some(Gid::from_raw(vm.uid)));
        fchownat(vm.dir.as_fd(), API_SOCKET, ids.0, ids.1, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(Refusal::vmm("chown api socket"))?;
        let mut fds: Vec<OwnedFd> = vec![log_w, api.into(), events_w];
        // A VM taken up from the journal is never spawned again, so each tap has its fd.
        for fd in vm.taps.iter().filter_map(|t| t.fd.as_ref()).chain(vm.grants.iter().map(|g| &g.fd)).chain([&vm.dir]) {
            fds.push(fd.try_clone()?);
        }
        let grants = vm.grants.iter().map(|g| (g.path.clone(), g.writable()));
        let binds = grants.chain([(spec.plan.run_dir.clone(), true)]).collect();
        let json = serde_json::to_string(&spec).map_err(|e| Refusal::Vmm(e.to_string()))?;
        let order = Order::Vmm { uid: vm.uid, spec: json, ch_argv: spec.ch_argv(), binds };
        let started = spawner::order(&b.spawner, order, &fds).map_err(Refusal::Vmm)?;
        Ok::<_, Refusal>((started, Outputs { events: events_r, log: log_r }))
    })();
    let (spawner::Started { pid, pidfd }, outputs) = started.inspect_err(|_| _ = cleanup(&vm.dir))?;
    let fds = outputs.reopen();
    // Recorded even if the reopen failed, so that a release finds and kills it.
    // Still unreaped, so the pid cannot name another process yet.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let start_time = my_hypervisor_policy::journal::start_time(&stat);
    vm.vmm = Vmm::Alive { pid, pidfd, exe, outputs, adopted: false, start_time };
    Ok((Reply::Spawned { pid }, fds?))
}

/// Connects to one of the VMM's sockets through a handle on the node itself, never by
/// following a path the VMM could have replaced with a symlink.
pub fn connect(vm: &Vm, role: SocketRole) -> Handled {
    let name = socket_name(role);
    let node = openat(vm.dir.as_fd(), name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(Refusal::vmm(name))?;
    let st = fstat(node.as_fd())?;
    check_socket_node(name, st.st_mode, st.st_uid, vm.uid).map_err(Refusal::Vmm)?;
    // Non-blocking: a VMM that listens but never accepts must not stall the broker.
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let sock = socket::socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
    let addr = UnixAddr::new(format!("/proc/self/fd/{}", node.as_raw_fd()).as_str())?;
    socket::connect(sock.as_raw_fd(), &addr).map_err(Refusal::vmm(format!("connect {name}")))?;
    nix::fcntl::fcntl(&sock, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))?;
    Ok((Reply::Connected, vec![sock]))
}

pub fn signal(vm: &Vm, sig: VmmSignal) -> Result<(), Refusal> {
    let Vmm::Alive { pidfd, .. } = &vm.vmm else { return Err(Refusal::Vmm("no live VMM".into())) };
    let sig = signal_number(sig);
    // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo and no flags.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, std::ptr::null::<u8>(), 0) };
    crate::unpriv::sys("signal", r).map(drop).map_err(|e| Refusal::Vmm(e.to_string()))
}

/// Records the exit of a reaped child if it was a VMM; returns the event for the frontend.
pub fn reaped(b: &mut Broker, pid: u32, status: ExitStatus) -> Option<Event> {
    let (id, vm) = b.vms.iter_mut().find(|(_, v)| matches!(v.vmm, Vmm::Alive { pid: p, .. } if p == pid))?;
    let Vmm::Alive { outputs, .. } = std::mem::replace(&mut vm.vmm, Vmm::NotSpawned) else { return None };
    vm.vmm = Vmm::Exited { pid, status, outputs };
    Some(Event::VmmExited { vm: id.clone(), pid, status })
}

/// Kills the VMM if alive (as PID 1 of its PID namespace, it takes every process it forked
/// with it) and reaps it, waiting at most RELEASE_WAIT_MS.
pub fn stop(b: &mut Broker, id: &str) -> Result<(), Refusal> {
    let Some(vm) = b.vms.get_mut(id) else { return Ok(()) };
    if let Vmm::Alive { pid, pidfd, adopted, .. } = &vm.vmm {
        // A pidfd turns readable when its process exits; a VMM stuck in uninterruptible
        // I/O must not stall the broker for long, so the VM stays held for another try.
        let (pid, adopted) = (*pid, *adopted);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        signal(vm, VmmSignal::Kill)?;
        if !matches!(poll(&mut fds, PollTimeout::from(RELEASE_WAIT_MS)), Ok(n) if n > 0) {
            return Err(Refusal::StillAlive { pid, ms: RELEASE_WAIT_MS });
        }
        // An adopted VMM is reaped by its own parent, not here.
        let status = match adopted {
            true => ExitStatus::Signal(libc::SIGKILL),
            false => waitpid(Pid::from_raw(pid as i32), None)
                .map_err(Refusal::vmm(format!("reap VMM {pid}")))
                .map(|s| exit_status(s).map_or(ExitStatus::Signal(libc::SIGKILL), |s| s.1))?,
        };
        reaped(b, pid, status);
    }
    Ok(())
}

/// Kills the VMM if alive, deletes the taps, undoes the image grants and removes the runtime
/// dir. A VM the broker does not hold is already released.
pub fn release(b: &mut Broker, id: &str) -> Result<(), Refusal> {
    stop(b, id)?;
    // Each step that fails stays recorded, so that the next release tries it again.
    let Some(vm) = b.vms.get_mut(id) else { return Ok(()) };
    let mut errors: Vec<String> = Vec::new();
    for t in std::mem::take(&mut vm.taps) {
        if let Err(e) = crate::tap::delete(&t.name, t.fd) {
            errors.push(e);
            // Kept, so that the next release deletes it by name.
            vm.taps.push(crate::table::Tap { name: t.name, mac: None, fd: None });
        }
    }
    vm.grants.retain(|g| revoke(g, &mut b.acls).map_err(|e| errors.push(e)).is_err());
    errors.extend(remove_run_dir(b, id).err());
    if !errors.is_empty() {
        return Err(Refusal::Release { vm: id.to_string(), steps: errors.join("; ") });
    }
    b.vms.remove(id);
    Ok(())
}
/// Releases each VM of `ids`; a failure is logged as `failed` and the VM stays held.
pub fn release_each(b: &mut Broker, ids: Vec<String>, failed: &str) {
    for id in ids {
        if let Err(e) = release(b, &id) {
            tracing::error!(vm = %id, error = %e, "{failed}");
        }
    }
}

/// The live VMM's sandbox: the report stored at spawn, trusted only as a regular root-owned
/// file with one link (the VM uid cannot make one), and the kernel's view of the process.
pub fn sandbox(vm: &Vm) -> Handled {
    use my_hypervisor_policy::observed::{MAX_REPORT, MAX_STATUS, applied, check_report_node};
    use std::io::Read;
    let Vmm::Alive { pid, .. } = &vm.vmm else { return Err(Refusal::Vmm("no live VMM".into())) };
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let file = std::fs::File::from(openat(vm.dir.as_fd(), SANDBOX_REPORT, flags, Mode::empty())?);
    let st = fstat(file.as_fd())?;
    check_report_node(SANDBOX_REPORT, st.st_mode, st.st_uid, st.st_nlink as u64).map_err(Refusal::Vmm)?;
    let mut planned = String::new();
    file.take(MAX_REPORT as u64).read_to_string(&mut planned)?;
    let mut status = String::new();
    std::fs::File::open(format!("/proc/{pid}/status"))?.take(MAX_STATUS as u64).read_to_string(&mut status)?;
    Ok((Reply::Sandbox { planned, applied: applied(&status) }, vec![]))
}
