//! Test-only server setup, client helpers and the methods of the JSON-RPC 2.0 specification's
//! examples.

#![allow(dead_code)]

pub mod driver;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use jsonrpsee::core::SubscriptionResult;
use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::{Methods, RpcModule};
use my_hypervisor_frontend::rpc::{self, Limits};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A server on a fresh socket path, running until the test's runtime ends.
pub struct Server {
    pub path: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn socket_path() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("myhv-rpc-test-{}-{n}.sock", std::process::id()))
}

pub fn start(methods: Methods, limits: Limits) -> Server {
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind test socket");
    tokio::spawn(rpc::serve(listener, methods, limits));
    Server { path }
}

/// The methods used by section 7 of the JSON-RPC 2.0 specification, plus a test subscription.
pub fn spec_methods() -> Methods {
    let mut m = RpcModule::new(());
    m.register_method("subtract", |p, _, _| subtract(&p)).unwrap();
    m.register_method("sum", |p, _, _| p.parse::<Vec<i64>>().map(|v| v.iter().sum::<i64>())).unwrap();
    m.register_method("get_data", |_, _, _| json!(["hello", 5])).unwrap();
    for name in ["update", "notify_hello", "notify_sum"] {
        m.register_method(name, |_, _, _| ()).unwrap();
    }
    m.register_subscription("test_subscribe", "test_notification", "test_unsubscribe", emit).unwrap();
    m.into()
}

fn subtract(p: &Params<'_>) -> Result<i64, ErrorObjectOwned> {
    #[derive(serde::Deserialize)]
    struct Named {
        minuend: i64,
        subtrahend: i64,
    }
    if p.is_object() {
        let n: Named = p.parse()?;
        Ok(n.minuend - n.subtrahend)
    } else {
        let [a, b]: [i64; 2] = p.parse()?;
        Ok(a - b)
    }
}

/// How many test subscriptions are running, and whether one has been cut off.
pub static SUBS_RUNNING: AtomicUsize = AtomicUsize::new(0);
pub static SUB_ENDED: AtomicBool = AtomicBool::new(false);

/// `test_subscribe [count, payload_bytes, pause_ms]`: sends `count` notifications as fast as the
/// connection takes them (or `pause_ms` apart), each carrying `payload_bytes` of text.
async fn emit(
    params: Params<'static>,
    pending: jsonrpsee::PendingSubscriptionSink,
    _: Arc<()>,
    _: jsonrpsee::Extensions,
) -> SubscriptionResult {
    let args: Vec<u64> = params.parse()?;
    let (count, size, pause_ms) = match args[..] {
        [count, size] => (count, size as usize, None),
        [count, size, pause] => (count, size as usize, Some(pause)),
        _ => return Err("expected [count, payload_bytes, pause_ms?]".into()),
    };
    let sink = pending.accept().await?;
    SUBS_RUNNING.fetch_add(1, Ordering::SeqCst);
    let payload = "x".repeat(size);
    let mut result = Ok(());
    for seq in 0..count {
        if let Some(ms) = pause_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let msg = serde_json::value::to_raw_value(&json!({"seq": seq, "payload": payload}))?;
        if let Err(e) = sink.send(msg).await {
            result = Err(e.into());
            break;
        }
    }
    SUBS_RUNNING.fetch_sub(1, Ordering::SeqCst);
    SUB_ENDED.store(true, Ordering::SeqCst);
    result
}

pub struct Client {
    pub rd: BufReader<OwnedReadHalf>,
    /// `None` once a test has taken the writing half for itself.
    pub wr: Option<OwnedWriteHalf>,
}

impl Client {
    pub async fn connect(server: &Server) -> Client {
        let s = UnixStream::connect(&server.path).await.expect("connect");
        let (rd, wr) = s.into_split();
        Client { rd: BufReader::new(rd), wr: Some(wr) }
    }

    pub async fn send(&mut self, line: &[u8]) {
        let wr = self.wr.as_mut().expect("the writing half");
        wr.write_all(line).await.expect("write");
        wr.write_all(b"\n").await.expect("write");
    }

    /// Like `send`, but reports a closed connection instead of failing.
    pub async fn try_send(&mut self, line: &[u8]) -> bool {
        let wr = self.wr.as_mut().expect("the writing half");
        wr.write_all(line).await.is_ok() && wr.write_all(b"\n").await.is_ok()
    }

    /// The next line, or `None` at end of input (or a reset connection).
    pub async fn recv_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match tokio::time::timeout(REPLY_TIMEOUT, self.rd.read_line(&mut line)).await {
            Ok(Ok(0)) | Ok(Err(_)) => None,
            Ok(Ok(_)) => Some(line),
            Err(_) => panic!("no reply within {REPLY_TIMEOUT:?}"),
        }
    }

    pub async fn recv(&mut self) -> Value {
        let line = self.recv_line().await.expect("a reply line, not end of input");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line}"))
    }

    pub async fn call(&mut self, line: &str) -> Value {
        self.send(line.as_bytes()).await;
        self.recv().await
    }

    /// Waits until the server closes the connection (skipping anything still queued).
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let wait = async {
            let mut line = String::new();
            loop {
                line.clear();
                match self.rd.read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// A server that answers: a quick check that the server still serves other clients.
pub async fn assert_serving(server: &Server) {
    let mut c = Client::connect(server).await;
    let r = c.call(r#"{"jsonrpc":"2.0","method":"subtract","params":[42,23],"id":7}"#).await;
    assert_eq!(r, json!({"jsonrpc": "2.0", "result": 19, "id": 7}));
}

pub fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Samples VmRSS every few milliseconds on a thread of its own and keeps the peak.
pub struct RssPeak {
    baseline: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssPeak {
    pub fn start() -> RssPeak {
        let baseline = vm_rss_kib();
        let peak = Arc::new(AtomicU64::new(baseline));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(vm_rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssPeak { baseline, peak, stop, thread: Some(thread) }
    }

    /// Peak growth over the baseline, in MiB.
    pub fn finish(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let peak = self.peak.load(Ordering::Relaxed).max(vm_rss_kib());
        peak.saturating_sub(self.baseline) as f64 / 1024.0
    }
}

/// Drops "message" and "data" from error objects: the spec's examples word messages
/// differently from jsonrpsee; codes and ids are what must match.
pub fn normalize(v: &Value) -> Value {
    match v {
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(normalize).collect();
            items.sort_by_key(|i| i.to_string());
            Value::Array(items)
        }
        Value::Object(o) => {
            let mut o = o.clone();
            if let Some(Value::Object(err)) = o.get_mut("error") {
                err.remove("message");
                err.remove("data");
            }
            Value::Object(o)
        }
        other => other.clone(),
    }
}
