//! Start-up and the broker's main loop: supervise the frontend, restarting it with backoff.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use my_hypervisor_policy::layout::DirRole;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::stat::{Mode, umask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, geteuid};

use crate::cli::{Args, Config, resolve};
use crate::dirs::{bind_rpc_socket, ensure_dir};
use crate::unpriv::{drop_privileges, place_fds};

/// The fd numbers the frontend finds its inheritance at.
const FRONTEND_LISTEN_FD: i32 = 3;
const FRONTEND_BROKER_FD: i32 = 4;
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A frontend that ran this long is healthy again: its next restart is immediate-ish.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

struct Frontend {
    pid: Pid,
    started: Instant,
    channel: OwnedFd,
}

pub fn run(args: &Args) -> Result<(), String> {
    if !geteuid().is_root() {
        return Err("my_hypervisor-daemon must be started as root".into());
    }
    umask(Mode::from_bits_truncate(0o022));
    let cfg = resolve(args)?;
    let socket_parent = args
        .rpc_socket
        .parent()
        .ok_or("the rpc socket needs a parent dir")?;
    ensure_dir(socket_parent, DirRole::SocketParent, cfg.frontend)?;
    ensure_dir(&args.state_dir, DirRole::State, cfg.frontend)?;
    ensure_dir(&args.console_dir, DirRole::Console, cfg.frontend)?;
    ensure_dir(&args.run_dir, DirRole::Run, cfg.frontend)?;
    for root in &args.image_roots {
        ensure_dir(root, DirRole::ImageRoot, cfg.frontend)?;
    }
    let listener = bind_rpc_socket(&args.rpc_socket, cfg.rpc_gid)?;

    let mut signals = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| format!("block signals: {e}"))?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))?;

    // Fail closed: the first frontend must start, or the daemon does not run.
    let mut frontend =
        Some(spawn_frontend(args, &cfg, &listener).map_err(|e| format!("start frontend: {e}"))?);
    let mut backoff = BACKOFF_FIRST;
    let mut restart_at: Option<Instant> = None;
    let mut restarts: u64 = 0;
    loop {
        let timeout = match restart_at {
            Some(t) => {
                PollTimeout::try_from(t.saturating_duration_since(Instant::now())).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
        if let Some(f) = &frontend {
            fds.push(PollFd::new(f.channel.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let sig_ready = fds[0].any().unwrap_or(false);
        let chan_ready = fds.get(1).and_then(|f| f.any()).unwrap_or(false);
        drop(fds);
        if chan_ready && let Some(f) = &frontend {
            // Requests come with #3; until then the channel only carries the hang-up.
            let mut buf = [0u8; 1];
            if matches!(nix::unistd::read(&f.channel, &mut buf), Ok(0) | Err(_)) {
                tracing::warn!(
                    pid = f.pid.as_raw(),
                    "broker channel closed; stopping the frontend"
                );
                let _ = kill(f.pid, Signal::SIGKILL);
            }
        }
        if sig_ready {
            while let Ok(Some(info)) = sigfd.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGCHLD) => {}
                    Ok(sig) => {
                        tracing::info!(signal = %sig, "shutting down");
                        if let Some(f) = &frontend {
                            let _ = kill(f.pid, Signal::SIGTERM);
                        }
                        return Ok(());
                    }
                    Err(_) => {}
                }
            }
            loop {
                let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(s) => s,
                };
                let Some(pid) = status.pid() else { continue };
                if frontend.as_ref().is_some_and(|f| f.pid == pid) {
                    let f = frontend.take().expect("checked above");
                    if f.started.elapsed() >= HEALTHY_AFTER {
                        backoff = BACKOFF_FIRST;
                    }
                    restarts += 1;
                    tracing::warn!(
                        pid = pid.as_raw(),
                        ?status,
                        restart = restarts,
                        delay_ms = backoff.as_millis() as u64,
                        "frontend exited; restarting it"
                    );
                    restart_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        if restart_at.is_some_and(|t| Instant::now() >= t) {
            restart_at = None;
            match spawn_frontend(args, &cfg, &listener) {
                Ok(f) => frontend = Some(f),
                Err(e) => {
                    tracing::error!(error = %e, "frontend restart failed");
                    restart_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Starts the frontend as its own user, with no capabilities, no_new_privs, an empty
/// environment and exactly two inherited fds: the RPC listener and its end of a fresh
/// SOCK_SEQPACKET broker channel.
fn spawn_frontend(args: &Args, cfg: &Config, listener: &UnixListener) -> Result<Frontend, String> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let mut cmd = Command::new(&cfg.frontend_bin);
    cmd.env_clear()
        .stdin(Stdio::null())
        .args(["--listen-fd", &FRONTEND_LISTEN_FD.to_string()])
        .args(["--broker-fd", &FRONTEND_BROKER_FD.to_string()])
        .arg("--state-dir")
        .arg(&args.state_dir)
        .arg("--console-dir")
        .arg(&args.console_dir)
        .args(["--log-format", args.log_format.as_str()]);
    let keep = [
        (listener.as_raw_fd(), FRONTEND_LISTEN_FD),
        (theirs.as_raw_fd(), FRONTEND_BROKER_FD),
    ];
    let ids = cfg.frontend;
    // SAFETY: the daemon is single-threaded, so the forked child may allocate; the closure
    // only moves fds and drops privileges before exec.
    unsafe {
        cmd.pre_exec(move || {
            place_fds(&keep)?;
            drop_privileges(ids)
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", cfg.frontend_bin.display()))?;
    let pid = Pid::from_raw(child.id() as i32);
    tracing::info!(
        pid = pid.as_raw(),
        uid = ids.uid,
        gid = ids.gid,
        "frontend started"
    );
    Ok(Frontend {
        pid,
        started: Instant::now(),
        channel: ours,
    })
}
