//! VM records through the real daemon: create, list, status, events and remove over the RPC
//! socket, state.json on disk as the frontend user, and records surviving a frontend restart.

use std::time::Duration;

use my_hypervisor_tests::{Daemon, have_root, owner_mode, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

fn call(d: &Daemon, method: &str, params: Value) -> Value {
    d.call(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
}

#[test]
fn create_list_status_remove_through_the_daemon() {
    if !have_root("create_list_status_remove_through_the_daemon") {
        return;
    }
    let d = Daemon::start(&[]);
    let images = d.path("images");
    let spec = json!({
        "id": "web-1", "vcpus": 2, "memory_mib": 512,
        "kernel": images.join("vmlinux"),
        "disks": [{"path": images.join("web-1.raw"), "readonly": false}],
        "nets": [{"mac": "52:54:00:12:34:56"}],
        "vsock": true, "labels": {"tenant": "a"}
    });
    let r = call(&d, "compute.vm.create", spec.clone());
    assert_eq!(r["result"], json!({"vm_id": "web-1", "state": "pending"}), "{r}\n{}", d.log());
    let r = call(&d, "compute.vm.create", spec.clone());
    assert_eq!(r["result"]["state"], "pending", "identical create: {r}");
    let mut outside = spec.clone();
    outside["id"] = json!("web-2");
    outside["kernel"] = json!("/etc/passwd");
    let r = call(&d, "compute.vm.create", outside);
    assert_eq!(r["error"]["code"], -32024, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("`kernel`"), "{r}");

    let r = call(&d, "compute.vm.list", json!({}));
    assert_eq!(r["result"]["vms"], json!([{"vm_id": "web-1", "state": "pending", "labels": {"tenant": "a"}}]), "{r}");
    let r = call(&d, "compute.vm.status", json!({"vm_id": "web-1"}));
    assert_eq!(r["result"]["state"], "pending", "{r}");
    assert_eq!(r["result"]["spec"]["agent"], true, "agent defaults to vsock: {r}");
    let r = call(&d, "compute.vm.events.tail", json!({}));
    let events = r["result"]["events"].as_array().cloned().unwrap_or_default();
    let created: Vec<(&Value, &Value, &Value)> = events.iter().map(|e| (&e["vm_id"], &e["from"], &e["to"])).collect();
    assert_eq!(created, [(&json!("web-1"), &Value::Null, &json!("pending"))], "create's transition only: {r}");
    // The kernel named in the spec does not exist: the start fails at provisioning, with the
    // broker's reason, and leaves nothing behind.
    let r = call(&d, "compute.vm.start", json!({"vm_id": "web-1"}));
    assert_eq!(r["error"]["code"], -32023, "{r}");
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("provisioning failed") && msg.contains("vmlinux") && msg.contains("ENOENT"), "{r}");
    assert!(msg.contains("resources released"), "{r}");

    // state.json belongs to the frontend user and is private.
    let file = d.path("run/vms/web-1.json");
    assert_eq!(owner_mode(&file), (61000, 61000, 0o600));
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(on_disk["schema_version"], 2);
    assert_eq!(on_disk["state"], "start_failed");

    // A new frontend reloads the record.
    let pid = d.frontend_pid();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill frontend");
    let r = wait_for("the restarted frontend to list web-1", Duration::from_secs(15), || {
        let alive = d.frontend_pid() != pid;
        let r = alive.then(|| std::panic::catch_unwind(|| call(&d, "compute.vm.status", json!({"vm_id": "web-1"}))));
        r.and_then(Result::ok).filter(|r| r.get("result").is_some())
    });
    assert_eq!(r["result"]["state"], "start_failed", "{r}");

    let r = call(&d, "compute.vm.remove", json!({"vm_id": "web-1"}));
    assert_eq!(r["result"], json!({"vm_id": "web-1", "removed": true}), "{r}");
    let r = call(&d, "compute.vm.status", json!({"vm_id": "web-1"}));
    assert_eq!(r["error"]["code"], -32020, "{r}");
    assert!(!file.exists());
    let r = call(&d, "compute.vm.list", json!({}));
    assert_eq!(r["result"]["vms"], json!([]), "{r}");
}
