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

    // The status names when the VM was created and its last transition.
    let s = call(&mut c, "compute.vm.status", json!({"vm_id": "slow-1"})).await;
    let tail = call(&mut c, "compute.vm.events.tail", json!({"vm_id": "slow-1"})).await;
    let events = tail["result"]["events"].as_array().unwrap();
    assert_eq!(s["result"]["last_seq"], events.last().unwrap()["seq"], "{s}");
    assert_eq!(s["result"]["created_at"], events[0]["at"], "create's transition is the first: {s}");
    assert!(s["result"]["created_at"].as_str().unwrap().ends_with('Z'), "{s}");

    // A running VM's sandbox: the planned summary and what was applied; the report on request.
    let sb = &s["result"]["sandbox"];
    assert_eq!(sb["planned"][0], "uid 63299 gid 63299, no supplementary groups", "{s}");
    assert!(sb["planned"].as_array().unwrap().iter().any(|l| l == "landlock: ABI 6 (hard requirement)"), "{s}");
    assert!(sb["planned"].as_array().unwrap().iter().all(|l| l != "allow read"), "only the summary: {s}");
    assert_eq!(sb["applied"][0], "uid (real, effective, saved, fs): 63299 63299 63299 63299", "{s}");
    assert!(sb.get("report").is_none(), "{s}");
    let v = call(&mut c, "compute.vm.status", json!({"vm_id": "slow-1", "verbose": true})).await;
    assert!(v["result"]["sandbox"]["report"].as_str().unwrap().starts_with("sandbox of VM slow-1\n"), "{v}");
    call(&mut c, "compute.vm.stop", json!({"vm_id": "slow-1", "force": true})).await;
    let s = call(&mut c, "compute.vm.status", json!({"vm_id": "slow-1", "verbose": true})).await;
    assert!(s["result"].get("sandbox").is_none(), "no VMM, no sandbox: {s}");
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

#[tokio::test]
async fn list_filters_by_state_and_labels_and_pages() {
    let driver = Arc::new(TestDriver::default());
    let (_dir, m) = manager(Arc::clone(&driver));
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let mut c = Client::connect(&server).await;
    for i in 0..7 {
        let tier = if i % 2 == 0 { "web" } else { "db" };
        let r = call(&mut c, "compute.vm.create", spec(&format!("vm-{i}"), json!({"tenant": "a", "tier": tier}))).await;
        assert!(r["result"].is_object(), "{r}");
    }
    for id in ["vm-0", "vm-3"] {
        let r = call(&mut c, "compute.vm.start", json!({"vm_id": id})).await;
        assert_eq!(r["result"]["state"], "running", "{r}");
    }
    let ids = |r: &Value| -> Vec<String> {
        r["result"]["vms"].as_array().unwrap().iter().map(|v| v["vm_id"].as_str().unwrap().to_string()).collect()
    };

    let r = call(&mut c, "compute.vm.list", json!({"state": "running"})).await;
    assert_eq!(ids(&r), ["vm-0", "vm-3"], "{r}");
    let r = call(&mut c, "compute.vm.list", json!({"labels": "tier=web"})).await;
    assert_eq!(ids(&r), ["vm-0", "vm-2", "vm-4", "vm-6"], "{r}");
    let r = call(&mut c, "compute.vm.list", json!({"labels": "tier=web,tenant=a", "state": "pending"})).await;
    assert_eq!(ids(&r), ["vm-2", "vm-4", "vm-6"], "{r}");
    let r = call(&mut c, "compute.vm.list", json!({"labels": "tier=web,tenant=b"})).await;
    assert_eq!(ids(&r), Vec::<String>::new(), "every term must match: {r}");

    // Pages of three, in id order, each with the cursor of the next.
    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    let mut pages = 0;
    loop {
        let r = call(&mut c, "compute.vm.list", json!({"limit": 3, "cursor": cursor})).await;
        assert!(r["result"]["seq"].as_u64().unwrap() >= 8, "seq covers every transition so far: {r}");
        seen.extend(ids(&r));
        pages += 1;
        cursor = r["result"]["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
        assert!(pages < 10, "paging ends");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (0..7).map(|i| format!("vm-{i}")).collect::<Vec<_>>());

    for (params, field) in [
        (json!({"labels": "tier"}), "labels"),
        (json!({"labels": "=web"}), "labels"),
        (json!({"labels": format!("k={}", "v".repeat(16384))}), "labels"),
        (json!({"limit": 0}), "limit"),
        (json!({"limit": 1001}), "limit"),
        (json!({"state": "nope"}), "state"),
        (json!({"cursor": "../x"}), "cursor"),
    ] {
        let r = call(&mut c, "compute.vm.list", params.clone()).await;
        assert_eq!(r["error"]["code"], -32602, "{params}: {r}");
        assert_eq!(r["error"]["data"], json!({"field": field}), "{params}: {r}");
    }
}

#[tokio::test]
async fn each_error_carries_its_data() {
    let driver = Arc::new(TestDriver::default());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ManagerConfig::new(dir.path(), vec![PathBuf::from("/var/lib/vm")]);
    cfg.max_vms = 2;
    let m = Manager::open(cfg, Some(driver as Arc<dyn VmDriver>)).unwrap();
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let mut c = Client::connect(&server).await;
    let err = |r: &Value| (r["error"]["code"].as_i64().unwrap_or(0), r["error"]["data"].clone());

    let r = call(&mut c, "compute.vm.status", json!({"vm_id": "ghost"})).await;
    assert_eq!(err(&r), (-32020, json!({"vm_id": "ghost"})), "{r}");
    let mut bad = spec("a", json!({}));
    bad["vcpus"] = json!(0);
    let r = call(&mut c, "compute.vm.create", bad).await;
    assert_eq!(err(&r), (-32024, json!({"field": "vcpus"})), "{r}");
    let r = call(&mut c, "compute.vm.create", json!({"id": "a"})).await;
    assert_eq!(err(&r), (-32602, json!({"field": "vcpus"})), "a missing field is named: {r}");
    call(&mut c, "compute.vm.create", spec("a", json!({}))).await;
    let r = call(&mut c, "compute.vm.create", spec("a", json!({"x": "y"}))).await;
    assert_eq!(err(&r), (-32027, json!({"vm_id": "a"})), "{r}");
    let r = call(&mut c, "compute.vm.stop", json!({"vm_id": "a"})).await;
    assert_eq!(err(&r), (-32025, json!({"vm_id": "a"})), "{r}");
    call(&mut c, "compute.vm.start", json!({"vm_id": "a"})).await;
    let r = call(&mut c, "compute.vm.remove", json!({"vm_id": "a"})).await;
    assert_eq!(err(&r), (-32021, json!({"vm_id": "a", "state": "running", "to": "removed"})), "{r}");
    let r = call(&mut c, "compute.vm.stop", json!({"vm_id": "a", "timeout_secs": 4000})).await;
    assert_eq!(err(&r), (-32602, json!({"field": "timeout_secs"})), "{r}");
    call(&mut c, "compute.vm.create", spec("b", json!({}))).await;
    let r = call(&mut c, "compute.vm.create", spec("c", json!({}))).await;
    assert_eq!(err(&r), (-32029, json!({"max": 2})), "the VM cap has its own code: {r}");
}

#[tokio::test]
async fn a_forced_stop_skips_the_power_button() {
    let driver = Arc::new(TestDriver::default());
    let (_dir, m) = manager(Arc::clone(&driver));
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let mut c = Client::connect(&server).await;
    call(&mut c, "compute.vm.create", spec("f", json!({}))).await;
    call(&mut c, "compute.vm.start", json!({"vm_id": "f"})).await;
    let r = call(&mut c, "compute.vm.stop", json!({"vm_id": "f", "force": true})).await;
    assert_eq!(r["result"]["state"], "stopped", "{r}");
    let tail = call(&mut c, "compute.vm.events.tail", json!({"vm_id": "f"})).await;
    let last = tail["result"]["events"].as_array().unwrap().last().cloned().unwrap();
    assert!(last["reason"].as_str().unwrap().starts_with("forced"), "the driver was told to force: {last}");
    call(&mut c, "compute.vm.start", json!({"vm_id": "f"})).await;
    call(&mut c, "compute.vm.stop", json!({"vm_id": "f"})).await;
    let tail = call(&mut c, "compute.vm.events.tail", json!({"vm_id": "f"})).await;
    let last = tail["result"]["events"].as_array().unwrap().last().cloned().unwrap();
    assert!(last["reason"].as_str().unwrap().contains("power button"), "a plain stop is not forced: {last}");
}

/// The next event notification on `c` (answers to calls are skipped).
async fn next_event(c: &mut Client) -> Value {
    loop {
        let m = c.recv().await;
        if m["method"] == "compute.vm.event" {
            return m["params"]["result"].clone();
        }
    }
}

#[tokio::test]
async fn create_and_remove_reach_a_follower() {
    let driver = Arc::new(TestDriver::default());
    let (_dir, m) = manager(Arc::clone(&driver));
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let mut c = Client::connect(&server).await;
    let mut f = Client::connect(&server).await;
    let r = call(&mut f, "compute.vm.events.follow", json!({})).await;
    assert!(r["result"].is_number() || r["result"].is_string(), "{r}");

    call(&mut c, "compute.vm.create", spec("new-1", json!({}))).await;
    let e = next_event(&mut f).await;
    assert_eq!((&e["vm_id"], &e["from"], &e["to"]), (&json!("new-1"), &Value::Null, &json!("pending")), "{e}");
    let created_seq = e["seq"].as_u64().unwrap();
    let r = call(&mut c, "compute.vm.remove", json!({"vm_id": "new-1"})).await;
    assert_eq!(r["result"]["removed"], true, "{r}");
    let e = next_event(&mut f).await;
    assert_eq!((&e["vm_id"], &e["from"], &e["to"]), (&json!("new-1"), &json!("pending"), &json!("removed")), "{e}");
    let removed_seq = e["seq"].as_u64().unwrap();
    assert!(removed_seq > created_seq);

    // The VM's history went with it; its removal stays in the global stream.
    let t = call(&mut c, "compute.vm.events.tail", json!({})).await;
    let events = t["result"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{t}");
    assert_eq!((events[0]["seq"].as_u64(), &events[0]["to"]), (Some(removed_seq), &json!("removed")), "{t}");
    assert_eq!(t["result"]["truncated"], false, "{t}");
    let r = call(&mut c, "compute.vm.events.tail", json!({"vm_id": "new-1"})).await;
    assert_eq!(r["error"]["code"], -32020, "{r}");
    // A follower from before the removal replays it.
    let mut late = Client::connect(&server).await;
    call(&mut late, "compute.vm.events.follow", json!({"since_seq": created_seq})).await;
    let e = next_event(&mut late).await;
    assert_eq!((e["seq"].as_u64(), &e["to"]), (Some(removed_seq), &json!("removed")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_then_follow_sees_every_transition_once() {
    let driver = Arc::new(TestDriver::default());
    driver.set_delay(Step::WaitRunning, Duration::from_millis(20));
    let (_dir, m) = manager(Arc::clone(&driver));
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let mut c = Client::connect(&server).await;
    // 50 VMs, half of them created before the list, all changing state around it.
    for i in 0..25 {
        call(&mut c, "compute.vm.create", spec(&format!("m-{i}"), json!({}))).await;
    }
    let mut busy = Vec::new();
    for i in 0..50 {
        let mut c = Client::connect(&server).await;
        busy.push(tokio::spawn(async move {
            let id = format!("m-{i}");
            if i >= 25 {
                call(&mut c, "compute.vm.create", spec(&id, json!({}))).await;
            }
            for _ in 0..2 {
                let r = call(&mut c, "compute.vm.start", json!({"vm_id": id})).await;
                assert_eq!(r["result"]["state"], "running", "{r}");
                let r = call(&mut c, "compute.vm.stop", json!({"vm_id": id, "force": i % 2 == 0})).await;
                assert_eq!(r["result"]["state"], "stopped", "{r}");
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    // List a page at a time, following from the first page's seq.
    let mut f = Client::connect(&server).await;
    let first = call(&mut c, "compute.vm.list", json!({"limit": 20})).await;
    let since = first["result"]["seq"].as_u64().unwrap();
    let r = call(&mut f, "compute.vm.events.follow", json!({"since_seq": since})).await;
    assert!(r.get("result").is_some(), "{r}");
    let mut cursor = first["result"]["next_cursor"].clone();
    while !cursor.is_null() {
        let page = call(&mut c, "compute.vm.list", json!({"limit": 20, "cursor": cursor})).await;
        cursor = page["result"]["next_cursor"].clone();
    }
    for t in busy {
        t.await.unwrap();
    }
    let last = call(&mut c, "compute.vm.list", json!({"limit": 1})).await;
    let end = call(&mut c, "compute.vm.events.tail", json!({"since_seq": 0, "limit": 1000})).await;
    let expected: Vec<u64> = end["result"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .filter(|&s| s > since)
        .collect();
    let final_seq = last["result"]["seq"].as_u64().unwrap();
    assert_eq!(expected.last().copied(), Some(final_seq), "the tail holds every event");
    assert!(expected.len() > 100, "the VMs changed state after the list: {}", expected.len());
    let mut seen = Vec::new();
    while seen.last() != Some(&final_seq) {
        seen.push(next_event(&mut f).await["seq"].as_u64().unwrap());
    }
    assert_eq!(seen, expected, "every transition after the list, once, in order");
}

#[tokio::test]
async fn a_cursor_older_than_the_history_is_truncated() {
    let driver = Arc::new(TestDriver::default());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ManagerConfig::new(dir.path(), vec![PathBuf::from("/var/lib/vm")]);
    cfg.ring_capacity = 4;
    let m = Manager::open(cfg, Some(driver as Arc<dyn VmDriver>)).unwrap();
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let mut c = Client::connect(&server).await;
    call(&mut c, "compute.vm.create", spec("t", json!({}))).await; // 1
    let t = call(&mut c, "compute.vm.events.tail", json!({"since_seq": 0})).await;
    assert_eq!(t["result"]["truncated"], false, "{t}");
    call(&mut c, "compute.vm.start", json!({"vm_id": "t"})).await; // 2-5: 1 leaves the ring
    let t = call(&mut c, "compute.vm.events.tail", json!({"since_seq": 0})).await;
    assert_eq!((&t["result"]["truncated"], &t["result"]["oldest_seq"]), (&json!(true), &json!(1)), "{t}");
    let seqs: Vec<u64> = t["result"]["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3, 4, 5], "what is left still comes: {t}");
    let t = call(&mut c, "compute.vm.events.tail", json!({"vm_id": "t", "since_seq": 0})).await;
    assert_eq!((&t["result"]["truncated"], &t["result"]["oldest_seq"]), (&json!(true), &json!(1)), "{t}");
    let t = call(&mut c, "compute.vm.events.tail", json!({"since_seq": 1})).await;
    assert_eq!(t["result"]["truncated"], false, "nothing after seq 1 is lost: {t}");
    assert!(t["result"].get("oldest_seq").is_none(), "{t}");
    // A follow from the lost cursor is refused, saying where the history is whole.
    let r = call(&mut c, "compute.vm.events.follow", json!({"since_seq": 0})).await;
    assert_eq!(r["error"]["code"], -32602, "{r}");
    assert_eq!(r["error"]["data"], json!({"field": "since_seq", "truncated": true, "oldest_seq": 1}), "{r}");
    let r = call(&mut c, "compute.vm.events.follow", json!({"since_seq": 1})).await;
    assert!(r.get("result").is_some(), "{r}");
}

#[tokio::test]
async fn a_list_page_stays_under_the_response_limit() {
    let driver = Arc::new(TestDriver::default());
    let (_dir, m) = manager(Arc::clone(&driver));
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let mut c = Client::connect(&server).await;
    // The largest labels a VM may carry, with values that JSON escapes to twice their size.
    let labels: serde_json::Map<String, Value> =
        (0..32).map(|i| (format!("{i:02}{}", "k".repeat(61)), json!("\\".repeat(256)))).collect();
    let vms = 150;
    for i in 0..vms {
        let r = call(&mut c, "compute.vm.create", spec(&format!("big-{i:03}"), Value::Object(labels.clone()))).await;
        assert!(r["result"].is_object(), "{r}");
    }
    let mut cursor = Value::Null;
    let (mut seen, mut pages) = (0, 0);
    loop {
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": "compute.vm.list", "params": {"limit": 1000, "cursor": cursor}});
        c.send(req.to_string().as_bytes()).await;
        let line = c.recv_line().await.expect("a page");
        assert!(line.len() < 600 * 1024, "a page is cut near 512 KiB: {} bytes", line.len());
        let r: Value = serde_json::from_str(&line).unwrap();
        let n = r["result"]["vms"].as_array().unwrap().len();
        assert!(n > 0, "every page makes progress");
        seen += n;
        pages += 1;
        cursor = r["result"]["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(seen, vms, "every VM once");
    assert!(pages >= 3, "the byte budget, not the limit, cut the pages: {pages}");
}
