//! Start-up, then the broker's one-threaded loop: serve the frontend's requests, reap
//! children, and restart the frontend with backoff whenever it exits.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use my_hypervisor_broker_proto::{
    Envelope, Event, ExitStatus, FromBroker, PROTOCOL_VERSION, Reply, Request, WireError, recv_keeping_fds, send,
};
use my_hypervisor_policy::daemon::Backoff;
use my_hypervisor_policy::sandbox::SandboxOptions;
use my_hypervisor_policy::seccomp;
use my_hypervisor_policy::vmm::exit_status;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::{Mode, umask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, geteuid};

use crate::cli::{Args, Config, resolve, sibling};
use crate::confine::{BROKER_CAPS, SPAWNER_CAPS, apply_broker_filter, keep_only};
use crate::dirs::{bind_rpc_socket, ensure_dir, open_dir, open_image_root};
use crate::spawner::{self, Order, Program, SpawnerConfig};
use crate::strays::Strays;
use crate::table::{Broker, serve};
use crate::{journal, vmm};

/// The frontend as the broker knows it from the spawn: its pid and uid are the audit
/// identity of every request on its channel.
struct Frontend {
    pid: Pid,
    uid: u32,
    started: Instant,
    channel: OwnedFd,
    serving: bool,
}

pub fn run(args: &Args) -> Result<(), String> {
    if !geteuid().is_root() {
        return Err("my_hypervisor-daemon must be started as root".into());
    }
    umask(Mode::from_bits_truncate(0o022));
    let cfg = resolve(args)?;
    args.dirs()?.into_iter().try_for_each(|(dir, role)| ensure_dir(dir, role, cfg.frontend))?;
    cfg.rpc_gid.map(|gid| crate::dirs::share_console_dir(&args.console_dir, cfg.frontend, gid)).transpose()?;
    let ch = crate::ch::check(args.cloud_hypervisor.as_deref(), cfg.frontend).inspect_err(
        |e| tracing::error!(error = %e, "no VM can start until cloud-hypervisor is fixed and the daemon restarted"),
    );
    let listener = bind_rpc_socket(&args.rpc_socket, cfg.rpc_gid)?;
    let image_roots = args.image_roots.iter().map(|r| open_image_root(r)).collect::<Result<_, String>>()?;
    let run_fd = open_dir(&args.run_dir, "open")?;
    // VMs held by an earlier broker (stopped, killed or crashed) are taken up again below; a
    // journal that cannot be read stops the start rather than hand uids, taps or disks out twice.
    let held = crate::adopt::read(&args.run_dir.join(journal::FILE), &cfg.vm_uids)?;
    // Every VMM costs the broker a few fds (grants, taps, its pidfd and outputs).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("getrlimit: {e}"))?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| format!("raise RLIMIT_NOFILE: {e}"))?;

    let strays = Strays::start(args.no_passrights)?;
    // Every process the spawn helper starts is re-parented to the broker, which reaps it.
    // SAFETY: plain prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    crate::unpriv::sys("become a child subreaper", r.into()).map_err(|e| e.to_string())?;
    let signals: SigSet = [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP].into_iter().collect();
    signals.thread_block().map_err(|e| format!("block signals: {e}"))?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))?;

    let notify = crate::notify::connect_notify()?;
    let (spawner, spawner_pid) = start_spawner(args, &cfg)?;
    keep_only(BROKER_CAPS).map_err(|e| format!("drop capabilities: {e}"))?;
    let mode = if args.seccomp_log { seccomp::Mode::Log } else { seccomp::Mode::Kill };
    apply_broker_filter(mode).map_err(|e| format!("seccomp: {e}"))?;
    tracing::info!(caps = ?BROKER_CAPS, seccomp = ?mode, "broker confined");

    let mut b = Broker {
        run_dir: args.run_dir.clone(),
        run_fd,
        image_roots,
        vm_uids: cfg.vm_uids.clone(),
        cloud_hypervisor: ch,
        notify,
        spawner,
        sandbox: SandboxOptions { seccomp: args.vmm_seccomp, landlock_best_effort: args.landlock_best_effort },
        allowed_bridges: args.allowed_bridges.clone(),
        vms: BTreeMap::new(),
        acls: Default::default(),
        journal_failed: false,
        strays,
    };
    crate::adopt::take_up(&mut b, held);
    journal::save(&b)?;
    // Fail closed: the first frontend must start, or the daemon does not run.
    let mut frontend = Some(start_frontend(&b, &cfg, &listener).map_err(|e| format!("start frontend: {e}"))?);
    let (mut backoff, mut restart_at) = (Backoff::default(), None::<Instant>);
    loop {
        let wait = |t: Instant| PollTimeout::try_from(t.saturating_duration_since(Instant::now()));
        let timeout = restart_at.map_or(PollTimeout::NONE, |t| wait(t).unwrap_or(PollTimeout::MAX));
        let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
        let serving = frontend.as_ref().filter(|f| f.serving);
        fds.extend(serving.map(|f| PollFd::new(f.channel.as_fd(), PollFlags::POLLIN)));
        let watched = crate::adopt::watched(&b);
        fds.extend(watched.iter().map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)));
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready = |f: Option<&PollFd>| f.and_then(|f| f.any()).unwrap_or(false);
        let (sig_ready, chan_ready) = (ready(fds.first()), serving.is_some() && ready(fds.get(1)));
        let skip = 1 + usize::from(serving.is_some());
        let ended: Vec<u32> =
            watched.iter().zip(&fds[skip..]).filter(|(_, f)| ready(Some(f))).map(|(w, _)| w.0).collect();
        drop(fds);
        for pid in ended {
            // The exit status of a VMM that is no child of this broker is unknown.
            if let Some(event) = vmm::reaped(&mut b, pid, ExitStatus::Unknown) {
                tracing::info!(?event, "adopted VMM exited");
                tell_frontend(&mut b, frontend.as_mut(), event);
            }
        }
        if chan_ready
            && let Some(f) = &mut frontend
            && let Err(e) = serve_one(&mut b, f)
        {
            f.drop_channel(&e, &b.strays);
        }
        if sig_ready {
            while let Ok(Some(info)) = sigfd.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGCHLD) | Err(_) => {}
                    Ok(sig) => return shut_down(&mut b, frontend.as_ref(), sig, args.stop_vms_on_exit),
                }
            }
            while let Ok(ws) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                let Some((pid, status)) = exit_status(ws) else { break };
                if pid == spawner_pid {
                    return Err(format!("the spawn helper exited ({status:?}); no VMM or frontend can start"));
                }
                if let Some(f) = frontend.take_if(|f| f.pid.as_raw() as u32 == pid) {
                    b.strays.drain(&f.channel);
                    restart_at = Some(Instant::now() + backoff.delay(f.started.elapsed()));
                    tracing::warn!(pid, ?status, restart = backoff.count, delay = ?backoff.next, "frontend exited; restarting it");
                } else if let Some(event) = vmm::reaped(&mut b, pid, status) {
                    tracing::info!(pid, ?status, ?event, "VMM exited");
                    tell_frontend(&mut b, frontend.as_mut(), event);
                } else {
                    tracing::debug!(pid, ?status, "reaped a child that is no VMM");
                }
            }
        }
        if restart_at.is_some_and(|t| Instant::now() >= t) {
            frontend = start_frontend(&b, &cfg, &listener)
                .inspect_err(|e| tracing::error!(error = %e, "frontend restart failed"))
                .ok();
            restart_at = frontend.is_none().then(|| Instant::now() + backoff.delay(Duration::ZERO));
        }
    }
}

/// Journals a VMM's exit and tells the frontend.
fn tell_frontend(b: &mut Broker, frontend: Option<&mut Frontend>, event: Event) {
    journal::commit(b).unwrap_or_else(|e| tracing::error!(error = %e, "journal"));
    if let Some(f) = frontend.filter(|f| f.serving)
        && let Err(e) = f.send(0, FromBroker::Event(event), &[])
    {
        f.drop_channel(&e, &b.strays);
    }
}

impl Frontend {
    /// Sends a reply (the request's id) or an event (id 0); an error means the channel must
    /// be dropped.
    fn send(&self, id: u64, body: FromBroker, fds: &[i32]) -> Result<(), WireError> {
        send(&self.channel, Envelope { version: PROTOCOL_VERSION, id, fds: 0, body }, fds)
    }

    /// Stops serving a frontend that broke the protocol or stopped reading. It is killed;
    /// its channel closes when it is reaped and replaced.
    fn drop_channel(&mut self, why: &dyn std::fmt::Display, strays: &Strays) {
        tracing::warn!(target: "audit", peer_pid = self.pid.as_raw(), peer_uid = self.uid, verdict = "drop-channel", reason = %why, "broker channel dropped; the frontend will be restarted");
        let _ = kill(self.pid, Signal::SIGKILL);
        self.serving = false;
        strays.drain(&self.channel);
    }
}

/// On SIGTERM, SIGINT or SIGHUP: the frontend is stopped and the journal written. VMs keep
/// running, for the next daemon to adopt (`adopt`). With `--stop-vms-on-exit`, the frontend
/// is told first (`Event::Shutdown`: it records its VMs stopped and exits, or is killed after
/// FRONTEND_SHUTDOWN), then every VM is released (its VMM killed, taps, grants and dirs
/// undone) before the daemon exits.
fn shut_down(b: &mut Broker, frontend: Option<&Frontend>, sig: Signal, stop_vms: bool) -> Result<(), String> {
    const FRONTEND_SHUTDOWN: Duration = Duration::from_secs(10);
    tracing::info!(signal = %sig, vms = b.vms.len(), stop_vms, "shutting down");
    if let Some(f) = frontend {
        let told =
            stop_vms && f.serving && !b.vms.is_empty() && f.send(0, FromBroker::Event(Event::Shutdown), &[]).is_ok();
        let end = Instant::now() + if told { FRONTEND_SHUTDOWN } else { Duration::ZERO };
        let mut alive = true;
        // Requests are still served meanwhile: an operation in flight may hold a VM's lock.
        while alive && Instant::now() < end {
            let mut fds = [PollFd::new(f.channel.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(20u8)).is_ok_and(|n| n > 0) && serve_one(b, f).is_err() {
                break;
            }
            alive = matches!(waitpid(f.pid, Some(WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive));
        }
        // Never signal a pid once reaped: it may name another process by now.
        if alive {
            let _ = kill(f.pid, if told { Signal::SIGKILL } else { Signal::SIGTERM });
        }
        b.strays.drain(&f.channel);
    }
    let ids: Vec<String> = if stop_vms { b.vms.keys().cloned().collect() } else { vec![] };
    vmm::release_each(b, ids, "release at shutdown failed");
    journal::save(b)
}

/// Receives, checks, dispatches, audits and answers one request. An error here means the
/// channel is malformed or broken and must be dropped. Fds on a request are never closed
/// here (`strays`).
fn serve_one(b: &mut Broker, f: &Frontend) -> Result<(), WireError> {
    let env = match recv_keeping_fds::<Request>(&f.channel) {
        (Err(WireError::WouldBlock), _) => return Ok(()),
        (r, fds) if fds.is_empty() => r?,
        (r, fds) => {
            let received = fds.len();
            b.strays.dispose(fds);
            // Requests never carry fds.
            return Err(r.err().unwrap_or(WireError::FdCount { declared: 0, received }));
        }
    };
    let req = env.body;
    let served = serve(b, &req).inspect(|_| {
        tracing::info!(target: "audit", peer_pid = f.pid.as_raw(), peer_uid = f.uid, request = ?req, verdict = "allow", "broker request");
    });
    let (reply, fds) = served.unwrap_or_else(|refusal| {
        tracing::warn!(target: "audit", peer_pid = f.pid.as_raw(), peer_uid = f.uid, request = ?req, verdict = "refuse", reason = %refusal, "broker request");
        (Reply::Refused { reason: refusal.to_string() }, vec![])
    });
    let raw: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    match f.send(env.id, FromBroker::Reply(reply), &raw) {
        // Our own reply would not fit: the frontend did nothing wrong.
        Err(WireError::TooLarge(n)) => {
            let body = FromBroker::Reply(Reply::Refused { reason: format!("the reply ({n} bytes) is too large") });
            f.send(env.id, body, &[])
        }
        // The channel is non-blocking: a frontend that stops reading is dropped, not waited for.
        r => r,
    }
}

/// Forks the spawn helper while the broker still has every capability and no filter. It
/// keeps the capabilities it needs to start unprivileged programs and nothing else.
fn start_spawner(args: &Args, cfg: &Config) -> Result<(OwnedFd, u32), String> {
    let (ours, theirs) = crate::strays::pair()?;
    let plan = args.frontend_plan(&cfg.frontend_bin);
    let frontend_launcher = Program::open(sibling("my_hypervisor-frontend-launcher")?)?;
    let frontend_argv = plan.launcher_argv(&frontend_launcher.path).map_err(|e| format!("frontend argv: {e}"))?;
    let sc = SpawnerConfig {
        frontend: Program::open(cfg.frontend_bin.clone())?,
        frontend_argv,
        frontend_ids: cfg.frontend,
        frontend_launcher,
        launcher: Program::open(cfg.launcher_bin.clone())?,
    };
    // SAFETY: no thread exists yet, so the child may do anything the parent could.
    match unsafe { fork() }.map_err(|e| format!("fork spawn helper: {e}"))? {
        ForkResult::Child => {
            drop(ours);
            let served = keep_only(SPAWNER_CAPS).and_then(|()| spawner::serve(theirs, sc));
            let served = served.inspect_err(|e| tracing::error!(error = %e, "spawn helper stopped"));
            std::process::exit(i32::from(served.is_err()))
        }
        ForkResult::Parent { child } => {
            tracing::info!(pid = child.as_raw(), caps = ?SPAWNER_CAPS, "spawn helper started");
            Ok((ours, child.as_raw() as u32))
        }
    }
}

/// Starts a frontend through the spawn helper: its own user, no capabilities,
/// no_new_privs, an empty environment, and exactly two inherited fds: the RPC listener and
/// its end of a fresh SOCK_SEQPACKET broker channel.
fn start_frontend(b: &Broker, cfg: &Config, listener: &UnixListener) -> Result<Frontend, String> {
    let (ours, theirs) = crate::strays::pair()?;
    let listen = listener.as_fd().try_clone_to_owned().map_err(|e| format!("dup listener: {e}"))?;
    nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|e| format!("channel: {e}"))?;
    b.strays.guard(&ours)?;
    let pid = Pid::from_raw(spawner::order(&b.spawner, Order::Frontend, &[listen, theirs])?.pid as i32);
    tracing::info!(pid = pid.as_raw(), uid = cfg.frontend.uid, gid = cfg.frontend.gid, "frontend started");
    Ok(Frontend { pid, uid: cfg.frontend.uid, started: Instant::now(), channel: ours, serving: true })
}
