//! The exec service: accepts connections on vsock (in the guest) or a Unix socket (test
//! mode), checks the hello, then answers health and exec requests one at a time.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use my_hypervisor_exec_proto::{
    FrameDecoder, GuestFrame, HostFrame, MAX_FRAME_LEN, MAX_STDIN_BYTES, ProtoError, check_hello, guest_hello,
};
use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept4, bind, listen, socket};

use crate::exec::{self, Input, Sink};
use crate::reaper::Reaper;

/// The most connections served at once; more are refused with an error frame.
pub const MAX_CONNECTIONS: usize = 16;
/// A peer must finish its hello within this.
const HELLO_WAIT: Duration = Duration::from_secs(10);
/// A connection with no request in progress is closed after this.
const IDLE_WAIT: Duration = Duration::from_secs(300);
/// A peer that stops reading for this long is dropped.
const WRITE_WAIT: Duration = Duration::from_secs(30);
/// How often a blocked read wakes to check its deadline.
const READ_TICK: Duration = Duration::from_millis(250);

pub enum Listener {
    Unix(UnixListener),
    Vsock(OwnedFd),
}

impl Listener {
    pub fn vsock(port: u32) -> nix::Result<Listener> {
        let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(16)?)?;
        Ok(Listener::Vsock(fd))
    }

    fn accept(&self) -> io::Result<UnixStream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| s),
            Listener::Vsock(fd) => {
                let owned = accept4(fd, SockFlag::SOCK_CLOEXEC)?;
                // A connected vsock stream speaks the same socket calls (recv, send, timeouts,
                // shutdown) that UnixStream uses; none of its address methods are called.
                Ok(UnixStream::from(owned))
            }
        }
    }
}

pub struct Service {
    pub reaper: Arc<Reaper>,
    pub started: Instant,
    connections: AtomicUsize,
}

impl Service {
    pub fn new(reaper: Arc<Reaper>) -> Arc<Self> {
        Arc::new(Service { reaper, started: Instant::now(), connections: AtomicUsize::new(0) })
    }

    /// Accepts connections for ever; each gets its own thread.
    pub fn serve(self: Arc<Self>, listener: Listener) {
        loop {
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    log!("my_hypervisor-init: accept: {e}");
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if self.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.connections.fetch_sub(1, Ordering::SeqCst);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                let busy = GuestFrame::Error { message: "too many connections".into() };
                Sink::new(stream).send(&busy);
                continue;
            }
            let svc = Arc::clone(&self);
            let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
                if let Err(e) = svc.connection(stream) {
                    log!("my_hypervisor-init: connection: {e}");
                }
                svc.connections.fetch_sub(1, Ordering::SeqCst);
            });
            if let Err(e) = spawned {
                log!("my_hypervisor-init: cannot start a connection thread: {e}");
                self.connections.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn connection(&self, stream: UnixStream) -> Result<(), ProtoError> {
        stream.set_read_timeout(Some(READ_TICK)).map_err(ProtoError::Io)?;
        stream.set_write_timeout(Some(WRITE_WAIT)).map_err(ProtoError::Io)?;
        let mut reader = FrameReader {
            stream: stream.try_clone().map_err(ProtoError::Io)?,
            dec: FrameDecoder::new(),
            buf: vec![0u8; MAX_FRAME_LEN],
        };
        let sink = Arc::new(Sink::new(stream));

        let hello = match reader.next(Instant::now() + HELLO_WAIT) {
            Ok(Next::Frame(h)) => h,
            Ok(Next::End) => return Ok(()),
            Ok(Next::Waited) => Err(timed_out("no hello"))?,
            Err(e) => {
                sink.send(&GuestFrame::Error { message: e.to_string() });
                return Err(e);
            }
        };
        if let Err(e) = check_hello(&hello) {
            sink.send(&GuestFrame::Error { message: e.to_string() });
            return Err(e);
        }
        sink.send(&guest_hello());

        let mut exec: Option<(JoinHandle<()>, mpsc::Sender<Input>, Arc<AtomicBool>)> = None;
        let mut stdin_bytes = 0u64;
        let mut last_active = Instant::now();
        loop {
            let busy = exec.as_ref().is_some_and(|(_, _, done)| !done.load(Ordering::SeqCst));
            if busy {
                last_active = Instant::now();
            }
            // While a command runs, wake each second to see whether it is done.
            let until = if busy { Instant::now() + Duration::from_secs(1) } else { last_active + IDLE_WAIT };
            let next = match reader.next(until) {
                Ok(Next::Waited) if busy => continue,
                Ok(Next::Waited) => Err(timed_out("no request")),
                other => other,
            };
            let frame = match next {
                Ok(Next::Frame(f)) => {
                    last_active = Instant::now();
                    f
                }
                Ok(Next::End) => break,
                Ok(Next::Waited) => continue,
                Err(e) => {
                    sink.send(&GuestFrame::Error { message: e.to_string() });
                    // The command is cancelled and waited for: a connection's thread
                    // outlives its command, so MAX_CONNECTIONS bounds both.
                    if let Some((h, tx, _)) = exec.take() {
                        let _ = tx.send(Input::Gone);
                        let _ = h.join();
                    }
                    return Err(e);
                }
            };
            match frame {
                HostFrame::Health => {
                    let uptime_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    let running = u32::try_from(self.reaper.running()).unwrap_or(u32::MAX);
                    sink.send(&GuestFrame::Health { uptime_ms, running });
                }
                HostFrame::Exec(req) => {
                    if exec.as_ref().is_some_and(|(_, _, done)| !done.load(Ordering::SeqCst)) {
                        sink.send(&GuestFrame::Error {
                            message: "a command is already running on this connection".into(),
                        });
                        continue;
                    }
                    if let Some((h, _, _)) = exec.take() {
                        let _ = h.join();
                    }
                    if let Err(e) = req.validate() {
                        sink.send(&GuestFrame::Error { message: e.to_string() });
                        continue;
                    }
                    stdin_bytes = 0;
                    let (tx, rx) = mpsc::channel();
                    let (reaper, sink) = (Arc::clone(&self.reaper), Arc::clone(&sink));
                    let done = Arc::new(AtomicBool::new(false));
                    let finished = Arc::clone(&done);
                    let handle = thread::Builder::new()
                        .name("exec".into())
                        .spawn(move || exec::run(&req, &reaper, &sink, &rx, &finished))
                        .map_err(ProtoError::Io)?;
                    exec = Some((handle, tx, done));
                }
                HostFrame::Stdin(data) => {
                    stdin_bytes += data.len() as u64;
                    if let Some((_, tx, _)) = &exec {
                        let input = if stdin_bytes > MAX_STDIN_BYTES { Input::Cancel } else { Input::Stdin(data) };
                        let _ = tx.send(input);
                    }
                }
                HostFrame::StdinEnd | HostFrame::Cancel => {
                    if let Some((_, tx, _)) = &exec {
                        let _ = tx.send(if frame == HostFrame::Cancel { Input::Cancel } else { Input::StdinEnd });
                    }
                }
                HostFrame::Hello { .. } => {
                    sink.send(&GuestFrame::Error { message: "unexpected second hello".into() });
                }
            }
        }
        if let Some((h, tx, _)) = exec.take() {
            let _ = tx.send(Input::Gone);
            let _ = h.join();
        }
        Ok(())
    }
}

fn timed_out(what: &str) -> ProtoError {
    ProtoError::Io(io::Error::new(io::ErrorKind::TimedOut, format!("{what} from the peer in time")))
}

enum Next {
    Frame(HostFrame),
    /// A clean end of stream between frames.
    End,
    /// `until` passed with no whole frame; a partial one stays buffered.
    Waited,
}

/// Frames from a stream whose reads wake every [`READ_TICK`] to check a deadline.
struct FrameReader {
    stream: UnixStream,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl FrameReader {
    fn next(&mut self, until: Instant) -> Result<Next, ProtoError> {
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(Next::Frame(f));
            }
            let want = self.dec.room().min(self.buf.len());
            match self.stream.read(&mut self.buf[..want]) {
                Ok(0) => return self.dec.finish().map(|()| Next::End),
                Ok(n) => self.dec.push(&self.buf[..n])?,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) =>
                {
                    if Instant::now() >= until {
                        return Ok(Next::Waited);
                    }
                }
                Err(e) => return Err(ProtoError::Io(e)),
            }
        }
    }
}
