//! Abusive clients: each scenario must leave the server serving other clients with its memory
//! bounded. Scenarios run one at a time so that the memory measurements do not overlap.

mod common;

use std::time::{Duration, Instant};

use common::{Client, RssPeak, assert_serving, spec_methods, start};
use my_hypervisor_frontend::rpc::Limits;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

/// Growth of the test process's resident memory that a scenario must stay under. A server that
/// buffered the 16 MiB line grows by about 15 MiB here.
const RSS_BUDGET_MIB: f64 = 8.0;
/// The same for 1,000 connections, whose client ends also live in this process.
const RSS_BUDGET_1000_CONNECTIONS_MIB: f64 = 48.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_of_16_mib_is_refused_without_buffering_it() {
    let _serial = SERIAL.lock().await;
    let server = start(spec_methods(), Limits::default());
    let rss = RssPeak::start();

    let mut c = Client::connect(&server).await;
    let mut wr = c.wr.take().unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..(16 * 1024 * 1024 / chunk.len()) {
            if wr.write_all(&chunk).await.is_err() {
                return false;
            }
        }
        true
    });
    let reply = c.recv().await;
    assert_eq!(reply["id"], json!(null), "{reply}");
    assert_eq!(reply["error"]["code"], -32007, "{reply}");
    assert!(c.closed_within(Duration::from_secs(5)).await, "connection left open");
    let wrote_everything = writer.await.unwrap();
    assert!(!wrote_everything, "the server kept reading past the line limit");

    assert_serving(&server).await;
    let grew = rss.finish();
    eprintln!("resident memory growth: {grew:.1} MiB");
    assert!(grew < RSS_BUDGET_MIB, "resident memory grew by {grew:.1} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_a_parse_error() {
    let _serial = SERIAL.lock().await;
    let server = start(spec_methods(), Limits::default());
    let mut c = Client::connect(&server).await;
    c.send(b"{\"jsonrpc\":\"2.0\",\"method\":\"sum\",\"params\":[1],\"id\":\"\xff\xfe\"}").await;
    let r = c.recv().await;
    assert_eq!((r["error"]["code"].clone(), r["id"].clone()), (json!(-32700), json!(null)), "{r}");
    c.send(b"[{\"jsonrpc\":\"2.0\",\"method\":\"\xc3\x28\",\"id\":1}]").await;
    let r = c.recv().await;
    assert_eq!((r["error"]["code"].clone(), r["id"].clone()), (json!(-32700), json!(null)), "{r}");
    c.send(&[0xff; 100]).await;
    assert_eq!(c.recv().await["error"]["code"], -32700);
    // The same connection keeps working.
    let r = c.call(r#"{"jsonrpc":"2.0","method":"sum","params":[1,2],"id":1}"#).await;
    assert_eq!(r["result"], 3);
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections() {
    let _serial = SERIAL.lock().await;
    const N: usize = 1000;
    // Client and server ends both live in this process.
    let soft = my_hypervisor_frontend::rpc::limits::raise_nofile_limit(2 * N + 100).unwrap_or(0);
    assert!(soft >= (2 * N + 100) as u64, "RLIMIT_NOFILE {soft} is too low for this test");
    let limits = Limits { max_connections: N + 10, ..Limits::default() };
    let server = start(spec_methods(), limits);
    let rss = RssPeak::start();

    let mut idle = Vec::with_capacity(N);
    for _ in 0..N {
        idle.push(Client::connect(&server).await);
    }
    assert_serving(&server).await;
    // Every idle connection was accepted and is still served.
    for (i, c) in idle.iter_mut().enumerate() {
        let r = c.call(&format!(r#"{{"jsonrpc":"2.0","method":"sum","params":[{i},1],"id":{i}}}"#)).await;
        assert_eq!(r["result"], i + 1, "{r}");
    }
    let grew = rss.finish();
    eprintln!("resident memory growth: {grew:.1} MiB");
    drop(idle);
    assert!(grew < RSS_BUDGET_1000_CONNECTIONS_MIB, "resident memory grew by {grew:.1} MiB for {N} connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_at_once() {
    let _serial = SERIAL.lock().await;
    let limits = Limits { max_connections: 3, ..Limits::default() };
    let server = start(spec_methods(), limits);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&server).await;
        assert_eq!(c.call(r#"{"jsonrpc":"2.0","method":"sum","params":[1],"id":1}"#).await["result"], 1);
        held.push(c);
    }
    let mut extra = Client::connect(&server).await;
    assert!(extra.closed_within(Duration::from_secs(2)).await, "fourth connection was not closed");
    // Once a slot frees up, new clients are served again.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Client::connect(&server).await;
        let sent = c.try_send(br#"{"jsonrpc":"2.0","method":"sum","params":[2],"id":1}"#).await;
        if let Some(line) = c.recv_line().await.filter(|_| sent) {
            assert!(line.contains("\"result\":2"), "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed after a client left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_a_second_is_cut_off() {
    let _serial = SERIAL.lock().await;
    let limits = Limits {
        line_timeout: Duration::from_millis(1500),
        idle_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = start(spec_methods(), limits);
    let rss = RssPeak::start();
    let mut slow = Client::connect(&server).await;
    let started = Instant::now();
    let request = br#"{"jsonrpc":"2.0","method":"sum","params":[1],"id":1}"#;
    let mut cut_off = false;
    for &b in request {
        if slow.wr.as_mut().unwrap().write_all(&[b]).await.is_err() {
            cut_off = true;
            break;
        }
        if slow.closed_within(Duration::from_secs(1)).await {
            cut_off = true;
            break;
        }
        // Others are served meanwhile.
        if started.elapsed() < Duration::from_secs(1) {
            assert_serving(&server).await;
        }
    }
    let elapsed = started.elapsed();
    assert!(cut_off, "a line dribbled over {elapsed:?} was accepted");
    assert!(elapsed >= Duration::from_millis(1400), "cut off too early: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "cut off too late: {elapsed:?}");
    assert_serving(&server).await;
    let grew = rss.finish();
    eprintln!("resident memory growth: {grew:.1} MiB");
    assert!(grew < RSS_BUDGET_MIB, "resident memory grew by {grew:.1} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_time_out() {
    let _serial = SERIAL.lock().await;
    let limits = Limits { idle_timeout: Duration::from_millis(500), ..Limits::default() };
    let server = start(spec_methods(), limits);
    let mut c = Client::connect(&server).await;
    let started = Instant::now();
    assert!(c.closed_within(Duration::from_secs(3)).await, "idle connection left open");
    assert!(started.elapsed() >= Duration::from_millis(450), "closed too early: {:?}", started.elapsed());

    // An active subscription keeps a quiet connection open past the idle timeout; once it
    // ends, the idle timeout applies again.
    let mut sub = Client::connect(&server).await;
    let r = sub.call(r#"{"jsonrpc":"2.0","method":"test_subscribe","params":[1, 1, 1500],"id":1}"#).await;
    assert!(r.get("result").is_some(), "{r}");
    let n = sub.recv().await;
    assert_eq!(n["method"], "test_notification", "{n}");
    assert!(sub.closed_within(Duration::from_secs(2)).await, "a finished subscription kept the connection");
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_cut_off() {
    let _serial = SERIAL.lock().await;
    let limits = Limits { write_timeout: Duration::from_secs(1), ..Limits::default() };
    let server = start(spec_methods(), limits);
    let rss = RssPeak::start();
    common::SUB_ENDED.store(false, std::sync::atomic::Ordering::SeqCst);

    let mut c = Client::connect(&server).await;
    // Ask for an endless stream of 4 KiB notifications, then never read.
    c.send(br#"{"jsonrpc":"2.0","method":"test_subscribe","params":[1000000000000, 4096],"id":1}"#).await;
    let started = Instant::now();
    while !common::SUB_ENDED.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(started.elapsed() < Duration::from_secs(10), "the subscription was never cut off");
        assert_serving(&server).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_serving(&server).await;
    let grew = rss.finish();
    eprintln!("resident memory growth: {grew:.1} MiB");
    assert!(grew < RSS_BUDGET_MIB, "resident memory grew by {grew:.1} MiB");
    drop(c);
}
