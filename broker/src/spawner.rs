//! The spawn helper. Forked from the broker before the broker's seccomp filter goes on, it
//! is the only process that forks and execs. It takes orders from the broker alone, over a
//! socketpair made before any frontend existed, and starts exactly two kinds of program:
//! the frontend binary and the VMM launcher, each as its own unprivileged uid.
//!
//! Each program is started from a short-lived intermediate child, so that it is re-parented
//! to the broker (a child subreaper), which reaps it and reports its exit.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use my_hypervisor_broker_proto::{Envelope, PROTOCOL_VERSION, WireError, recv, send};
use my_hypervisor_policy::layout::Ids;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, fork, pipe2};
use serde::{Deserialize, Serialize};

use crate::unpriv::{drop_privileges, enter_vmm_namespaces, place_fds, reset_signals};

#[derive(Debug, Serialize, Deserialize)]
pub enum Order {
    /// fds: the RPC listener and the frontend's end of a new broker channel.
    Frontend,
    /// fds: the VMM log (stdout and stderr), then the VMM's own fds from fd 3 up. `spec` is
    /// the VM's `SandboxSpec` as JSON, for the launcher.
    Vmm { uid: u32, run_dir: String, spec: String, ch_argv: Vec<String> },
}

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

/// Fd numbers below this are kept occupied in the helper, so that every fd it receives or
/// opens (the kept fds, the pipes that report a failed start) lies above every number a
/// child's keep-list moves fds to, and moving them can never overwrite one.
const FD_FLOOR: i32 = 16;

/// The helper's loop; returns when the broker closes the channel.
pub fn serve(chan: OwnedFd, cfg: SpawnerConfig) -> Result<(), String> {
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
        let (env, fds) = match recv::<Order>(&chan) {
            Ok(m) => m,
            Err(WireError::Closed) => return Ok(()),
            Err(e) => return Err(format!("order: {e}")),
        };
        let outcome = start(&cfg, env.body, fds);
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "spawn failed");
        }
        let reply = Envelope { version: PROTOCOL_VERSION, id: env.id, fds: 0, body: outcome };
        send(&chan, reply, &[]).map_err(|e| format!("reply: {e}"))?;
    }
}

fn start(cfg: &SpawnerConfig, order: Order, fds: Vec<OwnedFd>) -> Outcome {
    match order {
        Order::Frontend => {
            let [listen, chan] = <[OwnedFd; 2]>::try_from(fds).map_err(|_| "frontend order needs 2 fds")?;
            crate::frontend::spawn(cfg, listen, chan)
        }
        Order::Vmm { uid, run_dir, spec, ch_argv } => {
            let mut fds = fds.into_iter();
            let log = fds.next().ok_or("vmm order needs a log fd")?;
            let rest: Vec<OwnedFd> = fds.collect();
            let mut cmd = Command::new(&cfg.launcher.path);
            cmd.args(["--spec", &spec, "--"])
                .args(&ch_argv)
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log);
            let keep = rest.iter().enumerate().map(|(i, fd)| (fd.as_raw_fd(), 3 + i as i32)).collect();
            start_detached(cmd, &cfg.launcher, keep, Ids { uid, gid: uid }, Some(run_dir))
        }
    }
}

/// Starts `prog` (with `cmd`'s arguments and stdio) as `ids` with exactly `keep` (plus
/// stdio) inherited, from an intermediate child that exits at once; for a VMM (`vmm_dir`
/// set), inside fresh namespaces first. Returns the program's pid once it has exec'd.
fn start_detached(
    mut cmd: Command,
    prog: &Program,
    keep: Vec<(i32, i32)>,
    ids: Ids,
    vmm_dir: Option<String>,
) -> Outcome {
    cmd.env_clear();
    let argv: Vec<CString> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| CString::new(a.as_bytes()).map_err(|_| "NUL in an argument".to_string()))
        .collect::<Result<_, _>>()?;
    let exe = prog.fd.as_raw_fd();
    // One line comes back on this pipe: the step that failed in the child, or the outcome
    // of the spawn from the intermediate child. A successful exec closes it (CLOEXEC).
    let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let report = w.as_raw_fd();
    // SAFETY: the spawn helper is single-threaded, so the forked child may allocate; the
    // closure only moves fds, builds the VMM's namespaces and drops privileges, then execs
    // through the pinned handle. A failure is written to the report pipe with its step.
    unsafe {
        cmd.pre_exec(move || {
            let r = prepare_child(&keep, vmm_dir.as_deref(), ids).and_then(|()| {
                let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
                ptrs.push(std::ptr::null());
                let env: [*const libc::c_char; 1] = [std::ptr::null()];
                libc::syscall(libc::SYS_execveat, exe, c"".as_ptr(), ptrs.as_ptr(), env.as_ptr(), libc::AT_EMPTY_PATH);
                Err(std::io::Error::other(format!("exec: {}", std::io::Error::last_os_error())))
            });
            if let Err(e) = &r {
                let line = format!("err {e}\n");
                libc::write(report, line.as_ptr().cast(), line.len());
            }
            r
        });
    }
    // SAFETY: single-threaded process; the child only spawns, writes one line and exits.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(r);
            let line = match cmd.spawn() {
                Ok(child) => format!("ok {}\n", child.id()),
                Err(e) => format!("err {}: {e}\n", cmd.get_program().to_string_lossy()),
            };
            let _ = nix::unistd::write(&w, line.as_bytes());
            // SAFETY: leave without running the parent's destructors or atexit handlers.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(w);
            let mut line = String::new();
            let read = std::fs::File::from(r).read_to_string(&mut line);
            let _ = waitpid(child, None);
            read.map_err(|e| format!("read spawn result: {e}"))?;
            let line = line.lines().next().unwrap_or_default();
            match line.split_once(' ') {
                Some(("ok", pid)) => pid.parse().map_err(|e| format!("spawn result {line:?}: {e}")),
                Some(("err", e)) => Err(e.to_string()),
                _ => Err(format!("spawn result {line:?}")),
            }
        }
    }
}

/// Everything between fork and exec, in order.
fn prepare_child(keep: &[(i32, i32)], vmm_dir: Option<&str>, ids: Ids) -> std::io::Result<()> {
    reset_signals()?;
    place_fds(keep)?;
    if let Some(dir) = vmm_dir {
        enter_vmm_namespaces(ids.uid, dir)?;
    }
    drop_privileges(ids)
}

/// The broker's side: hands one order and its fds to the helper and waits for the outcome.
pub fn order(chan: &OwnedFd, order: Order, fds: &[OwnedFd]) -> Outcome {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let env = Envelope { version: PROTOCOL_VERSION, id: 0, fds: 0, body: order };
    send(chan, env, &raw).map_err(|e| format!("spawn helper: {e}"))?;
    let (reply, _) = recv::<Outcome>(chan).map_err(|e| format!("spawn helper: {e}"))?;
    reply.body
}
