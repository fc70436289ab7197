//! The served API: rpc.discover describes exactly the served methods, its schemas accept and
//! refuse what the server does, every compute.vm method answers with its documented errors,
//! and the VM methods work over the socket, each result matching its schema.

mod common;
mod json_schema;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use common::driver::TestDriver;
use common::{Client, start};
use my_hypervisor_frontend::rpc::{self, Limits, errors};
use my_hypervisor_frontend::vm::{Manager, ManagerConfig, VmDriver, VmState};
use my_hypervisor_policy::names::{VM_ID_MAX, VM_ID_PATTERN, is_vm_id};
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

#[tokio::test]
async fn discover_lists_exactly_the_served_methods() {
    let served: BTreeSet<String> = rpc::methods(manager(None).1).unwrap().method_names().map(String::from).collect();
    let (_server, mut c, _dir) = client().await;
    let doc = discover(&mut c).await;
    assert_eq!(doc["openrpc"], "1.3.2", "{doc}");
    for key in ["title", "version"] {
        assert!(doc["info"][key].as_str().is_some_and(|v| !v.is_empty()), "info.{key}: {doc}");
    }
    let described: Vec<String> = doc["methods"]
        .as_array()
        .expect("methods array")
        .iter()
        .map(|m| m["name"].as_str().expect("method name").to_string())
        .collect();
    assert_eq!(described.len(), BTreeSet::from_iter(&described).len(), "a method is described twice");
    assert_eq!(BTreeSet::from_iter(described), served);

    let expected: BTreeSet<String> = [
        "create",
        "start",
        "stop",
        "remove",
        "status",
        "list",
        "events.tail",
        "events.follow",
        "events.unfollow",
        "console.endpoint",
        "logs",
        "exec",
    ]
    .iter()
    .map(|m| format!("compute.vm.{m}"))
    .chain(["rpc.discover".to_string()])
    .collect();
    assert_eq!(served, expected);

    for m in doc["methods"].as_array().unwrap() {
        let by_position = m["name"] == "compute.vm.events.unfollow";
        assert_eq!(m["paramStructure"], if by_position { "by-position" } else { "by-name" }, "{m}");
        for p in m["params"].as_array().expect("params array") {
            assert!(p["name"].is_string() && p["required"].is_boolean() && p["schema"].is_object(), "{p}");
        }
        assert!(m["result"]["schema"].is_object(), "{m}");
        assert!(m["errors"].is_array(), "{m}");
    }
    // The document matches the result schema it gives for itself.
    let own = method(&doc, "rpc.discover")["result"]["schema"].clone();
    json_schema::validate(&own, &doc).unwrap();
}

async fn discover(c: &mut Client) -> Value {
    let r = call(c, "rpc.discover", json!({})).await;
    assert!(r["result"].is_object(), "{r}");
    r["result"].clone()
}

fn method<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["methods"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name}"))
}

/// A method's by-name params as one object schema, rebuilt from its OpenRPC content
/// descriptors. Unknown params are refused (docs/api.md), hence `additionalProperties`.
fn params_schema(doc: &Value, name: &str) -> Value {
    let params = method(doc, name)["params"].as_array().unwrap();
    let properties: serde_json::Map<String, Value> =
        params.iter().map(|p| (p["name"].as_str().unwrap().to_string(), p["schema"].clone())).collect();
    let required: Vec<&Value> = params.iter().filter(|p| p["required"] == true).map(|p| &p["name"]).collect();
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

/// Whether the server took the params: anything but an invalid-params or invalid-spec error.
fn server_accepts(r: &Value) -> bool {
    let code = r["error"]["code"].as_i64();
    !matches!(code, Some(c) if c == i64::from(errors::INVALID_PARAMS_CODE) || c == i64::from(errors::INVALID_SPEC))
}

#[test]
fn the_validator_works() {
    json_schema::self_test();
}

#[test]
fn the_vm_id_pattern_is_policys_rule() {
    let re = regex::Regex::new(VM_ID_PATTERN).unwrap();
    let long = "a".repeat(VM_ID_MAX);
    let too_long = "a".repeat(VM_ID_MAX + 1);
    for id in ["a", "web-1", "0-0", "-", long.as_str(), "", "A", "a_b", "a.b", "a\n", "\na", "é", "a b", &too_long] {
        assert_eq!(re.is_match(id), is_vm_id(id), "{id:?}");
    }
}

/// For each case, the method's params schema from rpc.discover and the server agree, and both
/// give the expected verdict.
#[tokio::test]
async fn params_schemas_accept_and_refuse_what_the_server_does() {
    let (_server, mut c, _dir) = client().await;
    let doc = discover(&mut c).await;
    let long_id = "a".repeat(VM_ID_MAX);
    let too_long_id = "a".repeat(VM_ID_MAX + 1);
    let spec = |edit: &dyn Fn(&mut Value)| {
        let mut v = json!({"id": "p-1", "vcpus": 1, "memory_mib": 64, "kernel": "/var/lib/vm/k"});
        edit(&mut v);
        v
    };
    let cases: Vec<(&str, Value, bool)> = vec![
        ("compute.vm.start", json!({"vm_id": "web-1"}), true),
        ("compute.vm.start", json!({"vm_id": long_id}), true),
        ("compute.vm.start", json!({}), false),
        ("compute.vm.start", json!(["web-1"]), false),
        ("compute.vm.events.tail", json!([]), false),
        ("compute.vm.start", json!({"vm_id": too_long_id}), false),
        ("compute.vm.start", json!({"vm_id": "Web_1"}), false),
        ("compute.vm.start", json!({"vm_id": ""}), false),
        ("compute.vm.start", json!({"vm_id": 7}), false),
        ("compute.vm.start", json!({"vm_id": "a", "force": true}), false),
        ("compute.vm.status", json!({"vm_id": "a\n"}), false),
        ("compute.vm.remove", json!({"vm_id": null}), false),
        ("compute.vm.stop", json!({"vm_id": "a", "timeout_secs": 3600}), true),
        ("compute.vm.stop", json!({"vm_id": "a", "timeout_secs": null}), true),
        ("compute.vm.stop", json!({"vm_id": "a", "timeout_secs": 3601}), false),
        ("compute.vm.stop", json!({"vm_id": "a", "timeout_secs": -1}), false),
        ("compute.vm.stop", json!({"vm_id": "a", "timeout_secs": "soon"}), false),
        ("compute.vm.list", json!({}), true),
        ("compute.vm.list", json!({"all": true}), false),
        ("rpc.discover", json!({}), true),
        ("rpc.discover", json!({"x": 1}), false),
        ("compute.vm.events.tail", json!({}), true),
        ("compute.vm.events.tail", json!({"limit": 1, "since_seq": 0}), true),
        ("compute.vm.events.tail", json!({"limit": 1000}), true),
        ("compute.vm.events.tail", json!({"limit": 0}), false),
        ("compute.vm.events.tail", json!({"limit": 1001}), false),
        ("compute.vm.events.tail", json!({"since_seq": -1}), false),
        ("compute.vm.events.tail", json!({"vm_id": "NO"}), false),
        ("compute.vm.events.follow", json!({"since_seq": 0}), true),
        ("compute.vm.events.follow", json!({"since_seq": 1.5}), false),
        ("compute.vm.events.follow", json!({"vm_id": "a/b"}), false),
        ("compute.vm.events.follow", json!({"limit": 1}), false),
        ("compute.vm.console.endpoint", json!({"vm_id": "a"}), true),
        ("compute.vm.console.endpoint", json!({"vm_id": "a", "path": "/x"}), false),
        ("compute.vm.logs", json!({"vm_id": "a", "stream": "vmm", "max_bytes": 1}), true),
        ("compute.vm.logs", json!({"vm_id": "a", "stream": "kernel"}), false),
        ("compute.vm.logs", json!({"vm_id": "a", "max_bytes": 0}), false),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["true"], "env": {"A": "b"}, "cwd": "/"}), true),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": []}), false),
        ("compute.vm.exec", json!({"vm_id": "a"}), false),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": [1]}), false),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["x"], "env": {"A": 1}}), false),
        ("compute.vm.create", spec(&|_| {}), true),
        ("compute.vm.create", spec(&|v| v["labels"] = json!({"team/app": "x"})), true),
        ("compute.vm.create", spec(&|v| v["nets"] = json!([{"mac": "52:54:00:12:34:56", "mtu": 68}])), true),
        ("compute.vm.create", spec(&|v| v["cmdline"] = json!("x".repeat(2047))), true),
        ("compute.vm.create", spec(&|v| v["vcpus"] = json!(64)), true),
        ("compute.vm.create", spec(&|v| v.as_object_mut().unwrap().remove("vcpus").map(drop).unwrap()), false),
        ("compute.vm.create", spec(&|v| v.as_object_mut().unwrap().remove("id").map(drop).unwrap()), false),
        ("compute.vm.create", spec(&|v| v["id"] = json!("P_1")), false),
        ("compute.vm.create", spec(&|v| v["id"] = json!(too_long_id)), false),
        ("compute.vm.create", spec(&|v| v["vcpus"] = json!(0)), false),
        ("compute.vm.create", spec(&|v| v["vcpus"] = json!(65)), false),
        ("compute.vm.create", spec(&|v| v["memory_mib"] = json!(0)), false),
        ("compute.vm.create", spec(&|v| v["cmdline"] = json!("x".repeat(2048))), false),
        ("compute.vm.create", spec(&|v| v["disks"] = Value::Array(vec![json!({"path": "/var/lib/vm/d"}); 9])), false),
        ("compute.vm.create", spec(&|v| v["disks"] = json!([{"readonly": true}])), false),
        ("compute.vm.create", spec(&|v| v["nets"] = Value::Array(vec![json!({}); 5])), false),
        ("compute.vm.create", spec(&|v| v["nets"] = json!([{"mtu": 67}])), false),
        ("compute.vm.create", spec(&|v| v["nets"] = json!([{"mac": "52:54:00:12:34"}])), false),
        ("compute.vm.create", spec(&|v| v["nets"] = json!([{"bridge": "a-bridge-name-too-long"}])), false),
        ("compute.vm.create", spec(&|v| v["labels"] = json!({"bad key": "x"})), false),
        ("compute.vm.create", spec(&|v| v["labels"] = json!({"k": 1})), false),
        ("compute.vm.create", spec(&|v| v["labels"] = json!({"k": "x".repeat(257)})), false),
        ("compute.vm.create", spec(&|v| v["nets"] = json!([{"mac": "01:00:5e:00:00:01"}])), false),
        ("compute.vm.create", spec(&|v| v["nets"] = json!([{"mac": "02:00:5E:00:00:01"}])), true),
        ("compute.vm.create", spec(&|v| v["vsock"] = json!("yes")), false),
        ("compute.vm.create", spec(&|v| v["gpu"] = json!(true)), false),
    ];
    let mut next_id = 0;
    for (name, mut params, expected) in cases {
        if name == "compute.vm.create" && expected {
            // A fresh id each time, so no accepted case meets an earlier one.
            next_id += 1;
            params["id"] = json!(format!("p-{next_id}"));
        }
        let schema = json_schema::validate(&params_schema(&doc, name), &params);
        let r = call(&mut c, name, params.clone()).await;
        let server = server_accepts(&r);
        assert_eq!(schema.is_ok(), expected, "{name} {params}: schema says {schema:?}");
        assert_eq!(server, expected, "{name} {params}: server answered {r}");
    }
}

/// Every `state` (and `from`/`to`) in a result schema is exactly the Rust state enum.
#[tokio::test]
async fn the_state_enum_is_the_rust_one() {
    let (_server, mut c, _dir) = client().await;
    let doc = discover(&mut c).await;
    let all: BTreeSet<String> = VmState::ALL.iter().map(|s| s.to_string()).collect();
    let mut found = Vec::new();
    for m in doc["methods"].as_array().unwrap() {
        state_enums(&m["result"]["schema"], &mut found);
    }
    for (key, s) in &found {
        let values: BTreeSet<String> = s["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("`{key}` is not an enum: {s}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(values, all, "{key}: {s}");
        assert_eq!(s["type"], "string", "{s}");
    }
    let seen = found.len();
    // create/start/stop, status, list, and an event's from and to.
    assert!(seen >= 7, "only {seen} state enums found");
}

/// The schemas of every property named `state`, `from` or `to` under `schema`.
fn state_enums(schema: &Value, out: &mut Vec<(String, Value)>) {
    match schema {
        Value::Object(obj) => {
            if let Some(props) = obj.get("properties").and_then(Value::as_object) {
                for key in ["state", "from", "to"] {
                    if let Some(s) = props.get(key) {
                        out.push((key.to_string(), s.clone()));
                    }
                }
            }
            obj.values().for_each(|v| state_enums(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| state_enums(v, out)),
        _ => {}
    }
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
    assert_eq!(r["result"], json!({"vms": [{"vm_id": "web-1", "state": "pending", "labels": {"tenant": "a"}}]}));
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
    for _ in 0..6 {
        let n = follower.recv().await;
        assert_eq!(n["method"], "compute.vm.event", "{n}");
        assert_eq!(n["params"]["subscription"], sub, "{n}");
        json_schema::validate(&event_schema, &n["params"]["result"]).unwrap();
        streamed.push(n["params"]["result"].clone());
    }
    let states: Vec<(&str, &str)> =
        streamed.iter().map(|e| (e["from"].as_str().unwrap(), e["to"].as_str().unwrap())).collect();
    assert_eq!(
        states,
        vec![
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
    assert_eq!(r["result"], json!({"vms": []}));
}
