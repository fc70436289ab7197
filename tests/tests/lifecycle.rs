//! VM lifecycles through the real daemon, as root: the cloud-hypervisor test double by
//! default, or a real cloud-hypervisor when `MYHV_CLOUD_HYPERVISOR` names one (faults the
//! double injects are then made from outside, or the case says why it cannot run).

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use my_hypervisor_tests::{Daemon, have_root, pvh, scratch_root, staged_bin, wait_for};
use serde_json::{Value, json};

struct Env {
    d: Daemon,
    /// Set when a real cloud-hypervisor is under test.
    real: Option<String>,
    /// This daemon's VM uids: the tests run side by side, each with its own daemon.
    uids: std::ops::RangeInclusive<u32>,
    /// The daemon's flags, for a restart.
    args: Vec<String>,
}

impl Drop for Env {
    /// VMMs outlive their daemon by design; a test's must not outlive the test.
    fn drop(&mut self) {
        for pid in self.processes_with(&format!("{}/", self.d.path("run/vmm").display())) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

static NEXT_RANGE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Env {
    fn start(test: &str) -> Option<Env> {
        Env::start_with(test, Env::next_range(), true)
    }

    fn next_range() -> std::ops::RangeInclusive<u32> {
        let n = NEXT_RANGE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // 62300-62399 belongs to the tests that name their own range.
        let first = 62000 + 100 * if n >= 3 { n + 1 } else { n };
        first..=first + 99
    }

    /// A daemon that hands out these VM uids, and stops its VMs when it exits.
    fn start_with_uids(test: &str, uids: std::ops::RangeInclusive<u32>) -> Option<Env> {
        Env::start_with(test, uids, true)
    }

    fn start_with(test: &str, uids: std::ops::RangeInclusive<u32>, stop_vms: bool) -> Option<Env> {
        if !have_root(test) {
            return None;
        }
        let root = scratch_root();
        let real = std::env::var("MYHV_CLOUD_HYPERVISOR").ok();
        let vmm = real.clone().unwrap_or_else(|| staged_bin(root.path(), "ch-double").to_string_lossy().into_owned());
        let range = format!("{}-{}", uids.start(), uids.end());
        let args = vec!["--cloud-hypervisor".to_string(), vmm, "--vm-uid-range".into(), range];
        let flags: Vec<&str> = args.iter().map(String::as_str).collect();
        let d = if stop_vms { Daemon::start_in(root, &flags) } else { Daemon::start_keeping_vms(root, &flags) };
        Some(Env { d, real, uids, args })
    }

    fn images(&self) -> PathBuf {
        self.d.path("images")
    }

    /// The PVH test guest, idle or powering itself off once it runs.
    fn guest(&self, shutdown: bool) -> String {
        let name = if shutdown { "guest-off.elf" } else { "guest.elf" };
        let p = self.images().join(name);
        if !p.exists() {
            std::fs::write(&p, pvh::guest("my_hypervisor lifecycle guest", shutdown)).expect("guest");
        }
        p.to_string_lossy().into_owned()
    }

    fn rpc(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let reply = self.d.call(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
        match reply.get("error") {
            Some(e) => Err((e["code"].as_i64().unwrap_or(0), e["message"].as_str().unwrap_or("").to_string())),
            None => Ok(reply["result"].clone()),
        }
    }

    fn ok(&self, method: &str, params: Value) -> Value {
        self.rpc(method, params.clone()).unwrap_or_else(|e| panic!("{method} {params}: {e:?}"))
    }

    fn create(&self, id: &str, kernel: &str, cmdline: Option<&str>) {
        let mut spec = json!({"id": id, "vcpus": 1, "memory_mib": 64, "kernel": kernel});
        if let Some(c) = cmdline {
            spec["cmdline"] = json!(c);
        }
        self.ok("compute.vm.create", spec);
    }

    fn status(&self, id: &str) -> Value {
        self.ok("compute.vm.status", json!({"vm_id": id}))
    }

    fn state(&self, id: &str) -> String {
        self.status(id)["state"].as_str().unwrap_or_default().to_string()
    }

    fn wait_state(&self, id: &str, want: &str, within: Duration) {
        wait_for(&format!("{id} to be {want}"), within, || (self.state(id) == want).then_some(()));
    }

    fn history(&self, id: &str) -> Vec<Value> {
        self.ok("compute.vm.events.tail", json!({"vm_id": id}))["events"].as_array().cloned().unwrap_or_default()
    }

    fn last_reason(&self, id: &str) -> String {
        self.history(id).last().map(|e| e["reason"].as_str().unwrap_or("").to_string()).unwrap_or_default()
    }

    /// Live processes that belong to the VM (its VMM runs with its runtime dir in argv).
    fn vmm_processes(&self, id: &str) -> Vec<i32> {
        self.processes_with(&format!("{}/", self.d.path(&format!("run/vmm/{id}")).display()))
    }

    fn processes_with(&self, marker: &str) -> Vec<i32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let alive = my_hypervisor_tests::proc_status(*pid).is_some_and(|s| !s["State"].starts_with('Z'));
                alive && String::from_utf8_lossy(&cmd).contains(marker)
            })
            .collect()
    }

    /// Nothing the VM ever held is left: process, tap, socket, dir, grant, journal entry.
    fn assert_nothing_left(&self, id: &str, disk: Option<&str>) {
        assert_eq!(self.vmm_processes(id), Vec::<i32>::new(), "no VMM process of {id}");
        let dir = self.d.path(&format!("run/vmm/{id}"));
        assert!(!dir.exists(), "runtime dir {} removed (sockets with it)", dir.display());
        let taps: Vec<String> = std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| self.uids.clone().any(|u| n.starts_with(&format!("mh{u}n"))))
            .collect();
        assert_eq!(taps, Vec::<String>::new(), "no tap left");
        if let Some(disk) = disk {
            let m = std::fs::metadata(disk).expect("disk");
            assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), 0, "disk handed back to root");
        }
        // The journal is postcard: the VM's id would appear as its length and bytes.
        let journal = std::fs::read(self.d.path("run/vmm/broker.journal")).expect("journal");
        let mut entry = vec![id.len() as u8];
        entry.extend(id.as_bytes());
        assert!(!journal.windows(entry.len()).any(|w| w == entry), "no journal entry for {id}");
    }

    /// The broker holds nothing at all (postcard: an empty list is a single zero byte).
    fn assert_journal_empty(&self) {
        assert_eq!(std::fs::read(self.d.path("run/vmm/broker.journal")).expect("journal"), vec![0]);
    }

    fn fault(&self, fault: &str) -> Option<String> {
        self.real.is_none().then(|| format!("console=ttyS0 ch_double.fault={fault}"))
    }
}

#[test]
fn create_start_stop_start_stop_remove_leaves_nothing() {
    let Some(env) = Env::start("create_start_stop_start_stop_remove_leaves_nothing") else { return };
    let disk = env.images().join("a.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let disk = disk.to_string_lossy().into_owned();
    env.ok(
        "compute.vm.create",
        json!({"id": "a", "vcpus": 1, "memory_mib": 64, "kernel": env.guest(false),
               "disks": [{"path": disk, "readonly": false}], "nets": [{"mtu": 1400}],
               "vsock": true, "agent": false}),
    );
    for round in 0..2 {
        assert_eq!(env.ok("compute.vm.start", json!({"vm_id": "a"}))["state"], "running", "round {round}");
        let st = env.status("a");
        let pid = st["pid"].as_i64().expect("pid") as i32;
        assert!(env.vmm_processes("a").contains(&pid), "round {round}: the VMM runs");
        let vsock = env.d.path("run/vmm/a/vsock.sock");
        let is_socket = std::fs::symlink_metadata(&vsock).is_ok_and(|m| m.file_type().is_socket());
        assert!(is_socket, "round {round}: the VMM serves vsock at {}", vsock.display());
        assert_eq!(
            env.ok("compute.vm.start", json!({"vm_id": "a"}))["state"],
            "running",
            "start on Running is a no-op"
        );
        let stopped = env.ok("compute.vm.stop", json!({"vm_id": "a", "timeout_secs": 1}));
        assert_eq!(stopped["state"], "stopped");
        assert_eq!(env.ok("compute.vm.stop", json!({"vm_id": "a"}))["state"], "stopped", "stop on Stopped is a no-op");
        assert_eq!(env.vmm_processes("a"), Vec::<i32>::new());
    }
    let states: Vec<String> = env.history("a").iter().map(|e| e["to"].as_str().unwrap_or("").to_string()).collect();
    let mut expected = vec!["pending"];
    expected.extend(["provisioning", "configured", "starting", "running", "stopping", "stopped"].repeat(2));
    assert_eq!(states, expected, "create's transition, then the others, in order");
    env.ok("compute.vm.remove", json!({"vm_id": "a"}));
    env.assert_nothing_left("a", Some(&disk));
    env.assert_journal_empty();
}

#[test]
fn stopping_the_daemon_keeps_vms_running_unless_told_to_stop_them() {
    let test = "stopping_the_daemon_keeps_vms_running_unless_told_to_stop_them";
    let Some(mut env) = Env::start_with(test, Env::next_range(), false) else { return };
    env.create("t", &env.guest(false), None);
    env.ok("compute.vm.start", json!({"vm_id": "t"}));
    let pid = env.vmm_processes("t");
    assert_eq!(pid.len(), 1);
    // The default: the daemon stops, its VMs keep running, and the journal still lists them.
    let args: Vec<&str> = env.args.iter().map(String::as_str).collect();
    env.d.restart(nix::sys::signal::Signal::SIGTERM, &args, true);
    assert_eq!(env.vmm_processes("t"), pid, "the VMM outlived the daemon and was adopted");
    assert_eq!(env.state("t"), "running");
    // With --stop-vms-on-exit (the harness's daemons use it), every VM is released.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(env.d.pid()), nix::sys::signal::Signal::SIGTERM).expect("term");
    let status = wait_for("the daemon to stop", Duration::from_secs(15), || env.d.child.try_wait().ok().flatten());
    assert!(status.success(), "{status}");
    env.assert_nothing_left("t", None);
    env.assert_journal_empty();
}

#[test]
fn a_vmm_that_floods_its_log_is_killed_and_fails() {
    let Some(env) = Env::start("a_vmm_that_floods_its_log_is_killed_and_fails") else { return };
    if env.real.is_some() {
        eprintln!(
            "SKIP a_vmm_that_floods_its_log_is_killed_and_fails with real cloud-hypervisor: only the double floods"
        );
        return;
    }
    env.create("f", &env.guest(false), env.fault("flood-log=100").as_deref());
    env.ok("compute.vm.start", json!({"vm_id": "f"}));
    env.wait_state("f", "failed", Duration::from_secs(20));
    let reason = env.last_reason("f");
    assert!(reason.contains("the VMM was killed") && reason.contains("bytes of log or events"), "{reason}");
    wait_for("the VMM to be gone", Duration::from_secs(10), || env.vmm_processes("f").is_empty().then_some(()));
    env.ok("compute.vm.remove", json!({"vm_id": "f"}));
    env.assert_nothing_left("f", None);
}

#[test]
fn a_vmm_crash_fails_the_vm() {
    let Some(env) = Env::start("a_vmm_crash_fails_the_vm") else { return };
    env.create("c", &env.guest(false), env.fault("crash=300").as_deref());
    env.ok("compute.vm.start", json!({"vm_id": "c"}));
    if env.real.is_some() {
        let pid = env.status("c")["pid"].as_i64().expect("pid") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill");
    }
    env.wait_state("c", "failed", Duration::from_secs(10));
    let reason = env.last_reason("c");
    assert!(reason.contains("exited unexpectedly") && reason.contains("signal 9"), "{reason}");
    env.ok("compute.vm.remove", json!({"vm_id": "c"}));
    env.assert_nothing_left("c", None);
}

#[test]
fn a_boot_failure_is_start_failed_with_nothing_left() {
    let Some(env) = Env::start("a_boot_failure_is_start_failed_with_nothing_left") else { return };
    let kernel = match env.real {
        // Real CH fails the boot of a kernel it cannot load.
        Some(_) => {
            let k = env.images().join("not-a-kernel");
            std::fs::write(&k, b"this is not a kernel").expect("write");
            k.to_string_lossy().into_owned()
        }
        None => env.guest(false),
    };
    env.create("b", &kernel, env.fault("exit-at-boot").as_deref());
    let err = env.rpc("compute.vm.start", json!({"vm_id": "b"})).expect_err("the start fails");
    assert!(err.1.contains("boot failed"), "{err:?}");
    assert_eq!(env.state("b"), "start_failed");
    assert!(env.last_reason("b").contains("resources released"), "{}", env.last_reason("b"));
    env.assert_nothing_left("b", None);
    // Nothing is held, so the VM can be removed as it is.
    env.ok("compute.vm.remove", json!({"vm_id": "b"}));
}

#[test]
fn an_ignored_power_button_means_a_forced_stop_within_the_timeout() {
    let Some(env) = Env::start("an_ignored_power_button_means_a_forced_stop_within_the_timeout") else {
        return;
    };
    env.create("p", &env.guest(false), env.fault("ignore-power-button").as_deref());
    env.ok("compute.vm.start", json!({"vm_id": "p"}));
    let t = Instant::now();
    assert_eq!(env.ok("compute.vm.stop", json!({"vm_id": "p", "timeout_secs": 1}))["state"], "stopped");
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(8), "{took:?}");
    let reason = env.last_reason("p");
    assert!(reason.contains("vm.power-button") && reason.contains("no shutdown within 1s"), "{reason}");
    assert!(reason.contains("vmm.shutdown") || reason.contains("SIGKILL"), "{reason}");
    env.ok("compute.vm.remove", json!({"vm_id": "p"}));
    env.assert_nothing_left("p", None);
}

#[test]
fn a_guest_initiated_shutdown_is_stopped() {
    let Some(env) = Env::start("a_guest_initiated_shutdown_is_stopped") else { return };
    // The double powers the idle guest off on request; real CH runs the guest that does it.
    match env.real {
        Some(_) => env.create("g", &env.guest(true), None),
        None => env.create("g", &env.guest(false), env.fault("guest-shutdown=300").as_deref()),
    }
    env.ok("compute.vm.start", json!({"vm_id": "g"}));
    env.wait_state("g", "stopped", Duration::from_secs(10));
    assert!(env.last_reason("g").contains("the guest shut down"), "{}", env.last_reason("g"));
    env.assert_nothing_left("g", None);
}

#[test]
fn a_guest_panic_fails_the_vm() {
    let Some(env) = Env::start("a_guest_panic_fails_the_vm") else { return };
    if env.real.is_some() {
        eprintln!(
            "SKIP a_guest_panic_fails_the_vm with real cloud-hypervisor: the PVH test guest has no pvpanic device driver"
        );
        return;
    }
    env.create("k", &env.guest(false), env.fault("panic=300").as_deref());
    env.ok("compute.vm.start", json!({"vm_id": "k"}));
    env.wait_state("k", "failed", Duration::from_secs(10));
    assert!(env.last_reason("k").contains("panicked"), "{}", env.last_reason("k"));
    env.ok("compute.vm.remove", json!({"vm_id": "k"}));
    env.assert_nothing_left("k", None);
}

#[test]
fn start_stop_storms_on_twenty_vms_end_where_the_processes_are() {
    let Some(env) = Env::start("start_stop_storms_on_twenty_vms_end_where_the_processes_are") else { return };
    let kernel = env.guest(false);
    let ids: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    for id in &ids {
        env.create(id, &kernel, None);
    }
    let sock = env.d.rpc_socket();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (ids, sock) = (&ids, &sock);
            s.spawn(move || {
                let mut c = my_hypervisor_tests::RpcClient::connect(sock);
                let mut x = 0x9E37_79B9u64.wrapping_mul(t + 1);
                for _ in 0..40 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let id = &ids[(x % 20) as usize];
                    let method = if x.is_multiple_of(3) { "compute.vm.stop" } else { "compute.vm.start" };
                    let params = json!({"vm_id": id, "timeout_secs": 1});
                    let _ = c.call(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
                }
            });
        }
    });
    for id in &ids {
        let st = env.status(id);
        let state = st["state"].as_str().unwrap_or_default();
        let procs = env.vmm_processes(id);
        match state {
            "running" => {
                let pid = st["pid"].as_i64().expect("pid") as i32;
                assert_eq!(procs, vec![pid], "{id} is running in exactly its recorded VMM");
            }
            "pending" | "stopped" | "start_failed" => {
                assert_eq!(procs, Vec::<i32>::new(), "{id} ({state}) has no VMM")
            }
            other => panic!("{id} settled in {other}"),
        }
    }
    for id in &ids {
        let _ = env.rpc("compute.vm.stop", json!({"vm_id": id, "timeout_secs": 1}));
        let _ = env.rpc("compute.vm.remove", json!({"vm_id": id}));
    }
    for id in &ids {
        assert_eq!(env.vmm_processes(id), Vec::<i32>::new());
    }
}

#[test]
fn a_frontend_killed_with_sigkill_leaves_running_vms_running() {
    let Some(env) = Env::start("a_frontend_killed_with_sigkill_leaves_running_vms_running") else { return };
    let kernel = env.guest(false);
    let ids = ["r1", "r2", "r3"];
    let mut before = Vec::new();
    for id in ids {
        env.create(id, &kernel, None);
        env.ok("compute.vm.start", json!({"vm_id": id}));
        before.push((env.status(id)["pid"].as_i64().expect("pid"), env.history(id)));
    }
    let old = env.d.frontend_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    wait_for("a new frontend", Duration::from_secs(10), || (env.d.frontend_pid() != old).then_some(()));
    wait_for("the new frontend to serve", Duration::from_secs(10), || env.rpc("compute.vm.list", json!({})).ok());
    for (id, (pid, history)) in ids.iter().zip(&before) {
        let st = env.status(id);
        assert_eq!(st["state"], "running", "{id} stays Running");
        assert_eq!(st["pid"].as_i64(), Some(*pid), "{id} keeps its VMM");
        assert!(env.vmm_processes(id).contains(&(*pid as i32)), "{id}'s VMM was never interrupted");
        assert_eq!(&env.history(id), history, "{id}'s history is intact");
    }
    for id in ids {
        assert_eq!(env.ok("compute.vm.stop", json!({"vm_id": id, "timeout_secs": 1}))["state"], "stopped");
        env.ok("compute.vm.remove", json!({"vm_id": id}));
        env.assert_nothing_left(id, None);
    }
    env.assert_journal_empty();
}

#[test]
fn a_vmm_that_dies_while_the_frontend_is_down_fails_its_vm() {
    let Some(env) = Env::start("a_vmm_that_dies_while_the_frontend_is_down_fails_its_vm") else { return };
    env.create("gone", &env.guest(false), None);
    env.ok("compute.vm.start", json!({"vm_id": "gone"}));
    let vmm = nix::unistd::Pid::from_raw(env.status("gone")["pid"].as_i64().expect("pid") as i32);
    // A frozen frontend cannot see the exit; the exit event dies with it.
    let old = nix::unistd::Pid::from_raw(env.d.frontend_pid());
    nix::sys::signal::kill(old, nix::sys::signal::Signal::SIGSTOP).expect("stop the frontend");
    nix::sys::signal::kill(vmm, nix::sys::signal::Signal::SIGKILL).expect("kill the VMM");
    wait_for("the VMM to be reaped", Duration::from_secs(10), || {
        my_hypervisor_tests::proc_status(vmm.as_raw()).is_none().then_some(())
    });
    nix::sys::signal::kill(old, nix::sys::signal::Signal::SIGKILL).expect("kill -9 the frontend");
    wait_for("a new frontend", Duration::from_secs(10), || (env.d.frontend_pid() != old.as_raw()).then_some(()));
    env.wait_state("gone", "failed", Duration::from_secs(10));
    let reason = env.last_reason("gone");
    assert!(reason.contains("went away while the frontend was down") && reason.contains("signal 9"), "{reason}");
    env.ok("compute.vm.remove", json!({"vm_id": "gone"}));
    env.assert_nothing_left("gone", None);
    env.assert_journal_empty();
}

#[test]
fn a_guest_reboot_is_recorded_and_the_vm_stays_running() {
    let Some(env) = Env::start("a_guest_reboot_is_recorded_and_the_vm_stays_running") else { return };
    if env.real.is_some() {
        eprintln!(
            "SKIP a_guest_reboot_is_recorded_and_the_vm_stays_running with real cloud-hypervisor: the PVH test guest never reboots"
        );
        return;
    }
    env.create("rb", &env.guest(false), env.fault("guest-reboot=300").as_deref());
    env.ok("compute.vm.start", json!({"vm_id": "rb"}));
    wait_for("the reboot in the history", Duration::from_secs(10), || {
        env.history("rb").iter().any(|e| e["from"] == "running" && e["to"] == "running").then_some(())
    });
    assert_eq!(env.state("rb"), "running");
    assert!(env.last_reason("rb").contains("rebooted"), "{}", env.last_reason("rb"));
    env.ok("compute.vm.stop", json!({"vm_id": "rb", "timeout_secs": 1}));
    env.ok("compute.vm.remove", json!({"vm_id": "rb"}));
    env.assert_nothing_left("rb", None);
}

#[test]
fn a_guest_that_powers_off_during_boot_is_stopped() {
    let test = "a_guest_that_powers_off_during_boot_is_stopped";
    let Some(env) = Env::start_with_uids(test, 62300..=62349) else { return };
    // The PVH guest that powers off as soon as it runs, with the double and real CH alike:
    // its VMM may exit before the boot check ever sees it running.
    env.create("q", &env.guest(true), None);
    let r = env.rpc("compute.vm.start", json!({"vm_id": "q"}));
    assert!(r.is_ok(), "a guest powering off is no failed start: {r:?}");
    env.wait_state("q", "stopped", Duration::from_secs(10));
    let moves: Vec<String> = env.history("q").iter().map(|e| format!("{} {}", e["from"], e["to"])).collect();
    assert!(!moves.iter().any(|m| m.contains("failed")), "{moves:?}");
    assert_eq!(moves[moves.len() - 2..], [r#""starting" "running""#, r#""running" "stopped""#], "{moves:?}");
    eprintln!("powered off at boot: {}", env.last_reason("q"));
    env.ok("compute.vm.remove", json!({"vm_id": "q"}));
    env.assert_nothing_left("q", None);
}

#[test]
fn a_flood_of_reboot_events_is_merged_and_other_vms_answer() {
    let test = "a_flood_of_reboot_events_is_merged_and_other_vms_answer";
    let Some(env) = Env::start_with_uids(test, 62350..=62399) else { return };
    if env.real.is_some() {
        return eprintln!("SKIP {test} with real cloud-hypervisor: the flood is a fault of the double");
    }
    env.create("calm", &env.guest(false), None);
    env.create("fl", &env.guest(false), env.fault("flood-reboots=100").as_deref());
    for id in ["calm", "fl"] {
        env.ok("compute.vm.start", json!({"vm_id": id}));
    }
    // The reboots recorded so far, and in how many transitions.
    let counts = || -> Vec<u64> {
        let tail = env.ok("compute.vm.events.tail", json!({"vm_id": "fl", "limit": 1000}));
        let reasons = tail["events"].as_array().cloned().unwrap_or_default();
        let n = |r: &str| r.trim().trim_end_matches(" times").parse().unwrap_or(1);
        reasons.iter().filter_map(|e| e["reason"].as_str()?.strip_prefix("the guest rebooted").map(n)).collect()
    };
    let (end, mut slowest) = (Instant::now() + Duration::from_secs(60), Duration::ZERO);
    while counts().iter().sum::<u64>() < 100_000 && Instant::now() < end {
        let t = Instant::now();
        assert_eq!(env.state("calm"), "running");
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    let counts = counts();
    eprintln!("{} reboots in {} transitions; slowest status {slowest:?}", counts.iter().sum::<u64>(), counts.len());
    assert_eq!(counts.iter().sum::<u64>(), 100_000, "every reboot counted once");
    assert!(counts.len() < 1000 && slowest < Duration::from_secs(1), "{} transitions, {slowest:?}", counts.len());
    assert_eq!(env.state("fl"), "running");
    for id in ["calm", "fl"] {
        env.ok("compute.vm.stop", json!({"vm_id": id, "timeout_secs": 1}));
        env.ok("compute.vm.remove", json!({"vm_id": id}));
        env.assert_nothing_left(id, None);
    }
}
