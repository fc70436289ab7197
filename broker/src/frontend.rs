//! Starts the frontend in its box: cloned straight into new mount, network, PID, IPC and UTS
//! namespaces (`policy::frontend::NAMESPACES`), where it is PID 1, so that its death ends
//! every process it forked; then, as the frontend's uid, through the frontend launcher, which
//! applies Landlock and seccomp and execs the pinned frontend binary.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};

use my_hypervisor_policy::frontend::{BROKER_FD, EXE_FD, LISTEN_FD, NAMESPACES, REPORT_FD};

use crate::spawner::{Outcome, SpawnerConfig};
use crate::unpriv::{drop_privileges, place_fds, reset_signals};

/// Returns the frontend's pid once the launcher has exec'd it, or the step that failed: the
/// launcher reports on the same pipe until it execs the frontend.
pub fn spawn(cfg: &SpawnerConfig, listen: OwnedFd, chan: OwnedFd) -> Outcome {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let fds = [&listen, &chan, &cfg.frontend.fd, &w].map(|f| f.as_raw_fd());
    let keep = [(fds[0], LISTEN_FD), (fds[1], BROKER_FD), (fds[2], EXE_FD), (fds[3], REPORT_FD)];
    let pid = clone3(NAMESPACES).map_err(|e| format!("clone3 into the frontend's namespaces: {e}"))?;
    if pid == 0 {
        let line = format!("{}\n", child(&keep, cfg));
        // SAFETY: writes a buffer to the report pipe, then leaves without running the
        // helper's destructors or atexit handlers.
        unsafe {
            libc::write(w.as_raw_fd(), line.as_ptr().cast(), line.len());
            libc::_exit(127)
        }
    }
    drop(w);
    let mut line = String::new();
    std::fs::File::from(r).read_to_string(&mut line).map_err(|e| format!("read spawn result: {e}"))?;
    if line.is_empty() { Ok(pid as u32) } else { Err(line.trim_end().to_string()) }
}

/// Between clone and exec, in the new namespaces: the kept fds in place, every privilege
/// shed, then exec of the launcher through its pinned handle. Nothing is mounted in the new
/// mount namespace, and the frontend can mount nothing (no capability, seccomp).
fn child(keep: &[(i32, i32)], cfg: &SpawnerConfig) -> io::Error {
    let r = reset_signals().and_then(|()| place_fds(keep)).and_then(|()| drop_privileges(cfg.frontend_ids));
    if let Err(e) = r {
        return e;
    }
    let mut ptrs: Vec<*const libc::c_char> = cfg.frontend_argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let (env, exe) = ([std::ptr::null::<libc::c_char>()], cfg.frontend_launcher.fd.as_raw_fd());
    // SAFETY: argv and env are NUL-terminated arrays of C strings that outlive the call.
    unsafe { libc::syscall(libc::SYS_execveat, exe, c"".as_ptr(), ptrs.as_ptr(), env.as_ptr(), libc::AT_EMPTY_PATH) };
    io::Error::other(format!("exec the frontend launcher: {}", io::Error::last_os_error()))
}

/// clone3(2) with `flags` and no new stack, like fork(2): 0 in the child, its pid (in the
/// caller's PID namespace) in the caller. CLONE_PARENT makes the broker, a subreaper, the
/// child's parent: it reaps the frontend and gets SIGCHLD when it exits.
fn clone3(flags: u64) -> io::Result<i32> {
    // struct clone_args (CLONE_ARGS_SIZE_VER2): flags first; exit_signal 0 takes the
    // caller's under CLONE_PARENT; no pidfd, tids, stack, tls, set_tid or cgroup.
    let args = [flags | libc::CLONE_PARENT as u64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0u64];
    // SAFETY: the helper is single-threaded, so the child, a copy of it on a copy of its
    // stack, may do what a forked child may; the kernel only reads `args`.
    let r = unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), std::mem::size_of_val(&args)) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as i32) }
}
