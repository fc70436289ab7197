//! The frontend's side of the broker channel: typed requests with their replies matched by
//! id, and the broker's own events (VMM exits) fanned out to whoever listens. One reader
//! task owns the receiving side; any malformed datagram from the broker ends the channel,
//! as the broker does on its side.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use my_hypervisor_broker_proto::{
    Envelope, Event, FromBroker, PROTOCOL_VERSION, Reply, Request, WireError, recv, send,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, oneshot, watch};

/// How long one request may take. The slowest is Release, which waits up to 5 s for a
/// VMM to die.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Broker events kept for a slow listener before it lags (and must re-read the inventory).
const EVENT_BACKLOG: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker channel is closed")]
    Closed,
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("broker channel: {0}")]
    Wire(#[from] WireError),
    #[error("the broker refused: {0}")]
    Refused(String),
    #[error("unexpected broker reply {0:?}")]
    Unexpected(Box<Reply>),
}

type Waiter = oneshot::Sender<(Reply, Vec<OwnedFd>)>;

struct Inner {
    fd: AsyncFd<OwnedFd>,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiter>>,
    events: broadcast::Sender<Event>,
    closed: watch::Sender<bool>,
}

/// A handle on the broker channel; cheap to clone.
#[derive(Clone)]
pub struct BrokerClient {
    inner: Arc<Inner>,
}

impl BrokerClient {
    /// Takes the channel and starts its reader task on the current runtime.
    pub fn start(fd: OwnedFd) -> std::io::Result<BrokerClient> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        // SAFETY: `fd` is owned and moved into the AsyncFd, so it stays open while registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)? };
        let inner = Arc::new(Inner {
            fd,
            next_id: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            events: broadcast::channel(EVENT_BACKLOG).0,
            closed: watch::channel(false).0,
        });
        tokio::spawn(read_loop(Arc::clone(&inner)));
        Ok(BrokerClient { inner })
    }

    /// Sends one request and waits for its reply and fds. A `Refused` reply is an error.
    pub async fn call(&self, req: Request) -> Result<(Reply, Vec<OwnedFd>), BrokerError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.waiting.lock().expect("waiters").insert(id, tx);
        let env = Envelope { version: PROTOCOL_VERSION, id, fds: 0, body: req };
        let sent = loop {
            let mut guard = match self.inner.fd.writable().await {
                Ok(g) => g,
                Err(_) => break Err(BrokerError::Closed),
            };
            match send(self.inner.fd.get_ref(), env.clone(), &[]) {
                Err(WireError::WouldBlock) => guard.clear_ready(),
                Err(WireError::Closed) => break Err(BrokerError::Closed),
                other => break other.map_err(BrokerError::from),
            }
        };
        if let Err(e) = sent {
            self.inner.waiting.lock().expect("waiters").remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok((Reply::Refused { reason }, _))) => Err(BrokerError::Refused(reason)),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(BrokerError::Closed),
            Err(_) => {
                self.inner.waiting.lock().expect("waiters").remove(&id);
                Err(BrokerError::Timeout(CALL_TIMEOUT))
            }
        }
    }

    /// The broker's events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Resolves once the channel is gone (the broker exited or dropped it).
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }
}

async fn read_loop(inner: Arc<Inner>) {
    let why = loop {
        let mut guard = match inner.fd.readable().await {
            Ok(g) => g,
            Err(e) => break format!("{e}"),
        };
        match recv::<FromBroker>(inner.fd.get_ref()) {
            Err(WireError::WouldBlock) => guard.clear_ready(),
            Err(e) => break e.to_string(),
            Ok((env, fds)) => match env.body {
                FromBroker::Event(event) if fds.is_empty() => {
                    let _ = inner.events.send(event);
                }
                FromBroker::Reply(reply) if usize::from(reply.fd_count()) == fds.len() => {
                    match inner.waiting.lock().expect("waiters").remove(&env.id) {
                        Some(tx) => {
                            let _ = tx.send((reply, fds));
                        }
                        None => tracing::warn!(id = env.id, "a broker reply nobody waits for (timed out?)"),
                    }
                }
                body => break format!("malformed broker message {body:?} with {} fds", fds.len()),
            },
        }
    };
    tracing::warn!(reason = %why, "broker channel ended");
    inner.waiting.lock().expect("waiters").clear();
    let _ = inner.closed.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use my_hypervisor_broker_proto::ExitStatus;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsRawFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap()
    }

    /// A stand-in broker: answers Inventory, refuses Release, and sends an event first.
    fn fake_broker(fd: OwnedFd) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let ev = FromBroker::Event(Event::VmmExited { vm: "a".into(), pid: 7, status: ExitStatus::Code(0) });
            send(&fd, Envelope { version: PROTOCOL_VERSION, id: 0, fds: 0, body: ev }, &[]).unwrap();
            while let Ok((env, _)) = recv::<Request>(&fd) {
                let (reply, fds): (Reply, Vec<i32>) = match env.body {
                    Request::Inventory => (Reply::Inventory { vms: vec![] }, vec![]),
                    Request::OpenOutputs { .. } => (Reply::Outputs, vec![0, 1]),
                    _ => (Reply::Refused { reason: "no".into() }, vec![]),
                };
                let body = FromBroker::Reply(reply);
                send(&fd, Envelope { version: PROTOCOL_VERSION, id: env.id, fds: 0, body }, &fds).unwrap();
            }
        })
    }

    #[tokio::test]
    async fn calls_events_and_close() {
        let (ours, theirs) = pair();
        let mut events = {
            let b = BrokerClient::start(ours).unwrap();
            let mut events = b.events();
            let broker = fake_broker(theirs);
            let ev = events.recv().await.unwrap();
            assert!(matches!(ev, Event::VmmExited { pid: 7, .. }));
            let (r, fds) = b.call(Request::Inventory).await.unwrap();
            assert_eq!((r, fds.len()), (Reply::Inventory { vms: vec![] }, 0));
            let (r, fds) = b.call(Request::OpenOutputs { vm: "a".into() }).await.unwrap();
            assert_eq!(r, Reply::Outputs);
            assert!(fds.iter().all(|f| f.as_raw_fd() > 2));
            let e = b.call(Request::Release { vm: "a".into() }).await.unwrap_err();
            assert!(matches!(e, BrokerError::Refused(ref r) if r == "no"), "{e}");
            // Concurrent calls get their own replies.
            let (x, y) = tokio::join!(b.call(Request::Inventory), b.call(Request::Inventory));
            assert!(x.is_ok() && y.is_ok());
            drop(b);
            drop(broker);
            events
        };
        // The fake broker still holds its end; events stay open until the channel closes.
        assert!(events.try_recv().is_err());
    }

    #[tokio::test]
    async fn closed_channel_fails_calls() {
        let (ours, theirs) = pair();
        let b = BrokerClient::start(ours).unwrap();
        drop(theirs);
        b.closed().await;
        assert!(matches!(b.call(Request::Inventory).await, Err(BrokerError::Closed)));
    }
}
