//! A stand-in frontend for broker tests. The daemon starts it exactly as it starts the real
//! frontend, in the same sandbox, so it reaches the test only through the fds it is given: it
//! accepts clients on the RPC listener (fd 3) and hands each its broker channel (fd 4). Then it
//! serves that client one command a line until the client hangs up:
//! - `fork`: forks a child that keeps serving the listener (answering `stale`); `forked <n>`;
//! - `try <attempt>`: runs the attempt in a forked child and answers how it ended: `ok`,
//!   `err <errno>` or `killed <signal>`. Attempts: `tcp <port>` (connect to 127.0.0.1),
//!   `userns` (unshare a user namespace), `clone-userns` (clone into one), `mount` (a tmpfs),
//!   `read <path>`, `write <path>`.
//!
//! It exits when the broker channel closes, as the real frontend does.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};

const LISTEN_FD: i32 = 3;
const BROKER_FD: i32 = 4;

fn main() {
    // SAFETY: fd 3 is the inherited listener, owned by nothing else in this process.
    let listener = unsafe { UnixListener::from_raw_fd(LISTEN_FD) };
    // SAFETY: fd 4 stays open for the life of the process.
    let broker = unsafe { BorrowedFd::borrow_raw(BROKER_FD) };
    loop {
        if !wait_readable(listener.as_fd(), broker) {
            return;
        }
        let Ok((client, _)) = listener.accept() else { continue };
        let fds = [BROKER_FD];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        if sendmsg::<()>(client.as_raw_fd(), &[IoSlice::new(b"fd")], &cmsg, MsgFlags::MSG_NOSIGNAL, None).is_ok() {
            serve(client, &listener, broker);
        }
    }
}

/// Waits until `fd` is readable; false once the broker channel has hung up.
fn wait_readable(fd: BorrowedFd, broker: BorrowedFd) -> bool {
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN), PollFd::new(broker, PollFlags::empty())];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        if fds[1].revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)) {
            return false;
        }
        if fds[0].any().unwrap_or(false) {
            return true;
        }
    }
}

fn serve(client: UnixStream, listener: &UnixListener, broker: BorrowedFd) {
    let mut out = client.try_clone().expect("clone the client");
    let mut lines = BufReader::new(client);
    let mut forks = 0;
    loop {
        if lines.buffer().is_empty() && !wait_readable(lines.get_ref().as_fd(), broker) {
            std::process::exit(0);
        }
        let mut line = String::new();
        if lines.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["fork"] => {
                // SAFETY: this process is single-threaded.
                if let ForkResult::Child = unsafe { fork() }.expect("fork") {
                    stale(listener)
                }
                forks += 1;
                format!("forked {forks}")
            }
            ["try", attempt @ ..] => try_in_child(attempt),
            _ => format!("unknown command {line:?}"),
        };
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

/// A forked child that outlives nothing: it answers whoever it accepts with `stale`.
fn stale(listener: &UnixListener) -> ! {
    loop {
        if let Ok((mut c, _)) = listener.accept() {
            let _ = c.write_all(b"stale\n");
        }
    }
}

fn try_in_child(attempt: &[&str]) -> String {
    // SAFETY: this process is single-threaded; the child only runs the attempt and exits.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = match attempt_once(attempt) {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(255).clamp(1, 255),
            };
            // SAFETY: leave at once, flushing nothing the parent also holds.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => "ok".into(),
            Ok(WaitStatus::Exited(_, code)) => format!("err {code}"),
            Ok(WaitStatus::Signaled(_, sig, _)) => format!("killed {}", sig as i32),
            other => format!("wait: {other:?}"),
        },
    }
}

fn attempt_once(attempt: &[&str]) -> std::io::Result<()> {
    let os = std::io::Error::last_os_error;
    match attempt {
        ["tcp", port] => {
            let port: u16 = port.parse().map_err(std::io::Error::other)?;
            std::net::TcpStream::connect(("127.0.0.1", port)).map(drop)
        }
        // SAFETY: plain syscall with an integer argument.
        ["userns"] => (unsafe { libc::unshare(libc::CLONE_NEWUSER) } == 0).then_some(()).ok_or_else(os),
        ["clone-userns"] => {
            // SAFETY: a fork-like clone; the child leaves at once without touching memory.
            match unsafe { libc::syscall(libc::SYS_clone, libc::CLONE_NEWUSER | libc::SIGCHLD, 0, 0, 0, 0) } {
                0 => unsafe { libc::_exit(0) },
                r if r < 0 => Err(os()),
                _ => Ok(()),
            }
        }
        ["mount"] => {
            // SAFETY: C string literals; the kernel only reads them.
            let r = unsafe { libc::mount(c"tmpfs".as_ptr(), c"/tmp".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
            (r == 0).then_some(()).ok_or_else(os)
        }
        ["read", path] => std::fs::read(path).map(drop),
        ["write", path] => std::fs::write(path, b"probe"),
        _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
    }
}
