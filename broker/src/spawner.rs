//! The spawn helper. Forked from the broker before the broker's seccomp filter goes on, it
//! is the only process that forks and execs. It takes orders from the broker alone, over a
//! socketpair made before any frontend existed, and starts exactly two kinds of program:
//! the frontend binary and the VMM launcher, each as its own unprivileged uid.
//!
//! Each program is started by clone3 with CLONE_PARENT, so that it is the broker's own child:
//! the broker reaps it and reports its exit, and holds the pidfd the clone returned.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use my_hypervisor_broker_proto::{Envelope, PROTOCOL_VERSION, WireError, recv, send};
use my_hypervisor_policy::elf::closure;
use my_hypervisor_policy::frontend::{NAMESPACES, REPORT_FD, keep_list};
use my_hypervisor_policy::layout::Ids;
use my_hypervisor_policy::sandbox::{VMM_CLONE_FLAGS, VmmRoot, c_argv, check_keep_list, launcher_args, vmm_order_fds};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::pipe2;
use serde::{Deserialize, Serialize};

use crate::unpriv::{drop_privileges, enter_vmm_namespaces, place_fds, reset_signals, run_dir_tmpfs, sys};

#[derive(Debug, Serialize, Deserialize)]
pub enum Order {
    /// fds: the RPC listener and the frontend's end of a new broker channel.
    Frontend,
    /// fds: the VMM log (stdout and stderr), then the VMM's own fds from fd 3 up, then one fd
    /// per entry of `binds`, (path, writable), bound into its minimal root: its images and
    /// its runtime dir. `spec` is the VM's `SandboxSpec` as JSON, for the launcher.
    Vmm { uid: u32, spec: String, ch_argv: Vec<String>, binds: Vec<(String, bool)> },
    /// fd: a VM's run dir. Mount its tmpfs, owned by `uid`; or with none, unmount it.
    RunDir { uid: Option<u32> },
}

/// The helper's answer: the pid, with its pidfd attached; or why the start failed.
pub type Outcome = Result<u32, String>;

pub struct SpawnerConfig {
    pub frontend: Program,
    /// The frontend launcher's argv (`FrontendPlan::launcher_argv`).
    pub frontend_argv: Vec<CString>,
    pub frontend_launcher: Program,
    pub frontend_ids: Ids,
    pub launcher: Program,
}

/// A program the helper starts, pinned at daemon start: it is exec'd through this handle
/// (execveat with AT_EMPTY_PATH), so the unprivileged uid needs no search permission on the
/// directories above it, and replacing the file later changes nothing.
pub struct Program {
    pub path: PathBuf,
    pub fd: OwnedFd,
}

impl Program {
    pub fn open(path: PathBuf) -> Result<Program, String> {
        let fd = nix::fcntl::open(&path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Program { path, fd })
    }
}

/// Every fd the helper holds lies at or above this number: its channel and the programs'
/// handles are moved there at start, and the numbers below are kept occupied, so that every
/// fd it receives or opens (the kept fds, the pipes that report a failed start) lands there
/// too. A child's keep-list moves fds to numbers below it (`start_detached` checks), so
/// moving them can never overwrite one, the launcher's handle least of all.
const FD_FLOOR: i32 = 64;

/// `fd` moved to FD_FLOOR or above; the old number is closed.
fn above_floor(fd: OwnedFd) -> Result<OwnedFd, String> {
    // SAFETY: F_DUPFD_CLOEXEC only creates a new fd, which is owned here from now on.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, FD_FLOOR) };
    if n < FD_FLOOR {
        return Err(format!("move fd {} above {FD_FLOOR}: {}", fd.as_raw_fd(), std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// The helper's loop; returns when the broker closes the channel.
pub fn serve(chan: OwnedFd, mut cfg: SpawnerConfig) -> Result<(), String> {
    let chan = &above_floor(chan)?;
    cfg.frontend.fd = above_floor(cfg.frontend.fd)?;
    cfg.launcher.fd = above_floor(cfg.launcher.fd)?;
    cfg.frontend_launcher.fd = above_floor(cfg.frontend_launcher.fd)?;
    // Nothing else inherited from the daemon stays open below the floor.
    // SAFETY: closes fds no one in this fresh process uses; what it holds is above the floor.
    let r = unsafe { libc::close_range(3, FD_FLOOR as u32 - 1, 0) };
    sys("close inherited fds", r.into()).map_err(|e| e.to_string())?;
    let held = [chan, &cfg.frontend.fd, &cfg.launcher.fd, &cfg.frontend_launcher.fd].map(|f| f.as_raw_fd());
    assert!(held.iter().all(|&fd| fd >= FD_FLOOR), "the spawn helper's fds lie above {FD_FLOOR}: {held:?}");
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    for fd in 3..FD_FLOOR {
        // SAFETY: F_GETFD only asks whether `fd` is open; dup3 fills a free number with a
        // close-on-exec copy of /dev/null that is never closed.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) < 0 && libc::dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC) < 0 {
                return Err(format!("reserve fd {fd}: {}", std::io::Error::last_os_error()));
            }
        }
    }
    loop {
        let (env, fds) = match recv::<Order>(chan) {
            Ok(m) => m,
            Err(WireError::Closed) => return Ok(()),
            Err(e) => return Err(format!("order: {e}")),
        };
        let started = start(&cfg, env.body, fds).inspect_err(|e| tracing::error!(error = %e, "order failed"));
        let (body, pidfd) = match started {
            Ok(s) => (Ok(s.as_ref().map_or(0, |s| s.pid)), s.map(|s| s.pidfd)),
            Err(e) => (Err(e), None),
        };
        let reply = Envelope { version: PROTOCOL_VERSION, id: env.id, fds: 0, body };
        let raw: Vec<i32> = pidfd.iter().map(|f| f.as_raw_fd()).collect();
        send(chan, reply, &raw).map_err(|e| format!("reply: {e}"))?;
    }
}

/// Carries out one order: a started program, or `None` for a run dir (un)mount.
fn start(cfg: &SpawnerConfig, order: Order, fds: Vec<OwnedFd>) -> Result<Option<Started>, String> {
    match order {
        Order::Frontend => {
            let [listen, chan] = <[OwnedFd; 2]>::try_from(fds).map_err(|_| "frontend order needs 2 fds")?;
            // The launcher reports a failed step on REPORT_FD until it execs the frontend
            // through EXE_FD.
            let keep = keep_list(listen.as_raw_fd(), chan.as_raw_fd(), cfg.frontend.fd.as_raw_fd());
            let (argv, ids) = (cfg.frontend_argv.clone(), cfg.frontend_ids);
            start_detached(argv, &cfg.frontend_launcher, keep, ids, NAMESPACES, None, Some(REPORT_FD)).map(Some)
        }
        Order::RunDir { uid } => run_dir_tmpfs(uid, fds.first().ok_or("run dir order needs a dir fd")?).map(|()| None),
        Order::Vmm { uid, spec, ch_argv, binds } => {
            // The new root holds CH's and the launcher's ELF closure, but not the launcher
            // itself: it is exec'd through its pinned handle.
            let launcher = cfg.launcher.path.to_string_lossy();
            let ch = ch_argv.first().ok_or("vmm order has no cloud-hypervisor")?;
            let mut files = closure(&[ch, &launcher], |p| std::fs::read(p).ok()).map_err(|e| e.to_string())?;
            files.retain(|f| *f != launcher);
            let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
            let (keep, binds) = vmm_order_fds(&raw, binds)?;
            let argv = c_argv(cfg.launcher.path.as_os_str(), launcher_args(spec, ch_argv))?;
            let (ids, root) = (Ids { uid, gid: uid }, VmmRoot { files, binds });
            start_detached(argv, &cfg.launcher, keep, ids, VMM_CLONE_FLAGS, Some(root), None).map(Some)
        }
    }
}

/// A started program: its pid in the broker's PID namespace, and a pidfd of it.
pub struct Started {
    pub pid: u32,
    pub pidfd: OwnedFd,
}

/// Forks like fork(2), but through clone3 with `ns_flags` (CLONE_NEW* flags only, such as
/// `sandbox::VMM_CLONE_FLAGS`): the child
/// is the caller's sibling (CLONE_PARENT), so the broker, the helper's parent and a
/// subreaper, reaps it directly; with CLONE_NEWPID it is PID 1 of a new PID namespace. The
/// caller gets the child's pid and a pidfd of it (CLONE_PIDFD, close-on-exec), the child
/// `None`. Used for the VMMs and the frontend.
///
/// # Safety
/// As for fork(2): the caller must be single-threaded, so that the child may allocate.
pub unsafe fn fork_sibling(ns_flags: u64) -> std::io::Result<Option<Started>> {
    let mut pidfd: libc::c_int = -1;
    // `struct clone_args` v0: flags, pidfd, child_tid, parent_tid, exit_signal, stack,
    // stack_size, tls. exit_signal must be 0 with CLONE_PARENT: the child inherits the
    // helper's own, SIGCHLD, which the broker reads.
    let flags = ns_flags | libc::CLONE_PARENT as u64 | libc::CLONE_PIDFD as u64;
    let args: [u64; 8] = [flags, &mut pidfd as *mut libc::c_int as u64, 0, 0, 0, 0, 0, 0];
    // SAFETY: clone3 without CLONE_VM or a stack is a fork: the child runs on a copy of this
    // stack and memory. `args` and `pidfd` outlive the call; the kernel writes only `pidfd`.
    match sys("clone3", unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), std::mem::size_of_val(&args)) })? {
        0 => Ok(None),
        // SAFETY: the kernel just stored this new fd for us (CLONE_PIDFD).
        pid => Ok(Some(Started { pid: pid as u32, pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) } })),
    }
}

/// Starts `prog` with `argv` as `ids`, with exactly /dev/null as stdin and `keep` inherited, from
/// a clone with `ns_flags` that is the broker's child; for a VMM (`vmm` set), inside its
/// mount and network namespaces and its minimal root too. Returns once the program has exec'd;
/// with `report` set, once the program has closed that fd, where it may report a failed step
/// of its own (the frontend launcher does, until it execs the frontend).
fn start_detached(
    argv: Vec<CString>,
    prog: &Program,
    keep: Vec<(i32, i32)>,
    ids: Ids,
    ns_flags: u64,
    vmm: Option<VmmRoot>,
    report: Option<i32>,
) -> Result<Started, String> {
    check_keep_list(&keep, FD_FLOOR)?;
    let exe = prog.fd.as_raw_fd();
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    let mut keep: Vec<(i32, i32)> = std::iter::once((null.as_raw_fd(), 0)).chain(keep).collect();
    // One line comes back on this pipe: the step that failed in the child. A successful exec
    // closes it (CLOEXEC) with nothing written.
    let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    keep.extend(report.map(|fd| (w.as_raw_fd(), fd)));
    // SAFETY: the spawn helper is single-threaded.
    let started = match unsafe { fork_sibling(ns_flags) }.map_err(|e| e.to_string())? {
        Some(started) => started,
        None => {
            drop(r);
            let err = prepare_child(&keep, vmm.as_ref(), ids).and_then(|()| {
                let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
                ptrs.push(std::ptr::null());
                let env: [*const libc::c_char; 1] = [std::ptr::null()];
                let (path, flags) = (c"".as_ptr(), libc::AT_EMPTY_PATH);
                // SAFETY: argv and env are NUL-terminated arrays of C strings that outlive
                // the call; `exe` is the pinned O_PATH handle.
                unsafe { libc::syscall(libc::SYS_execveat, exe, path, ptrs.as_ptr(), env.as_ptr(), flags) };
                Err::<(), _>(std::io::Error::other(format!("exec: {}", std::io::Error::last_os_error())))
            });
            if let Err(e) = err {
                let _ = nix::unistd::write(&w, format!("{}: {e}\n", prog.path.display()).as_bytes());
            }
            // SAFETY: leave without running the helper's destructors or atexit handlers.
            unsafe { libc::_exit(127) }
        }
    };
    drop(w);
    let mut line = String::new();
    std::fs::File::from(r).read_to_string(&mut line).map_err(|e| format!("read spawn result: {e}"))?;
    // A line: the child exited; the broker reaps it as a child that is no VMM.
    line.lines().next().map_or(Ok(started), |e| Err(e.to_string()))
}

/// Everything between fork and exec, in order.
fn prepare_child(keep: &[(i32, i32)], vmm: Option<&VmmRoot>, ids: Ids) -> std::io::Result<()> {
    reset_signals()?;
    place_fds(keep)?;
    vmm.map(|root| enter_vmm_namespaces(ids.uid, root)).transpose()?;
    drop_privileges(ids)
}

/// The broker's side: hands one order and its fds to the helper and waits for the outcome:
/// the started program's pid and pidfd.
pub fn order(chan: &OwnedFd, order: Order, fds: &[OwnedFd]) -> Result<Started, String> {
    let (pid, fds) = order_raw(chan, order, fds)?;
    Ok(Started { pid, pidfd: fds.into_iter().next().ok_or("spawn helper: no pidfd came with the pid")? })
}

/// Mounts (`uid` set) or unmounts the tmpfs of the VM run dir `dir`, through the helper.
pub fn run_dir(chan: &OwnedFd, uid: Option<u32>, dir: OwnedFd) -> Result<(), String> {
    order_raw(chan, Order::RunDir { uid }, &[dir]).map(drop)
}

fn order_raw(chan: &OwnedFd, order: Order, fds: &[OwnedFd]) -> Result<(u32, Vec<OwnedFd>), String> {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let env = Envelope { version: PROTOCOL_VERSION, id: 0, fds: 0, body: order };
    send(chan, env, &raw).map_err(|e| format!("spawn helper: {e}"))?;
    let (reply, fds) = recv::<Outcome>(chan).map_err(|e| format!("spawn helper: {e}"))?;
    Ok((reply.body?, fds))
}
