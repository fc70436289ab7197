//! What a proxy relies on, through the real daemon as root: the cloud-hypervisor test double
//! by default, or a real cloud-hypervisor when `MYHV_CLOUD_HYPERVISOR` names one. Concurrent
//! requests on one connection, a forced stop, and create and remove reaching a follower.

use std::time::{Duration, Instant};

use my_hypervisor_tests::{Daemon, RpcClient, have_root, pvh, scratch_root, staged_bin};
use serde_json::{Value, json};

struct Env {
    d: Daemon,
    real: bool,
}

impl Drop for Env {
    /// VMMs outlive their daemon by design; a test's must not outlive the test.
    fn drop(&mut self) {
        let marker = format!("{}/", self.d.path("run/vmm").display());
        for pid in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = pid.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&marker) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

impl Env {
    /// A daemon handing out VM uids from `uids` (this file's tests own 63200-63299).
    fn start(test: &str, uids: &str) -> Option<Env> {
        if !have_root(test) {
            return None;
        }
        let root = scratch_root();
        let real = std::env::var("MYHV_CLOUD_HYPERVISOR").ok();
        let vmm = real.clone().unwrap_or_else(|| staged_bin(root.path(), "ch-double").to_string_lossy().into_owned());
        let d = Daemon::start_in(root, &["--cloud-hypervisor", &vmm, "--vm-uid-range", uids]);
        Some(Env { d, real: real.is_some() })
    }

    fn client(&self) -> RpcClient {
        RpcClient::connect(&self.d.rpc_socket())
    }

    fn ok(&self, method: &str, params: Value) -> Value {
        let r = self.d.call(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
        assert!(r.get("result").is_some(), "{method} {params}: {r}\n{}", self.d.log());
        r["result"].clone()
    }

    /// Creates a VM running the idle PVH test guest, with the double's faults when given.
    fn create(&self, id: &str, faults: Option<&str>) {
        let kernel = self.d.path("images").join("guest.elf");
        if !kernel.exists() {
            std::fs::write(&kernel, pvh::guest("my_hypervisor proxy guest", false)).expect("guest");
        }
        let mut spec = json!({"id": id, "vcpus": 1, "memory_mib": 64, "kernel": kernel});
        if let (Some(f), false) = (faults, self.real) {
            spec["cmdline"] = json!(format!("console=ttyS0 ch_double.fault={f}"));
        }
        self.ok("compute.vm.create", spec);
    }

    fn last_reason(&self, id: &str) -> String {
        let t = self.ok("compute.vm.events.tail", json!({"vm_id": id}));
        t["events"].as_array().and_then(|e| e.last()).map_or(String::new(), |e| e["reason"].to_string())
    }
}

fn request(id: u64, method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

fn reply(c: &mut RpcClient) -> Value {
    loop {
        let line = c.read_line().expect("a reply line");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        if v.get("id").is_some() {
            return v;
        }
    }
}

#[test]
fn a_status_sent_after_a_slow_start_is_answered_first() {
    let test = "a_status_sent_after_a_slow_start_is_answered_first";
    let Some(env) = Env::start(test, "63200-63239") else { return };
    if env.real {
        println!("SKIP {test}: a slow boot is the double's fault; real CH boots the test guest at once");
        return;
    }
    env.create("slow", Some("slow-boot=3000"));
    let mut c = env.client();
    c.send_line(&request(1, "compute.vm.start", json!({"vm_id": "slow"})));
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    c.send_line(&request(2, "compute.vm.status", json!({"vm_id": "slow"})));
    let first = reply(&mut c);
    assert_eq!(first["id"], 2, "the status is answered while the start runs: {first}");
    assert!(t.elapsed() < Duration::from_secs(2), "the status did not wait for the start: {:?}", t.elapsed());
    assert_ne!(first["result"]["state"], "running", "{first}");
    let second = reply(&mut c);
    assert_eq!((&second["id"], &second["result"]["state"]), (&json!(1), &json!("running")), "{second}");
    env.ok("compute.vm.stop", json!({"vm_id": "slow", "force": true}));
}

#[test]
fn a_forced_stop_skips_the_power_button() {
    let Some(env) = Env::start("a_forced_stop_skips_the_power_button", "63240-63269") else { return };
    // A guest that powers off on the power button: had it been pressed, the guest would
    // have shut down by itself. Real CH's test guest has no ACPI and ignores it anyway.
    env.create("f", Some("honour-power-button"));
    env.ok("compute.vm.start", json!({"vm_id": "f"}));
    check_sandbox(&env, "f");
    let t = Instant::now();
    let r = env.ok("compute.vm.stop", json!({"vm_id": "f", "force": true, "timeout_secs": 600}));
    assert_eq!(r["state"], "stopped", "{r}");
    assert!(t.elapsed() < Duration::from_secs(20), "no grace period was waited: {:?}", t.elapsed());
    let reason = env.last_reason("f");
    assert!(reason.contains("forced") && reason.contains("vm.shutdown"), "{reason}");
    assert!(!reason.contains("power-button") && !reason.contains("guest shut down"), "{reason}");
    // The same guest without force: the power button, and the guest goes by itself.
    if !env.real {
        env.ok("compute.vm.start", json!({"vm_id": "f"}));
        env.ok("compute.vm.stop", json!({"vm_id": "f", "timeout_secs": 600}));
        let reason = env.last_reason("f");
        assert!(reason.contains("vm.power-button") && reason.contains("guest shut down"), "{reason}");
    }
}

/// The status of a running VM shows its sandbox: planned from the broker's stored report,
/// applied from the kernel's view of the VMM; `verbose` adds the whole report.
fn check_sandbox(env: &Env, id: &str) {
    let s = env.ok("compute.vm.status", json!({"vm_id": id}));
    let sb = &s["sandbox"];
    assert!(sb.get("error").is_none() && sb.get("report").is_none(), "{s}\n{}", env.d.log());
    let lines = |k: &str| -> Vec<String> {
        sb[k].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect()
    };
    let (planned, applied) = (lines("planned"), lines("applied"));
    let uid = planned[0].strip_prefix("uid ").and_then(|r| r.split(' ').next()).expect("planned uid").to_string();
    let n: u32 = uid.parse().expect("a uid");
    assert!((63240..=63269).contains(&n), "{planned:?}");
    assert!(planned.iter().any(|l| l.starts_with("landlock: ABI")), "{planned:?}");
    assert!(planned.iter().any(|l| l.starts_with("seccomp: default action")), "{planned:?}");
    assert_eq!(applied[0], format!("uid (real, effective, saved, fs): {uid} {uid} {uid} {uid}"), "{applied:?}");
    let zero = "0000000000000000";
    let caps = format!("capabilities: CapInh {zero}, CapPrm {zero}, CapEff {zero}, CapBnd {zero}, CapAmb {zero}");
    assert!(applied.contains(&caps), "{applied:?}");
    assert!(applied.contains(&"no_new_privs: 1".to_string()), "{applied:?}");
    assert!(applied.iter().any(|l| l.starts_with("seccomp: mode 2 (filter)")), "{applied:?}");
    assert!(applied.iter().any(|l| l.starts_with("pid namespace: own PID namespace")), "{applied:?}");
    let v = env.ok("compute.vm.status", json!({"vm_id": id, "verbose": true}));
    let report = v["sandbox"]["report"].as_str().unwrap_or_default();
    assert!(report.starts_with(&format!("sandbox of VM {id}\n")) && report.contains("[seccomp]"), "{v}");
}

#[test]
fn create_and_remove_reach_a_follower() {
    let Some(env) = Env::start("create_and_remove_reach_a_follower", "63290-63299") else { return };
    let mut f = env.client();
    f.send_line(&request(1, "compute.vm.events.follow", json!({})));
    let sub = reply(&mut f);
    assert!(sub.get("result").is_some(), "{sub}");
    env.create("seen", None);
    env.ok("compute.vm.remove", json!({"vm_id": "seen"}));
    let mut got = Vec::new();
    while got.len() < 2 {
        let line = f.read_line().expect("an event");
        let v: Value = serde_json::from_str(&line).unwrap();
        let e = &v["params"]["result"];
        got.push((e["vm_id"].clone(), e["from"].clone(), e["to"].clone()));
    }
    assert_eq!(
        got,
        [(json!("seen"), Value::Null, json!("pending")), (json!("seen"), json!("pending"), json!("removed"))]
    );
}

#[test]
fn a_second_stop_with_a_shorter_timeout_shortens_the_wait() {
    let Some(env) = Env::start("a_second_stop_with_a_shorter_timeout_shortens_the_wait", "63270-63289") else {
        return;
    };
    // The guest ignores the power button (real CH's test guest has no ACPI either).
    env.create("s", Some("ignore-power-button"));
    env.ok("compute.vm.start", json!({"vm_id": "s"}));
    let t = Instant::now();
    let socket = env.d.rpc_socket();
    let first = std::thread::spawn(move || {
        let mut c = RpcClient::connect(&socket);
        c.call(&json!({"jsonrpc": "2.0", "id": 1, "method": "compute.vm.stop", "params": {"vm_id": "s", "timeout_secs": 600}}))
    });
    std::thread::sleep(Duration::from_millis(500));
    let second = env.ok("compute.vm.stop", json!({"vm_id": "s", "timeout_secs": 1}));
    let first = first.join().expect("the first stop");
    assert_eq!((&first["result"]["state"], &second["state"]), (&json!("stopped"), &json!("stopped")), "{first}");
    assert!(t.elapsed() < Duration::from_secs(30), "the 600 s wait was cut to the second stop's: {:?}", t.elapsed());
    let reason = env.last_reason("s");
    assert!(reason.contains("a later stop shortened the wait"), "{reason}");
}
