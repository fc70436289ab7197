//! The served API: every compute.vm method answers with its documented errors, and the VM
//! methods work over the socket, each result matching its schema in rpc.discover
//! (tests/discover.rs holds the schemas to the server).

mod common;
mod json_schema;

use std::path::PathBuf;
use std::sync::Arc;

use common::driver::TestDriver;
use common::{Client, start};
use json_schema::method;
use my_hypervisor_frontend::rpc::{self, Limits, errors};
use my_hypervisor_frontend::vm::{Manager, ManagerConfig, VmDriver};
use serde_json::{Value, json};

fn manager(driver: Option<Arc<dyn VmDriver>>) -> (tempfile::TempDir, Manager) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ManagerConfig::new(dir.path(), vec![PathBuf::from("/var/lib/vm")]);
    let m = Manager::open(cfg, driver).unwrap();
    (dir, m)
}

/// A server as the frontend runs it today: no driver, so start and stop are not ready.
async fn client() -> (common::Server, Client, tempfile::TempDir) {
    let (dir, m) = manager(None);
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let c = Client::connect(&server).await;
    (server, c, dir)
}

async fn call(c: &mut Client, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
    c.call(&req.to_string()).await
}

async fn discover(c: &mut Client) -> Value {
    let r = call(c, "rpc.discover", json!({})).await;
    assert!(r["result"].is_object(), "{r}");
    r["result"].clone()
}

/// Calls a method and checks its result against the method's result schema in `doc`.
async fn checked(c: &mut Client, doc: &Value, name: &str, params: Value) -> Value {
    let r = call(c, name, params).await;
    if !r["result"].is_null() {
        let schema = &method(doc, name)["result"]["schema"];
        if let Err(e) = json_schema::validate(schema, &r["result"]) {
            panic!("{name}: the result does not match its schema: {e}\n{r}");
        }
    }
    r
}

fn valid_params(method: &str) -> Value {
    let vm = json!({"vm_id": "web-1"});
    match method {
        "compute.vm.create" => json!({
            "id": "web-1", "vcpus": 2, "memory_mib": 1024, "kernel": "/var/lib/vm/vmlinux",
            "disks": [{"path": "/var/lib/vm/root.img", "readonly": false}],
            "nets": [{"bridge": "br0", "mac": "52:54:00:12:34:56"}],
            "vsock": true, "agent": true, "labels": {"tenant": "a"}
        }),
        "compute.vm.list" => json!({}),
        "compute.vm.events.tail" => json!({"since_seq": 3}),
        "compute.vm.stop" => json!({"vm_id": "web-1", "timeout_secs": 30}),
        "compute.vm.logs" => json!({"vm_id": "web-1", "stream": "vmm"}),
        "compute.vm.exec" => json!({"vm_id": "web-1", "argv": ["uname", "-a"]}),
        _ => vm,
    }
}

/// Methods whose backend comes later answer not-ready after validating their params.
const NOT_READY_YET: &[&str] =
    &["compute.vm.start", "compute.vm.stop", "compute.vm.console.endpoint", "compute.vm.logs", "compute.vm.exec"];

#[tokio::test]
async fn methods_without_a_backend_are_not_ready() {
    let (_server, mut c, _dir) = client().await;
    let r = call(&mut c, "compute.vm.create", valid_params("compute.vm.create")).await;
    assert_eq!(r["result"]["state"], "pending", "{r}");
    for def in rpc::api::API.iter().filter(|d| NOT_READY_YET.contains(&d.name)) {
        let r = call(&mut c, def.name, valid_params(def.name)).await;
        assert_eq!(r["error"]["code"], errors::NOT_READY, "{}: {r}", def.name);
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(def.name) && msg.contains("not built yet"), "{msg}");
        assert!(def.errors.contains(&errors::NOT_READY), "{} does not document not-ready", def.name);
    }
}

#[tokio::test]
async fn bad_params_name_the_field() {
    let (_server, mut c, _dir) = client().await;
    let cases = [
        ("compute.vm.start", json!({}), errors::INVALID_PARAMS_CODE, "vm_id"),
        ("compute.vm.start", json!({"vm_id": "Not_Valid"}), errors::INVALID_PARAMS_CODE, "vm_id"),
        ("compute.vm.stop", json!({"vm_id": "a", "timeout_secs": "soon"}), errors::INVALID_PARAMS_CODE, "timeout_secs"),
        ("compute.vm.list", json!({"all": true}), errors::INVALID_PARAMS_CODE, "all"),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": []}), errors::INVALID_PARAMS_CODE, "argv"),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["x".repeat(70_000)]}), errors::INVALID_PARAMS_CODE, "frame"),
        (
            "compute.vm.exec",
            json!({"vm_id": "a", "argv": ["x"], "stdin": "%%%"}),
            errors::INVALID_PARAMS_CODE,
            "base64",
        ),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["x"], "cwd": "a\0b"}), errors::INVALID_PARAMS_CODE, "cwd"),
        ("compute.vm.create", json!({"id": "a"}), errors::INVALID_PARAMS_CODE, "vcpus"),
        ("compute.vm.events.tail", json!({"limit": 0}), errors::INVALID_PARAMS_CODE, "limit"),
        ("compute.vm.events.tail", json!({"limit": 1001}), errors::INVALID_PARAMS_CODE, "limit"),
        ("compute.vm.events.follow", json!({"since_seq": -1}), errors::INVALID_PARAMS_CODE, "since_seq"),
        ("compute.vm.events.follow", json!({"vm_id": "nope"}), errors::NO_SUCH_VM, "nope"),
        (
            "compute.vm.create",
            json!({"id": "a", "vcpus": 1, "memory_mib": 1, "kernel": "/etc/passwd"}),
            errors::INVALID_SPEC,
            "kernel",
        ),
    ];
    for (method, params, code, field) in cases {
        let r = call(&mut c, method, params.clone()).await;
        assert_eq!(r["error"]["code"], code, "{method} {params}: {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{method} {params}: message does not mention {field}: {msg}");
    }

    let mut spec = valid_params("compute.vm.create");
    spec["vcpus"] = json!(0);
    let r = call(&mut c, "compute.vm.create", spec).await;
    assert_eq!(r["error"]["code"], errors::INVALID_SPEC, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("vcpus"), "{r}");
}

#[test]
fn docs_cover_every_method_limit_and_code() {
    use clap::Args;
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).unwrap();
    for def in rpc::api::API {
        assert!(doc.contains(&format!("### {}", def.name)), "docs/api.md lacks a section for {}", def.name);
    }
    let cmd = Limits::augment_args(clap::Command::new("frontend"));
    for arg in cmd.get_arguments() {
        let flag = format!("`--{}`", arg.get_long().unwrap());
        assert!(doc.contains(&flag), "docs/api.md does not document {flag}");
    }
    for (code, _) in errors::APPLICATION_CODES {
        assert!(doc.contains(&format!("| {code} |")), "docs/api.md lacks error code {code}");
    }
}

#[tokio::test]
async fn vm_methods_over_the_socket() {
    let driver = Arc::new(TestDriver::default());
    let (_dir, m) = manager(Some(driver as Arc<dyn VmDriver>));
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let mut c = Client::connect(&server).await;
    let mut follower = Client::connect(&server).await;
    let spec = valid_params("compute.vm.create");
    let doc = discover(&mut c).await;
    let event_schema =
        method(&doc, "compute.vm.events.tail")["result"]["schema"]["properties"]["events"]["items"].clone();

    let r = checked(&mut c, &doc, "compute.vm.create", spec.clone()).await;
    assert_eq!(r["result"], json!({"vm_id": "web-1", "state": "pending"}), "{r}");
    let r = checked(&mut c, &doc, "compute.vm.create", spec.clone()).await;
    assert_eq!(r["result"]["state"], "pending", "identical spec: the same VM: {r}");
    let mut other = spec.clone();
    other["vcpus"] = json!(4);
    let r = checked(&mut c, &doc, "compute.vm.create", other).await;
    assert_eq!(r["error"]["code"], errors::ALREADY_EXISTS, "{r}");

    let r = checked(&mut c, &doc, "compute.vm.list", json!({})).await;
    assert_eq!(r["result"]["vms"], json!([{"vm_id": "web-1", "state": "pending", "labels": {"tenant": "a"}}]), "{r}");
    let r = checked(&mut c, &doc, "compute.vm.status", json!({"vm_id": "web-1"})).await;
    assert_eq!(r["result"]["state"], "pending", "{r}");
    assert_eq!(r["result"]["spec"]["agent"], true, "{r}");
    assert_eq!(r["result"]["spec"]["disks"], spec["disks"], "{r}");

    // Follow from the start, then make transitions.
    let r = checked(&mut follower, &doc, "compute.vm.events.follow", json!({"vm_id": "web-1", "since_seq": 0})).await;
    let sub = r["result"].clone();
    assert!(sub.is_number() || sub.is_string(), "{r}");
    let r = checked(&mut c, &doc, "compute.vm.start", json!({"vm_id": "web-1"})).await;
    assert_eq!(r["result"], json!({"vm_id": "web-1", "state": "running"}), "{r}");
    let r = checked(&mut c, &doc, "compute.vm.remove", json!({"vm_id": "web-1"})).await;
    assert_eq!(r["error"]["code"], errors::ILLEGAL_TRANSITION, "{r}");
    let r = checked(&mut c, &doc, "compute.vm.stop", json!({"vm_id": "web-1", "timeout_secs": 5})).await;
    assert_eq!(r["result"]["state"], "stopped", "{r}");

    let tail =
        checked(&mut c, &doc, "compute.vm.events.tail", json!({"vm_id": "web-1", "since_seq": 2, "limit": 3})).await;
    let seqs: Vec<u64> =
        tail["result"]["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![3, 4, 5], "{tail}");
    assert_eq!(tail["result"]["next_seq"], 5);

    let mut streamed = Vec::new();
    for _ in 0..7 {
        let n = follower.recv().await;
        assert_eq!(n["method"], "compute.vm.event", "{n}");
        assert_eq!(n["params"]["subscription"], sub, "{n}");
        json_schema::validate(&event_schema, &n["params"]["result"]).unwrap();
        streamed.push(n["params"]["result"].clone());
    }
    let states: Vec<(&str, &str)> =
        streamed.iter().map(|e| (e["from"].as_str().unwrap_or("null"), e["to"].as_str().unwrap())).collect();
    assert_eq!(
        states,
        vec![
            ("null", "pending"),
            ("pending", "provisioning"),
            ("provisioning", "configured"),
            ("configured", "starting"),
            ("starting", "running"),
            ("running", "stopping"),
            ("stopping", "stopped"),
        ]
    );
    let all = checked(&mut c, &doc, "compute.vm.events.tail", json!({})).await;
    assert_eq!(all["result"]["events"].as_array().unwrap(), &streamed);
    let r = checked(&mut follower, &doc, "compute.vm.events.unfollow", json!([sub])).await;
    assert_eq!(r["result"], true, "{r}");

    let r = checked(&mut c, &doc, "compute.vm.remove", json!({"vm_id": "web-1"})).await;
    assert_eq!(r["result"], json!({"vm_id": "web-1", "removed": true}), "{r}");
    let r = checked(&mut c, &doc, "compute.vm.status", json!({"vm_id": "web-1"})).await;
    assert_eq!(r["error"]["code"], errors::NO_SUCH_VM, "{r}");
    let r = checked(&mut c, &doc, "compute.vm.list", json!({})).await;
    assert_eq!(r["result"]["vms"], json!([]), "{r}");
}
