//! One VMM's console: a single task owns the serial fd, the serial log and the listening
//! console socket, so every client sees the log's tail and then the live output with
//! nothing lost or doubled between them. Each client has a task of its own and a queue
//! bounded in bytes ([`CLIENT_QUEUE_BYTES`]): a client whose queue fills (it stopped
//! reading) is disconnected, so it never holds up the VM or the other clients. What clients type goes to the guest through one bounded
//! input queue; a client that types faster than the guest reads waits on its own.

use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use my_hypervisor_broker_proto::{ExitStatus, Request, SocketRole};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc, watch};

use super::Consoles;
use super::log::SerialLog;

/// Bytes read from the serial fd (or a client) at a time.
pub const CHUNK: usize = 4096;
/// Bytes queued per client (beyond the replay) before it counts as stalled and is
/// disconnected.
pub const CLIENT_QUEUE_BYTES: usize = 256 * 1024;
/// Clients attached to one console at once; more are closed at once.
pub const MAX_CLIENTS: usize = 16;
/// Input chunks queued for the guest.
const INPUT_QUEUE: usize = 16;
/// Between attempts to connect to the VMM's serial socket (it appears once the VM exists),
/// doubling up to [`RETRY_MAX`] while they fail (each attempt is a broker request).
const RETRY: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// After the VMM exited, how long its last output may take to drain.
const DRAIN: Duration = Duration::from_secs(1);
/// How long one write to a client may take.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

type Chunk = Arc<[u8]>;

/// Serves one VMM's console until it exits or the hub is stopped.
pub async fn run(
    consoles: Arc<Consoles>,
    vm_id: String,
    id: u64,
    exit: watch::Receiver<Option<ExitStatus>>,
    stopped: watch::Receiver<bool>,
) {
    let path = consoles.socket_path(&vm_id);
    let listener = match bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(vm = %vm_id, path = %path.display(), error = %e, "cannot serve the console socket");
            consoles.ended(&vm_id, id);
            return;
        }
    };
    let log = match SerialLog::open(&consoles.log_dir, &vm_id, consoles.limits.log_bytes) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(vm = %vm_id, error = %e, "cannot open the serial log; output is not kept");
            None
        }
    };
    let mut hub = Hub { consoles: Arc::clone(&consoles), vm_id: vm_id.clone(), log, clients: Vec::new() };
    hub.serve(&listener, exit, stopped).await;
    // The socket goes with the hub, unless a newer hub of the VM has bound the path again.
    // (A newer hub is in the map before it binds, and it removes a stale path itself.)
    if !consoles.superseded(&vm_id, id) {
        let _ = std::fs::remove_file(&path);
    }
    consoles.ended(&vm_id, id);
}

/// Binds the console socket, replacing one a previous frontend left; root and, through the
/// console dir's setgid group, `--rpc-group` may connect (0660).
fn bind(path: &std::path::Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

struct Hub {
    consoles: Arc<Consoles>,
    vm_id: String,
    log: Option<SerialLog>,
    clients: Vec<Client>,
}

/// The hub's side of a client: its queue and how many bytes wait in it.
struct Client {
    tx: mpsc::UnboundedSender<Chunk>,
    queued: Arc<AtomicUsize>,
    /// Ends the client's connection at once, whatever is still queued for it.
    kick: Arc<Notify>,
}

impl Hub {
    async fn serve(
        &mut self,
        listener: &UnixListener,
        mut exit: watch::Receiver<Option<ExitStatus>>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let (input_tx, mut input_rx) = mpsc::channel::<Vec<u8>>(INPUT_QUEUE);
        let mut serial: Option<UnixStream> = None;
        let mut pending: Option<(Vec<u8>, usize)> = None;
        let mut buf = vec![0u8; CHUNK];
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut retry = RETRY;
        loop {
            if exit.borrow().is_some() && drain_until.is_none() {
                drain_until = Some(tokio::time::Instant::now() + DRAIN);
            }
            let draining = drain_until.is_some();
            if draining && serial.is_none() {
                return;
            }
            tokio::select! {
                _ = stopped.changed() => return,
                _ = exit.changed(), if !draining => {}
                () = tokio::time::sleep_until(drain_until.unwrap_or_else(tokio::time::Instant::now)), if draining => return,
                () = tokio::time::sleep(retry), if serial.is_none() => {
                    serial = self.connect().await;
                    retry = if serial.is_some() { RETRY } else { (retry * 2).min(RETRY_MAX) };
                }
                r = listener.accept() => match r {
                    Ok((stream, _)) => self.add_client(stream, input_tx.clone()),
                    Err(e) => {
                        tracing::warn!(vm = %self.vm_id, error = %e, "console accept failed");
                        tokio::time::sleep(RETRY).await;
                    }
                },
                r = async { serial.as_ref().expect("guarded").readable().await }, if serial.is_some() => {
                    if r.is_err() {
                        serial = None;
                        continue;
                    }
                    match serial.as_ref().expect("guarded").try_read(&mut buf) {
                        Ok(0) => serial = None,
                        Ok(n) => self.output(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => serial = None,
                    }
                }
                chunk = input_rx.recv(), if pending.is_none() => {
                    pending = chunk.map(|c| (c, 0));
                }
                r = async { serial.as_ref().expect("guarded").writable().await }, if serial.is_some() && pending.is_some() => {
                    if r.is_err() {
                        serial = None;
                        continue;
                    }
                    let (data, at) = pending.as_mut().expect("guarded");
                    match serial.as_ref().expect("guarded").try_write(&data[*at..]) {
                        Ok(n) => {
                            *at += n;
                            if *at >= data.len() {
                                pending = None;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => serial = None,
                    }
                }
            }
        }
    }

    /// A connected stream to the VMM's serial socket, or None (the VM may not exist yet).
    async fn connect(&self) -> Option<UnixStream> {
        let req = Request::Connect { vm: self.vm_id.clone(), role: SocketRole::Serial };
        let fd: OwnedFd = match self.consoles.broker.call(req).await {
            Ok((_, fds)) => fds.into_iter().next()?,
            Err(e) => {
                tracing::debug!(vm = %self.vm_id, error = %e, "no serial connection yet");
                return None;
            }
        };
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true).ok()?;
        let s = UnixStream::from_std(std).ok()?;
        tracing::info!(vm = %self.vm_id, "serial console connected");
        Some(s)
    }

    /// Guest output: to the log first, then to every client that keeps up.
    fn output(&mut self, data: &[u8]) {
        if let Some(log) = &mut self.log
            && let Err(e) = log.write(data)
        {
            tracing::warn!(vm = %self.vm_id, error = %e, "serial log write failed; output is no longer kept");
            self.log = None;
        }
        if self.clients.is_empty() {
            return;
        }
        let chunk: Chunk = Arc::from(data);
        let vm = &self.vm_id;
        self.clients.retain(|c| {
            if c.queued.fetch_add(data.len(), Ordering::SeqCst) + data.len() > CLIENT_QUEUE_BYTES {
                tracing::info!(vm = %vm, "a console client stopped reading; disconnecting it");
                c.kick.notify_one();
                return false;
            }
            c.tx.send(Arc::clone(&chunk)).is_ok()
        });
    }

    /// A new client: the log's tail first, then live output.
    fn add_client(&mut self, stream: UnixStream, input: mpsc::Sender<Vec<u8>>) {
        self.clients.retain(|c| !c.tx.is_closed());
        if self.clients.len() >= MAX_CLIENTS {
            tracing::warn!(vm = %self.vm_id, "too many console clients; closing a new one");
            return;
        }
        let replay = match self.consoles.console_tail(&self.vm_id, self.consoles.limits.replay_bytes) {
            Ok((data, _)) => data,
            Err(e) => {
                tracing::warn!(vm = %self.vm_id, error = %e, "no replay for a console client");
                Vec::new()
            }
        };
        // The replay is queued first and is not counted against the client's queue: it
        // holds at most `--console-replay-bytes` while the client exists.
        let (tx, rx) = mpsc::unbounded_channel();
        for c in replay.chunks(CHUNK) {
            let _ = tx.send(Arc::from(c));
        }
        let queued = Arc::new(AtomicUsize::new(0));
        let kick = Arc::new(Notify::new());
        self.clients.push(Client { tx, queued: Arc::clone(&queued), kick: Arc::clone(&kick) });
        tokio::spawn(client(stream, rx, queued, kick, input, replay.len()));
    }
}

/// One console client: writes what the hub queues, reads what it types.
async fn client(
    stream: UnixStream,
    mut out: mpsc::UnboundedReceiver<Chunk>,
    queued: Arc<AtomicUsize>,
    kick: Arc<Notify>,
    input: mpsc::Sender<Vec<u8>>,
    mut replay: usize,
) {
    let (mut r, mut w) = stream.into_split();
    let writer = async {
        while let Some(chunk) = out.recv().await {
            match tokio::time::timeout(CLIENT_WRITE_TIMEOUT, w.write_all(&chunk)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            if replay > 0 {
                replay = replay.saturating_sub(chunk.len());
            } else {
                queued.fetch_sub(chunk.len(), Ordering::SeqCst);
            }
        }
    };
    let reader = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    // The client closed its side: it may still read what comes.
                    std::future::pending::<()>().await;
                }
                Ok(n) => {
                    if input.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = writer => {}
        () = reader => {}
        () = kick.notified() => {}
    }
}
