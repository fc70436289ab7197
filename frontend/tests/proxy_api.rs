//! What a proxy relies on: requests on one connection run concurrently up to a bound and are
//! answered by id as they finish; the VM methods' proxy-facing fields.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::driver::{Step, TestDriver};
use common::{Client, start};
use jsonrpsee::RpcModule;
use my_hypervisor_frontend::rpc::{self, Limits};
use my_hypervisor_frontend::vm::{Manager, ManagerConfig, VmDriver};
use serde_json::{Value, json};

fn manager(driver: Arc<TestDriver>) -> (tempfile::TempDir, Manager) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ManagerConfig::new(dir.path(), vec![PathBuf::from("/var/lib/vm")]);
    let m = Manager::open(cfg, Some(driver as Arc<dyn VmDriver>)).unwrap();
    (dir, m)
}

fn spec(id: &str, labels: Value) -> Value {
    json!({
        "id": id, "vcpus": 1, "memory_mib": 256, "kernel": "/var/lib/vm/vmlinux",
        "agent": false, "labels": labels,
    })
}

fn req(id: u64, method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}).to_string()
}

async fn call(c: &mut Client, method: &str, params: Value) -> Value {
    c.call(&req(1, method, params)).await
}

#[tokio::test]
async fn a_status_after_a_slow_start_is_answered_first() {
    let driver = Arc::new(TestDriver::default());
    driver.set_delay(Step::WaitRunning, Duration::from_secs(2));
    let (_dir, m) = manager(Arc::clone(&driver));
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let mut c = Client::connect(&server).await;
    let r = call(&mut c, "compute.vm.create", spec("slow-1", json!({}))).await;
    assert_eq!(r["result"]["state"], "pending", "{r}");

    c.send(req(10, "compute.vm.start", json!({"vm_id": "slow-1"})).as_bytes()).await;
    c.send(req(11, "compute.vm.status", json!({"vm_id": "slow-1"})).as_bytes()).await;
    let first = c.recv().await;
    assert_eq!(first["id"], 11, "the status is answered while the start runs: {first}");
    assert_ne!(first["result"]["state"], "running", "the start is still under way: {first}");
    let second = c.recv().await;
    assert_eq!(second["id"], 10, "{second}");
    assert_eq!(second["result"]["state"], "running", "{second}");
}

/// A method that holds its caller until the test releases it, counting how many run at once.
fn gate_methods(running: Arc<AtomicUsize>, peak: Arc<AtomicUsize>, gate: Arc<tokio::sync::Semaphore>) -> RpcModule<()> {
    let mut m = RpcModule::new(());
    m.register_async_method("hold", move |_, _, _| {
        let (running, peak, gate) = (Arc::clone(&running), Arc::clone(&peak), Arc::clone(&gate));
        async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            gate.acquire().await.expect("gate open").forget();
            running.fetch_sub(1, Ordering::SeqCst);
            "done"
        }
    })
    .unwrap();
    m.register_method("ping", |_, _, _| "pong").unwrap();
    m
}

#[tokio::test]
async fn requests_in_flight_are_bounded_per_connection() {
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let methods = gate_methods(Arc::clone(&running), Arc::clone(&peak), Arc::clone(&gate));
    let limits = Limits { max_in_flight: 2, ..Limits::default() };
    let server = start(methods.into(), limits);
    let mut c = Client::connect(&server).await;
    for id in 1..=3 {
        c.send(req(id, "hold", json!([])).as_bytes()).await;
    }
    c.send(req(4, "ping", json!([])).as_bytes()).await;
    // Two holds run; the third and the ping wait for a slot.
    tokio::time::timeout(Duration::from_secs(5), async {
        while running.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("two holds running");
    let early = tokio::time::timeout(Duration::from_millis(300), c.recv_line()).await;
    assert!(early.is_err(), "nothing is answered while the bound is reached: {early:?}");
    assert_eq!(peak.load(Ordering::SeqCst), 2);

    gate.add_permits(1);
    let mut ids = vec![c.recv().await["id"].as_u64().unwrap()];
    // The freed slot goes to the third hold; the ping waits behind it.
    gate.add_permits(2);
    for _ in 0..3 {
        ids.push(c.recv().await["id"].as_u64().unwrap());
    }
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    assert_eq!(peak.load(Ordering::SeqCst), 2, "never more than the bound at once");

    // A client that writes its requests and shuts its side still gets every answer.
    let mut c = Client::connect(&server).await;
    c.send(req(5, "hold", json!([])).as_bytes()).await;
    c.send(req(6, "ping", json!([])).as_bytes()).await;
    drop(c.wr.take());
    let pong = c.recv().await;
    assert_eq!(pong, json!({"jsonrpc": "2.0", "result": "pong", "id": 6}));
    gate.add_permits(1);
    assert_eq!(c.recv().await["id"], 5);
    assert!(c.recv_line().await.is_none(), "closed after the last answer");
}
