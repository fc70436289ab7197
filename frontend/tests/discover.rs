//! rpc.discover against the server: it describes exactly the served methods, in OpenRPC 1.3's
//! shape; its params schemas accept and refuse what the server does, with the same required
//! fields; and its `state` enums are the Rust state enum.

mod common;
mod json_schema;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::{Client, start};
use json_schema::{method, params_schema};
use my_hypervisor_frontend::rpc::{self, Limits, errors};
use my_hypervisor_frontend::vm::{Manager, ManagerConfig, VmState};
use my_hypervisor_policy::names::{VM_ID_MAX, VM_ID_PATTERN, is_vm_id};
use serde_json::{Value, json};

fn manager() -> (tempfile::TempDir, Manager) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ManagerConfig::new(dir.path(), vec![PathBuf::from("/var/lib/vm")]);
    let m = Manager::open(cfg, None).unwrap();
    (dir, m)
}

/// A server as the frontend runs it today: no driver, so start and stop are not ready.
async fn client() -> (common::Server, Client, tempfile::TempDir) {
    let (dir, m) = manager();
    let server = start(rpc::methods(m).unwrap(), Limits::default());
    let c = Client::connect(&server).await;
    (server, c, dir)
}

/// Calls a method and returns its answer, skipping event notifications (a follow accepted
/// earlier on the connection streams the creates that follow).
async fn call(c: &mut Client, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
    let mut r = c.call(&req.to_string()).await;
    while r.get("method").is_some() {
        r = c.recv().await;
    }
    r
}

async fn discover(c: &mut Client) -> Value {
    let r = call(c, "rpc.discover", json!({})).await;
    assert!(r["result"].is_object(), "{r}");
    r["result"].clone()
}

#[tokio::test]
async fn discover_lists_exactly_the_served_methods() {
    let served: BTreeSet<String> = rpc::methods(manager().1).unwrap().method_names().map(String::from).collect();
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
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["x"], "stdin": "AAEC/w==", "encoding": "base64"}), true),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["x"], "encoding": "utf8"}), false),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["x"], "timeout_secs": 86400}), true),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["x"], "timeout_secs": 0}), false),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["x"], "timeout_secs": 86401}), false),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["x"], "max_output_bytes": 262144}), true),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": ["x"], "max_output_bytes": 262145}), false),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": vec!["x"; 1025]}), false),
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
        let mut values: BTreeSet<String> = s["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("`{key}` is not an enum: {s}"))
            .iter()
            .map(|v| v.as_str().unwrap_or("null").to_string())
            .collect();
        // An event's `from` is null for create's transition; its `to` is `removed` for a removal.
        match key.as_str() {
            "from" => {
                assert!(values.remove("null"), "{key}: {s}");
                assert_eq!(s["type"], json!(["string", "null"]), "{s}");
            }
            "to" => {
                assert!(values.remove("removed"), "{key}: {s}");
                assert_eq!(s["type"], "string", "{s}");
            }
            _ => assert_eq!(s["type"], "string", "{s}"),
        }
        assert_eq!(values, all, "{key}: {s}");
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

/// Params with every field given, for each by-name method (`firmware` aside: it excludes
/// `kernel`).
fn full_params(name: &str) -> Value {
    let vm = "web-1";
    match name {
        "compute.vm.create" => json!({
            "id": vm, "vcpus": 1, "memory_mib": 64, "kernel": "/var/lib/vm/k", "initramfs": "/var/lib/vm/i",
            "cmdline": "console=ttyS0", "disks": [{"path": "/var/lib/vm/d", "readonly": true}],
            "nets": [{"bridge": "br0", "mac": "52:54:00:12:34:56", "mtu": 1500}], "vsock": true, "agent": false,
            "labels": {"a": "b"}
        }),
        "compute.vm.stop" => json!({"vm_id": vm, "timeout_secs": 5, "force": false}),
        "compute.vm.events.tail" => json!({"vm_id": vm, "since_seq": 0, "limit": 10}),
        "compute.vm.events.follow" => json!({"vm_id": vm, "since_seq": 0}),
        "compute.vm.logs" => json!({"vm_id": vm, "stream": "vmm", "max_bytes": 10}),
        "compute.vm.exec" => json!({
            "vm_id": vm, "argv": ["true"], "env": {"A": "b"}, "cwd": "/", "timeout_secs": 5,
            "stdin": "aGk=", "encoding": "base64", "max_output_bytes": 10
        }),
        "compute.vm.list" => json!({"state": "running", "labels": "a=b", "limit": 10, "cursor": vm}),
        "compute.vm.status" => json!({"vm_id": vm, "verbose": true}),
        "rpc.discover" => json!({}),
        _ => json!({"vm_id": vm}),
    }
}

/// For every by-name method and every param: leaving it out is refused by the server exactly
/// when rpc.discover marks it required. The one exception is the cross-field rule on `kernel`.
#[tokio::test]
async fn required_params_are_the_ones_the_server_needs() {
    let (_server, mut c, _dir) = client().await;
    let doc = discover(&mut c).await;
    let mut checked = 0;
    for m in doc["methods"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        if m["paramStructure"] == "by-position" {
            continue;
        }
        let full = full_params(name);
        let r = call(&mut c, name, full.clone()).await;
        assert!(server_accepts(&r), "{name} {full}: {r}");
        let given: BTreeSet<&str> = full.as_object().unwrap().keys().map(String::as_str).collect();
        let described: BTreeSet<&str> = m["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .filter(|p| !(name == "compute.vm.create" && *p == "firmware"))
            .collect();
        assert_eq!(given, described, "{name}: the test's params and the described ones differ");
        for p in m["params"].as_array().unwrap() {
            let field = p["name"].as_str().unwrap();
            let mut params = full.clone();
            if params.as_object_mut().unwrap().remove(field).is_none() {
                continue;
            }
            let r = call(&mut c, name, params.clone()).await;
            if name == "compute.vm.create" && field == "kernel" {
                assert_eq!(r["error"]["code"], errors::INVALID_SPEC, "{r}");
                continue;
            }
            let required = p["required"] == true;
            assert_eq!(server_accepts(&r), !required, "{name} without `{field}` (required: {required}): {r}");
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} params checked");
}
