//! The served API: rpc.discover describes exactly the served methods, and every compute.vm
//! method answers with its documented errors.

mod common;

use std::collections::BTreeSet;

use common::{Client, start};
use my_hypervisor_frontend::rpc::{self, Limits, errors};
use serde_json::{Value, json};

async fn client() -> (common::Server, Client) {
    let server = start(rpc::methods().unwrap(), Limits::default());
    let c = Client::connect(&server).await;
    (server, c)
}

async fn call(c: &mut Client, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
    c.call(&req.to_string()).await
}

#[tokio::test]
async fn discover_lists_exactly_the_served_methods() {
    let served: BTreeSet<String> = rpc::methods().unwrap().method_names().map(String::from).collect();
    let (_server, mut c) = client().await;
    let r = call(&mut c, "rpc.discover", json!({})).await;
    let doc = &r["result"];
    assert!(doc["openrpc"].as_str().is_some_and(|v| v.starts_with("1.")), "{doc}");
    let described: BTreeSet<String> = doc["methods"]
        .as_array()
        .expect("methods array")
        .iter()
        .map(|m| m["name"].as_str().expect("method name").to_string())
        .collect();
    assert_eq!(described, served);

    let expected: BTreeSet<String> = [
        "create",
        "start",
        "stop",
        "remove",
        "status",
        "list",
        "events.tail",
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
        assert!(m["params"].is_array(), "{m}");
        assert!(m["result"]["schema"].is_object(), "{m}");
    }
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

#[tokio::test]
async fn every_vm_method_is_not_ready_yet() {
    let (_server, mut c) = client().await;
    for def in rpc::api::API.iter().filter(|d| d.name.starts_with("compute.vm.")) {
        let r = call(&mut c, def.name, valid_params(def.name)).await;
        assert_eq!(r["error"]["code"], errors::NOT_READY, "{}: {r}", def.name);
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(def.name) && msg.contains("not built yet"), "{msg}");
        assert!(def.errors.contains(&errors::NOT_READY), "{} does not document not-ready", def.name);
    }
}

#[tokio::test]
async fn bad_params_name_the_field() {
    let (_server, mut c) = client().await;
    let cases = [
        ("compute.vm.start", json!({}), errors::INVALID_PARAMS_CODE, "vm_id"),
        ("compute.vm.start", json!({"vm_id": "Not_Valid"}), errors::INVALID_PARAMS_CODE, "vm_id"),
        (
            "compute.vm.stop",
            json!({"vm_id": "a", "timeout_secs": "soon"}),
            errors::INVALID_PARAMS_CODE,
            "timeout_secs",
        ),
        ("compute.vm.list", json!({"all": true}), errors::INVALID_PARAMS_CODE, "all"),
        ("compute.vm.exec", json!({"vm_id": "a", "argv": []}), errors::INVALID_PARAMS_CODE, "argv"),
        ("compute.vm.create", json!({"id": "a"}), errors::INVALID_PARAMS_CODE, "vcpus"),
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
