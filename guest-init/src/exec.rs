//! Runs one command for a connection: its own process group, the requested argv, env, cwd
//! and stdin; output streamed in bounded frames; cancel or timeout sends SIGTERM to the
//! group, then SIGKILL.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use my_hypervisor_exec_proto::{
    DEFAULT_MAX_OUTPUT_BYTES, ExecRequest, ExitStatus, ExitSummary, GuestFrame, MAX_CHUNK, Outcome,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::reaper::Reaper;

/// Between SIGTERM and SIGKILL on cancel or timeout.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long the output readers may take after the command is gone (a process outside the
/// group may still hold a pipe).
const DRAIN_WAIT: Duration = Duration::from_secs(2);

static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Execs that have not yet sent their exit frame.
pub fn active() -> usize {
    ACTIVE.load(Ordering::SeqCst)
}

struct ActiveGuard;

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the connection's reader passes on while a command runs.
pub enum Input {
    Stdin(Vec<u8>),
    StdinEnd,
    Cancel,
    /// The connection closed or broke: treat as cancel.
    Gone,
}

/// Frames to the host, shared by a connection's exec and health answers. After a write
/// fails the connection is broken and later frames are dropped.
pub struct Sink<W: Write> {
    inner: Mutex<(W, bool)>,
}

impl<W: Write> Sink<W> {
    pub fn new(w: W) -> Self {
        Sink { inner: Mutex::new((w, false)) }
    }

    pub fn send(&self, frame: &GuestFrame) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 {
            return false;
        }
        match my_hypervisor_exec_proto::write_frame(&mut g.0, frame) {
            Ok(()) => true,
            Err(e) => {
                log!("my_hypervisor-init: writing to the host: {e}");
                g.1 = true;
                false
            }
        }
    }
}

/// One exec's output: once the exit frame is sent, late output (from a reader still
/// draining a pipe) is dropped, so nothing of this exec follows its exit frame.
struct ExecOut<W: Write> {
    sink: Arc<Sink<W>>,
    open: Mutex<bool>,
}

impl<W: Write> ExecOut<W> {
    fn send(&self, frame: &GuestFrame) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if *open {
            self.sink.send(frame);
        }
    }

    fn send_last(&self, frame: &GuestFrame) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        *open = false;
        self.sink.send(frame);
    }
}

#[derive(Default, Clone, Copy)]
struct Counted {
    total: u64,
    truncated: bool,
}

/// Runs `req` to its end and sends its frames; the caller has validated it. `finished` is
/// set just before the last frame goes out.
pub fn run<W: Write + Send + 'static>(
    req: &ExecRequest,
    reaper: &Reaper,
    sink: &Arc<Sink<W>>,
    input: &Receiver<Input>,
    finished: &AtomicBool,
) {
    ACTIVE.fetch_add(1, Ordering::SeqCst);
    let _active = ActiveGuard;
    let started = Instant::now();
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    // SAFETY: the closure runs between fork and exec and only calls sigemptyset and
    // pthread_sigmask, which are async-signal-safe; the set lives on its own stack.
    unsafe { cmd.pre_exec(crate::signals::unblock_in_child) };
    let (mut child, pid) = match reaper.spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            let message = format!("cannot run {:?}: {e}", req.argv[0]);
            finished.store(true, Ordering::SeqCst);
            sink.send(&GuestFrame::Error { message });
            return;
        }
    };
    let out_gate = Arc::new(ExecOut { sink: Arc::clone(sink), open: Mutex::new(true) });
    out_gate.send(&GuestFrame::Started { pid: pid as u32 });

    let limit = req.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES);
    let (done_tx, done_rx) = mpsc::channel();
    let mut readers = 0;
    for (stream, is_out) in [
        (child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>), true),
        (child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>), false),
    ] {
        let Some(stream) = stream else { continue };
        let (sink, done) = (Arc::clone(&out_gate), done_tx.clone());
        readers += 1;
        thread::spawn(move || {
            let counted = pump(stream, limit, |chunk| {
                let data = chunk.to_vec();
                sink.send(&if is_out { GuestFrame::Stdout(data) } else { GuestFrame::Stderr(data) });
            });
            let _ = done.send((is_out, counted));
        });
    }
    drop(done_tx);
    let stdin = child.stdin.take();
    let stop = Arc::new(AtomicBool::new(false));
    let stdin_tx = stdin.map(|s| spawn_stdin_writer(s, Arc::clone(&stop)));

    let deadline = req.timeout_secs.map(|t| started + Duration::from_secs(u64::from(t)));
    let mut outcome = Outcome::Exited;
    let mut stdin_tx = stdin_tx;
    let status = loop {
        let tick = Instant::now() + Duration::from_millis(50);
        let until = deadline.map_or(tick, |d| d.min(tick));
        if let Some(st) = reaper.wait(pid, until) {
            break st;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            outcome = Outcome::TimedOut;
        }
        while outcome == Outcome::Exited {
            match input.try_recv() {
                Ok(Input::Stdin(data)) => {
                    if let Some(tx) = &stdin_tx {
                        let _ = tx.send(data);
                    }
                }
                Ok(Input::StdinEnd) => stdin_tx = None,
                Ok(Input::Cancel | Input::Gone) | Err(mpsc::TryRecvError::Disconnected) => outcome = Outcome::Cancelled,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if outcome != Outcome::Exited {
            stop.store(true, Ordering::Relaxed);
            break terminate(reaper, pid);
        }
    };
    drop(stdin_tx);
    stop.store(true, Ordering::Relaxed);

    let mut out = Counted::default();
    let mut err = Counted::default();
    let drain_until = Instant::now() + DRAIN_WAIT;
    for _ in 0..readers {
        let left = drain_until.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok((true, c)) => out = c,
            Ok((false, c)) => err = c,
            Err(_) => break,
        }
    }
    // Set before the last frame: once the host has it, the next request is not refused.
    finished.store(true, Ordering::SeqCst);
    out_gate.send_last(&GuestFrame::Exit(ExitSummary {
        status,
        outcome,
        stdout_bytes: out.total,
        stderr_bytes: err.total,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }));
}

/// SIGTERM to the group, the grace period, then SIGKILL; returns the leader's status.
fn terminate(reaper: &Reaper, pid: i32) -> ExitStatus {
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    if let Some(st) = reaper.wait(pid, Instant::now() + KILL_GRACE) {
        return st;
    }
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    loop {
        // SIGKILL cannot be refused; the reaper reports the leader within a tick.
        if let Some(st) = reaper.wait(pid, Instant::now() + Duration::from_secs(1)) {
            return st;
        }
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Reads `stream` to its end, passing on at most `limit` bytes in chunks of at most
/// [`MAX_CHUNK`]; the rest is read and counted but dropped, so the command never blocks.
fn pump(mut stream: Box<dyn Read + Send>, limit: u64, mut emit: impl FnMut(&[u8])) -> Counted {
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut c = Counted::default();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return c,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return c,
        };
        let room = limit.saturating_sub(c.total);
        let keep = usize::try_from(room).map_or(n, |r| r.min(n));
        if keep > 0 {
            emit(&buf[..keep]);
        }
        if keep < n {
            c.truncated = true;
        }
        c.total += n as u64;
    }
}

/// Feeds the command's stdin from its own thread, so a command that does not read cannot
/// stall the connection (a cancel must still get through).
fn spawn_stdin_writer(mut stdin: ChildStdin, stop: Arc<AtomicBool>) -> mpsc::Sender<Vec<u8>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    thread::spawn(move || {
        for chunk in rx {
            if stop.load(Ordering::Relaxed) || stdin.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pump_keeps_the_limit_and_counts_the_rest() {
        let data = vec![7u8; 4 * MAX_CHUNK + 5];
        let mut kept = Vec::new();
        let c = pump(Box::new(std::io::Cursor::new(data)), 100_000, |d| {
            assert!(d.len() <= MAX_CHUNK);
            kept.extend_from_slice(d);
        });
        assert_eq!(kept.len(), 100_000);
        assert_eq!(c.total, 4 * MAX_CHUNK as u64 + 5);
        assert!(c.truncated);
        let c = pump(Box::new(std::io::Cursor::new(vec![1u8; 10])), 10, |_| {});
        assert!(!c.truncated);
    }
}
