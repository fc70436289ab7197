//! The daemon's start-up check of the cloud-hypervisor binary (`policy::ch_binary`): its
//! version, and who owns and may write it and the dirs above it. A binary that fails the
//! check does not stop the daemon: every start is refused with the reason.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use my_hypervisor_tests::{Daemon, bin, have_root, pvh, scratch_root};
use serde_json::{Value, json};

fn rpc(d: &Daemon, method: &str, params: Value) -> Value {
    d.call(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
}

/// `dir` (mode `mode`) under the scratch root, holding `name` as a root-owned 0755 file with
/// `bytes`.
fn stage(root: &Path, dir: &str, mode: u32, name: &str, bytes: &[u8]) -> PathBuf {
    let dir = root.join(dir);
    std::fs::create_dir(&dir).expect("dir");
    std::fs::set_permissions(&dir, PermissionsExt::from_mode(mode)).expect("chmod dir");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write binary");
    std::fs::set_permissions(&p, PermissionsExt::from_mode(0o755)).expect("chmod binary");
    p
}

/// Starts a daemon with `ch` as its cloud-hypervisor, creates VM `v` (with a net when
/// `nets`) and starts it: returns the daemon and the start's reply.
fn start_vm(root: tempfile::TempDir, ch: &Path, uids: &str, nets: bool) -> (Daemon, Value) {
    std::fs::create_dir(root.path().join("images")).expect("images");
    let kernel = root.path().join("images/guest.elf");
    std::fs::write(&kernel, pvh::guest("my_hypervisor start-up check guest", false)).expect("guest");
    let d = Daemon::start_in(root, &["--cloud-hypervisor", ch.to_str().unwrap(), "--vm-uid-range", uids]);
    let mut spec = json!({"id": "v", "vcpus": 1, "memory_mib": 64, "kernel": kernel});
    if nets {
        spec["nets"] = json!([{"mac": "52:54:00:12:34:57"}]);
    }
    let r = rpc(&d, "compute.vm.create", spec);
    assert_eq!(r["result"]["state"], "pending", "{r}\n{}", d.log());
    let r = rpc(&d, "compute.vm.start", json!({"vm_id": "v"}));
    (d, r)
}

/// The start failed with `why` in its error and in the VM's last event, and the daemon
/// still serves.
fn refused(d: &Daemon, r: &Value, why: &[&str]) {
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(why.iter().all(|w| msg.contains(w)), "start error should say {why:?}: {r}\n{}", d.log());
    let status = rpc(d, "compute.vm.status", json!({"vm_id": "v"}));
    assert_eq!(status["result"]["state"], "start_failed", "{status}");
    let events = rpc(d, "compute.vm.events.tail", json!({"vm_id": "v"}));
    let last = events["result"]["events"].as_array().and_then(|e| e.last().cloned()).unwrap_or_default();
    let reason = last["reason"].as_str().unwrap_or_default();
    assert!(why.iter().all(|w| reason.contains(w)), "start_failed reason should say {why:?}: {last}");
    let r = rpc(d, "rpc.discover", json!({}));
    assert!(r.get("result").is_some(), "the daemon still serves: {r}");
    assert!(d.log().contains("no VM can start until cloud-hypervisor is fixed"), "{}", d.log());
    assert_eq!(rpc(d, "compute.vm.remove", json!({"vm_id": "v"}))["result"]["removed"], true);
}

#[test]
fn a_too_old_cloud_hypervisor_fails_each_start_with_the_reason_and_the_daemon_serves() {
    if !have_root("a_too_old_cloud_hypervisor_fails_each_start_with_the_reason_and_the_daemon_serves") {
        return;
    }
    let root = scratch_root();
    let ch = stage(root.path(), "old", 0o755, "cloud-hypervisor", b"#!/bin/sh\necho cloud-hypervisor v49.0\n");
    let (d, r) = start_vm(root, &ch, "63400-63409", false);
    refused(&d, &r, &["cloud-hypervisor refused at daemon start", "v49", "needs v50 or newer"]);
}

#[test]
fn cloud_hypervisor_v51_starts_no_vm_with_nets() {
    if !have_root("cloud_hypervisor_v51_starts_no_vm_with_nets") {
        return;
    }
    let root = scratch_root();
    let ch = stage(root.path(), "v51", 0o755, "cloud-hypervisor", b"#!/bin/sh\necho cloud-hypervisor v51.1\n");
    let (d, r) = start_vm(root, &ch, "63410-63419", true);
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("v51") && msg.contains("v52 or newer for a VM with nets"), "{r}\n{}", d.log());
    assert_eq!(rpc(&d, "compute.vm.status", json!({"vm_id": "v"}))["result"]["state"], "start_failed");
}

#[test]
fn a_cloud_hypervisor_in_a_dir_others_may_write_is_refused() {
    if !have_root("a_cloud_hypervisor_in_a_dir_others_may_write_is_refused") {
        return;
    }
    let root = scratch_root();
    let double = std::fs::read(bin("ch-double")).expect("ch-double");
    let ch = stage(root.path(), "open", 0o777, "cloud-hypervisor", &double);
    let (d, r) = start_vm(root, &ch, "63420-63429", false);
    refused(&d, &r, &["open (mode 777) is writable by others than root"]);
}

/// A sticky world-writable dir (mode 1777, like /var/tmp) counts as safe: others may add
/// entries but not rename or replace root's. The double then starts the VM.
#[test]
fn a_cloud_hypervisor_below_a_sticky_dir_others_may_write_runs() {
    if !have_root("a_cloud_hypervisor_below_a_sticky_dir_others_may_write_runs") {
        return;
    }
    let root = scratch_root();
    let double = std::fs::read(bin("ch-double")).expect("ch-double");
    let sticky = stage(root.path(), "sticky", 0o1777, "cloud-hypervisor", &double);
    let (d, r) = start_vm(root, &sticky, "63430-63439", false);
    assert_eq!(r["result"]["state"], "running", "{r}\n{}", d.log());
    let stopped = rpc(&d, "compute.vm.stop", json!({"vm_id": "v", "timeout_secs": 1}));
    assert_eq!(stopped["result"]["state"], "stopped", "{stopped}");
}

/// The double answers `--version` as cloud-hypervisor does, in the form the check parses.
#[test]
fn the_double_answers_version_like_cloud_hypervisor() {
    let out = std::process::Command::new(bin("ch-double")).arg("--version").output().expect("run ch-double");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(my_hypervisor_policy::ch_binary::parse_version("ch-double", &text), Ok(53), "{text}");
}
