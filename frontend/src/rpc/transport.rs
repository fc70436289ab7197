//! Line-delimited JSON-RPC 2.0 over a Unix stream socket.
//!
//! jsonrpsee provides the method table ([`Methods`]) and the per-connection plumbing
//! ([`MethodSink`], [`BoundedSubscriptions`], [`ConnectionId`]); this module is the transport
//! around them: one JSON text per line in each direction, batches and notifications, and the
//! limits in [`Limits`].
//!
//! Each connection is two halves joined by a bounded queue: the reader parses lines and runs
//! each one in a task of its own, up to `max_in_flight` at once (past that it stops reading
//! until one finishes), and each task sends its response into the queue when it is done, so
//! responses come back in the order they finish and are matched by id; the writer drains the
//! queue onto the socket. Subscriptions push their notifications into the same queue, so a subscriber that
//! does not read stalls its producers instead of growing memory, and is disconnected once one
//! message has waited `write_timeout` to be written.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use jsonrpsee::core::id_providers::RandomIntegerIdProvider;
use jsonrpsee::core::server::{
    BatchResponseBuilder, BoundedSubscriptions, ConnectionId, MethodCallback, MethodResponse, MethodSink, Methods,
    SubscriptionPermit, SubscriptionState,
};
use jsonrpsee::types::error::{
    ErrorCode, reject_too_big_batch_request, reject_too_big_request, reject_too_many_subscriptions,
};
use jsonrpsee::types::{ErrorObject, Id, InvalidRequest, Notification, Request};
use jsonrpsee::{Extensions, MethodResponseNotifyTx};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::BufReader;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::timeout;
use tracing::Instrument;

use super::Limits;
use super::framing::{Closed, read_line, write_loop};

/// Read buffer per connection. Lines longer than this are assembled in a separate buffer that
/// never grows past `max_line_bytes`.
const READ_BUF: usize = 8 * 1024;
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(2);

/// The client at the other end of a connection, from SO_PEERCRED. Method handlers find it (and
/// the [`ConnectionId`]) in their `Extensions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

/// Accepts connections on `listener` and serves `methods` on each until accepting fails for
/// good. Running out of descriptors or memory only pauses accepting.
pub async fn serve(listener: UnixListener, methods: Methods, limits: Limits) -> io::Result<()> {
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS)));
    let mut next_id = 0usize;
    let mut backoff = MIN_ACCEPT_BACKOFF;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = MIN_ACCEPT_BACKOFF;
                stream
            }
            Err(e) if is_resource_exhaustion(&e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(error = %e, "accept failed for one connection");
                continue;
            }
            Err(e) => return Err(e),
        };
        next_id += 1;
        let conn_id = ConnectionId(next_id);
        let peer = peer_of(&stream);
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(
                conn = conn_id.0,
                pid = peer.and_then(|p| p.pid),
                uid = peer.map(|p| p.uid),
                gid = peer.map(|p| p.gid),
                max_connections = limits.max_connections,
                "connection limit reached; closing new connection"
            );
            continue;
        };
        let conn = Connection { id: conn_id, peer, methods: methods.clone(), limits: Arc::clone(&limits) };
        let span = tracing::info_span!("rpc", conn = conn_id.0);
        tokio::spawn(
            async move {
                conn.run(stream).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM | libc::EAGAIN))
}

fn peer_of(stream: &UnixStream) -> Option<Peer> {
    match stream.peer_cred() {
        Ok(c) => Some(Peer { pid: c.pid(), uid: c.uid(), gid: c.gid() }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials");
            None
        }
    }
}

struct Connection {
    id: ConnectionId,
    peer: Option<Peer>,
    methods: Methods,
    limits: Arc<Limits>,
}

impl Connection {
    async fn run(self, stream: UnixStream) {
        tracing::info!(
            pid = self.peer.and_then(|p| p.pid),
            uid = self.peer.map(|p| p.uid),
            gid = self.peer.map(|p| p.gid),
            "client connected"
        );
        let limits = Arc::clone(&self.limits);
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel(self.limits.max_queued_messages.max(1));
        let (stop_tx, stop_rx) = oneshot::channel();
        let writer = write_loop(wr, rx, stop_rx, self.limits.write_timeout);
        let reader = Arc::new(Reader {
            sink: MethodSink::new_with_limit(tx, self.limits.max_response_bytes),
            subscriptions: BoundedSubscriptions::new(self.limits.max_subscriptions),
            subscription_slots: OnceLock::new(),
            in_flight: Arc::new(Semaphore::new(max_in_flight(&self.limits))),
            conn: self,
        })
        .read_loop(rd);
        tokio::pin!(reader, writer);
        let closed = tokio::select! {
            closed = &mut reader => {
                // Flush what is already queued (an error for a too-long line, say), then stop.
                let _ = stop_tx.send(());
                let _ = timeout(limits.write_timeout, writer).await;
                closed
            }
            closed = &mut writer => closed,
        };
        match closed {
            Closed::Eof | Closed::Idle => tracing::info!(reason = %closed, "client disconnected"),
            reason => tracing::warn!(%reason, "connection closed"),
        }
    }
}

struct Reader {
    conn: Connection,
    sink: MethodSink,
    subscriptions: BoundedSubscriptions,
    /// The semaphore behind `subscriptions`, known after the first subscription.
    subscription_slots: OnceLock<Arc<Semaphore>>,
    /// One permit per line being handled; `max_in_flight` in all.
    in_flight: Arc<Semaphore>,
}

/// The bound on lines handled at once on one connection (at least one).
fn max_in_flight(limits: &Limits) -> usize {
    limits.max_in_flight.clamp(1, Semaphore::MAX_PERMITS)
}

impl Reader {
    async fn read_loop(self: Arc<Self>, rd: OwnedReadHalf) -> Closed {
        let mut rd = BufReader::with_capacity(READ_BUF, rd);
        let mut line = Vec::new();
        loop {
            let limits = &self.conn.limits;
            match read_line(&mut rd, &mut line, limits, || self.has_subscriptions() || self.is_busy()).await {
                Ok(true) => {}
                Ok(false) => {
                    // The client has sent all it will; answer what it did send, then close.
                    let _ = self.in_flight.acquire_many(max_in_flight(limits) as u32).await;
                    return Closed::Eof;
                }
                Err(Closed::LineTooLong) => {
                    let err = MethodResponse::error(Id::Null, reject_too_big_request(limits.max_line_bytes as u32));
                    let _ = self.sink.send(err.into_json()).await;
                    return Closed::LineTooLong;
                }
                Err(closed) => return closed,
            }
            // At the bound, stop reading until a line in flight is done.
            let Ok(permit) = Arc::clone(&self.in_flight).acquire_owned().await else {
                return Closed::WriterGone;
            };
            if self.sink.is_closed() {
                return Closed::WriterGone;
            }
            let text = std::mem::take(&mut line);
            if self.subscribes(&text) {
                // jsonrpsee writes a subscribe call's answer just before it registers the
                // subscription, so the next line (an unsubscribe, say) waits for it.
                self.answer(&text).await;
                drop(permit);
                continue;
            }
            let this = Arc::clone(&self);
            tokio::spawn(
                async move {
                    this.answer(&text).await;
                    drop(permit);
                }
                .in_current_span(),
            );
        }
    }

    /// Handles one line and queues its response, if it has one.
    async fn answer(&self, text: &[u8]) {
        if let Some(response) = self.handle_line(text).await {
            let is_success = response.is_success();
            let (json, notify, _) = response.into_parts();
            let sent = self.sink.send(json).await.is_ok();
            notify_sent(notify, sent && is_success);
        }
    }

    /// Whether the line calls a subscription method (alone or in a batch).
    fn subscribes(&self, text: &[u8]) -> bool {
        let is_sub = |m: &MethodProbe<'_>| {
            matches!(self.conn.methods.method(m.method.as_ref()), Some(MethodCallback::Subscription(_)))
        };
        match text.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => serde_json::from_slice::<Vec<MethodProbe<'_>>>(text).is_ok_and(|v| v.iter().any(is_sub)),
            _ => serde_json::from_slice::<MethodProbe<'_>>(text).is_ok_and(|m| is_sub(&m)),
        }
    }

    fn has_subscriptions(&self) -> bool {
        self.subscription_slots.get().is_some_and(|s| s.available_permits() < self.subscriptions.max() as usize)
    }

    /// Whether a line is being handled: the connection is not idle then.
    fn is_busy(&self) -> bool {
        self.in_flight.available_permits() < max_in_flight(&self.conn.limits)
    }

    /// Handles one line: a single request, a notification or a batch. Returns what to send
    /// back, if anything.
    async fn handle_line(&self, line: &[u8]) -> Option<MethodResponse> {
        let Ok(text) = std::str::from_utf8(line) else {
            return Some(parse_error());
        };
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        if text.starts_with('[') {
            return self.handle_batch(text).await;
        }
        match serde_json::from_str::<&RawValue>(text) {
            Ok(_) => self.handle_one(text).await.filter(|r| !r.is_subscription()),
            Err(_) => Some(parse_error()),
        }
    }

    async fn handle_batch(&self, text: &str) -> Option<MethodResponse> {
        let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(text) else {
            return Some(parse_error());
        };
        if items.is_empty() {
            return Some(MethodResponse::error(Id::Null, ErrorObject::from(ErrorCode::InvalidRequest)));
        }
        let limits = &self.conn.limits;
        if items.len() > limits.max_batch_len {
            return Some(MethodResponse::error(Id::Null, reject_too_big_batch_request(limits.max_batch_len)));
        }
        let mut batch = BatchResponseBuilder::new_with_limit(limits.max_response_bytes as usize);
        for item in items {
            // Subscription answers go straight to the sink, so they are not part of the batch.
            let Some(response) = self.handle_one(item.get()).await.filter(|r| !r.is_subscription()) else {
                continue;
            };
            if let Err(too_big) = batch.append(response) {
                return Some(too_big);
            }
        }
        // A batch of notifications only gets no reply at all.
        (!batch.is_empty()).then(|| MethodResponse::from_batch(batch.finish()))
    }

    /// Handles one request object (valid JSON). Returns `None` for a notification.
    async fn handle_one(&self, text: &str) -> Option<MethodResponse> {
        if let Ok(req) = serde_json::from_str::<Request<'_>>(text) {
            return Some(self.call(req).await);
        }
        if let Ok(notif) = serde_json::from_str::<Notification<'_, Option<&RawValue>>>(text)
            && serde_json::from_str::<IdProbe<'_>>(text).is_ok_and(|p| p.id.is_none())
        {
            self.notify(notif).await;
            return None;
        }
        let id = serde_json::from_str::<InvalidRequest<'_>>(text).map_or(Id::Null, |r| r.id);
        Some(MethodResponse::error(id, ErrorObject::from(ErrorCode::InvalidRequest)))
    }

    /// Runs a notification's method and discards its result. Subscribing through a
    /// notification would create a subscription the client cannot name, so that is skipped.
    async fn notify(&self, notif: Notification<'_, Option<&RawValue>>) {
        let is_call =
            matches!(self.conn.methods.method(&notif.method), Some(MethodCallback::Sync(_) | MethodCallback::Async(_)));
        if is_call {
            let req = Request::borrowed(&notif.method, notif.params, Id::Null);
            let (_, notify, _) = self.call(req).await.into_parts();
            notify_sent(notify, false);
        }
    }

    /// Calls a method the way jsonrpsee's own server does, with this connection's id, sink
    /// and subscription limit.
    async fn call(&self, req: Request<'_>) -> MethodResponse {
        let conn_id = self.conn.id;
        let max_response = self.conn.limits.max_response_bytes as usize;
        let id = req.id();
        let params = req.params();
        let mut ext = Extensions::new();
        ext.insert(conn_id);
        if let Some(peer) = self.conn.peer {
            ext.insert(peer);
        }
        match self.conn.methods.method(req.method_name()) {
            None => MethodResponse::error(id, ErrorObject::from(ErrorCode::MethodNotFound)),
            Some(MethodCallback::Sync(cb)) => cb(id, params, max_response, ext),
            Some(MethodCallback::Async(cb)) => {
                cb(id.into_owned(), params.into_owned(), conn_id, max_response, ext).await
            }
            Some(MethodCallback::Subscription(cb)) => match self.subscriptions.acquire() {
                Some(permit) => {
                    self.note_slots(&permit);
                    let state = SubscriptionState {
                        conn_id,
                        id_provider: &RandomIntegerIdProvider,
                        subscription_permit: permit,
                    };
                    cb(id, params, self.sink.clone(), state, ext).await
                }
                None => MethodResponse::error(id, reject_too_many_subscriptions(self.subscriptions.max())),
            },
            Some(MethodCallback::Unsubscription(cb)) => cb(id, params, conn_id, max_response, ext),
        }
    }

    fn note_slots(&self, permit: &SubscriptionPermit) {
        let _ = self.subscription_slots.set(Arc::clone(permit.semaphore()));
    }
}

/// The method a request object names (anything else in it is ignored).
#[derive(Deserialize)]
struct MethodProbe<'a> {
    #[serde(borrow)]
    method: std::borrow::Cow<'a, str>,
}

/// Tells whether a request object carries an id (a notification has none).
#[derive(Deserialize)]
struct IdProbe<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

fn parse_error() -> MethodResponse {
    MethodResponse::error(Id::Null, ErrorObject::from(ErrorCode::ParseError))
}

fn notify_sent(notify: Option<MethodResponseNotifyTx>, ok: bool) {
    if let Some(n) = notify {
        n.notify(ok);
    }
}
