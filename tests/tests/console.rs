//! Serial consoles and logs through the real daemon, as root: the cloud-hypervisor test
//! double by default (its `serial-echo` and `serial-flood` faults play a chatty guest), or a
//! real cloud-hypervisor when `MYHV_CLOUD_HYPERVISOR` names one (with the tiny PVH guest,
//! which prints one line and reads nothing: the cases that need an echo say so and skip).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use my_hypervisor_tests::{Daemon, have_root, pvh, scratch_root, staged_bin, wait_for};
use serde_json::{Value, json};

const LINE: &str = "my_hypervisor console guest";

/// A daemon of its own per test, with VM uids from 63000-63099.
struct Env {
    d: Daemon,
    real: bool,
}

impl Drop for Env {
    /// VMMs outlive their daemon by design; a test's must not outlive the test.
    fn drop(&mut self) {
        let marker = format!("{}/", self.d.path("run/vmm").display());
        for pid in processes_with(&marker) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn processes_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).contains(marker)
        })
        .collect()
}

impl Env {
    fn start(test: &str, uids: &str, extra: &[&str]) -> Option<Env> {
        if !have_root(test) {
            return None;
        }
        let root = scratch_root();
        let real = std::env::var("MYHV_CLOUD_HYPERVISOR").ok();
        let vmm = real.clone().unwrap_or_else(|| staged_bin(root.path(), "ch-double").to_string_lossy().into_owned());
        let mut args = vec!["--cloud-hypervisor", &vmm, "--vm-uid-range", uids];
        args.extend(extra);
        let d = Daemon::start_in(root, &args);
        Some(Env { d, real: real.is_some() })
    }

    fn rpc(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let reply = self.d.call(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
        match reply.get("error") {
            Some(e) => Err((e["code"].as_i64().unwrap_or(0), e["message"].as_str().unwrap_or("").to_string())),
            None => Ok(reply["result"].clone()),
        }
    }

    fn ok(&self, method: &str, params: Value) -> Value {
        self.rpc(method, params.clone()).unwrap_or_else(|e| panic!("{method} {params}: {e:?}\n{}", self.d.log()))
    }

    /// Creates and starts a VM running the PVH guest; `faults` go to the double.
    fn run_vm(&self, id: &str, faults: &str) {
        let kernel = self.d.path("images/guest.elf");
        if !kernel.exists() {
            std::fs::write(&kernel, pvh::guest(LINE, false)).expect("guest");
        }
        let mut spec = json!({"id": id, "vcpus": 1, "memory_mib": 64, "kernel": kernel, "agent": false});
        if !self.real && !faults.is_empty() {
            spec["cmdline"] = json!(format!("console=ttyS0 ch_double.fault={faults}"));
        }
        self.ok("compute.vm.create", spec);
        assert_eq!(self.ok("compute.vm.start", json!({"vm_id": id}))["state"], "running");
    }

    fn endpoint(&self, id: &str) -> PathBuf {
        let r = self.ok("compute.vm.console.endpoint", json!({"vm_id": id}));
        assert_eq!(r["protocol"], "raw");
        assert_eq!(r["vm_id"], id);
        PathBuf::from(r["path"].as_str().expect("path"))
    }

    fn logs(&self, id: &str, stream: &str, max: u64) -> (Vec<u8>, bool) {
        let r = self.ok("compute.vm.logs", json!({"vm_id": id, "stream": stream, "max_bytes": max}));
        assert_eq!(r["encoding"], "base64");
        assert_eq!(r["stream"], stream);
        let data = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().expect("data")).expect("base64");
        (data, r["truncated"].as_bool().expect("truncated"))
    }
}

/// A console client.
fn attach(path: &PathBuf) -> UnixStream {
    let s = wait_for("the console socket", Duration::from_secs(10), || UnixStream::connect(path).ok());
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    s
}

/// Reads from `s` into `got` until `want` appears in it, within 10 s.
fn read_until(s: &mut UnixStream, got: &mut Vec<u8>, want: &[u8]) {
    let end = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 65536];
    // Only the new bytes (and the tail before them) are searched, so a flood reads fast.
    let mut from = 0;
    while !contains(&got[from..], want) {
        from = got.len().saturating_sub(want.len());
        assert!(Instant::now() < end, "{:?} never came; got {:?}", String::from_utf8_lossy(want), tail(got));
        match s.read(&mut buf) {
            Ok(0) => {
                panic!("EOF before {:?}; got {:?} ({} bytes)", String::from_utf8_lossy(want), tail(got), got.len())
            }
            Ok(n) => got.extend(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("console read: {e}"),
        }
    }
}

fn tail(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[b.len().saturating_sub(200)..]).into_owned()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The guest's serial line reaches two console clients and `logs`, with the double or with
/// a real cloud-hypervisor.
#[test]
fn guest_line_reaches_two_clients_and_logs() {
    let Some(env) = Env::start("guest_line_reaches_two_clients_and_logs", "63000-63009", &[]) else { return };
    env.run_vm("c1", "");
    let path = env.endpoint("c1");
    assert_eq!(path, env.d.path("run/console/c1.sock"));
    let (_, _, mode) = my_hypervisor_tests::owner_mode(&path);
    assert_eq!(mode & 0o777, 0o660, "root (and --rpc-group) may connect");
    let (mut a, mut b) = (attach(&path), attach(&path));
    let (mut ga, mut gb) = (Vec::new(), Vec::new());
    read_until(&mut a, &mut ga, LINE.as_bytes());
    read_until(&mut b, &mut gb, LINE.as_bytes());
    let (log, truncated) = env.logs("c1", "console", 65536);
    assert!(contains(&log, LINE.as_bytes()), "logs has the line: {:?}", tail(&log));
    assert!(!truncated);
    let (_, truncated) = env.logs("c1", "console", 4);
    assert!(truncated, "4 bytes of a longer log are truncated");
    // The VMM's own output is readable while it runs.
    env.logs("c1", "vmm", 4096);
    for bad in [json!(0), json!(524289)] {
        let e = env.rpc("compute.vm.logs", json!({"vm_id": "c1", "max_bytes": bad})).unwrap_err();
        assert_eq!(e.0, -32602, "{bad}: {e:?}");
    }
    assert_eq!(env.rpc("compute.vm.logs", json!({"vm_id": "nope"})).unwrap_err().0, -32020);
    env.ok("compute.vm.stop", json!({"vm_id": "c1", "timeout_secs": 1}));
    // The console goes with the VMM; the log stays until the VM is removed.
    assert_eq!(env.rpc("compute.vm.console.endpoint", json!({"vm_id": "c1"})).unwrap_err().0, -32025);
    assert_eq!(env.rpc("compute.vm.logs", json!({"vm_id": "c1", "stream": "vmm"})).unwrap_err().0, -32025);
    wait_for("the console socket to go", Duration::from_secs(5), || (!path.exists()).then_some(()));
    assert!(contains(&env.logs("c1", "console", 65536).0, LINE.as_bytes()));
    env.ok("compute.vm.remove", json!({"vm_id": "c1"}));
    assert!(!env.d.path("run/vms/logs/c1.log").exists(), "the log goes with the VM");
}

/// With `--rpc-group`, the console dir is that group's and setgid, so each console socket
/// is root's and the group's to connect to, like the RPC socket.
#[test]
fn console_sockets_belong_to_the_rpc_group() {
    let Some(env) = Env::start("console_sockets_belong_to_the_rpc_group", "63050-63059", &["--rpc-group", "63099"])
    else {
        return;
    };
    let (_, gid, mode) = my_hypervisor_tests::owner_mode(&env.d.path("run/console"));
    assert_eq!((gid, mode & 0o7777), (63099, 0o2750), "the console dir");
    env.run_vm("c6", "");
    let path = env.endpoint("c6");
    let (_, gid, mode) = my_hypervisor_tests::owner_mode(&path);
    assert_eq!((gid, mode & 0o777), (63099, 0o660), "the console socket");
    let mut s = attach(&path);
    read_until(&mut s, &mut Vec::new(), LINE.as_bytes());
}

/// Replay, live output and input with two clients while a third stalls: the stalled one is
/// disconnected, the VM and the others go on.
#[test]
fn two_clients_type_and_read_while_one_stalls() {
    let Some(env) = Env::start("two_clients_type_and_read_while_one_stalls", "63010-63019", &[]) else { return };
    if env.real {
        eprintln!("SKIP two_clients_type_and_read_while_one_stalls: the PVH guest does not echo its input");
        return;
    }
    env.run_vm("c2", "serial-echo");
    let path = env.endpoint("c2");
    let mut a = attach(&path);
    let mut ga = Vec::new();
    read_until(&mut a, &mut ga, LINE.as_bytes());
    let stalled = attach(&path);
    // Input from one client reaches the guest, and its echo reaches every client.
    a.write_all(b"ping-from-a\n").expect("type");
    read_until(&mut a, &mut ga, b"ping-from-a\n");
    let mut b = attach(&path);
    let mut gb = Vec::new();
    read_until(&mut b, &mut gb, b"ping-from-a\n");
    assert!(contains(&gb, LINE.as_bytes()), "b's replay starts before the ping");
    b.write_all(b"pong-from-b\n").expect("type");
    read_until(&mut a, &mut ga, b"pong-from-b\n");
    read_until(&mut b, &mut gb, b"pong-from-b\n");
    // 2 MiB through the guest, in bursts of 64 KiB that the two readers keep up with: the
    // stalled client falls behind by more than its queue and is dropped.
    for burst in 0..32u32 {
        let mut text = Vec::new();
        for i in 0..64u32 {
            let mut line = format!("flood-{burst:03}-{i:03}-").into_bytes();
            line.resize(1023, b'.');
            line.push(b'\n');
            text.extend(line);
        }
        a.write_all(&text).expect("flood");
        let last = format!("flood-{burst:03}-063-");
        read_until(&mut a, &mut ga, last.as_bytes());
        read_until(&mut b, &mut gb, last.as_bytes());
    }
    for mark in ["flood-000-000-", "flood-016-000-", "flood-031-063-"] {
        assert!(contains(&gb, mark.as_bytes()), "b saw {mark}");
    }
    // The stalled client is cut off: reading what it was sent ends in EOF.
    let mut stalled = stalled;
    stalled.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut sink = Vec::new();
    let r = stalled.read_to_end(&mut sink);
    assert!(r.is_ok(), "the stalled client was disconnected: {r:?} after {} bytes", sink.len());
    assert!(sink.len() < 2 << 20, "it did not get everything: {}", sink.len());
    a.write_all(b"still-here\n").expect("type");
    read_until(&mut b, &mut gb, b"still-here\n");
    // Serial bytes are not UTF-8: they cross the console raw and `logs` as base64.
    let binary = b"bin:\xff\x00\xfe\x80\r\n";
    a.write_all(binary).expect("type");
    read_until(&mut b, &mut gb, binary);
    let (log, _) = env.logs("c2", "console", 4096);
    assert!(contains(&log, binary), "logs returns the bytes as they were");
    assert_eq!(env.ok("compute.vm.status", json!({"vm_id": "c2"}))["state"], "running");
}

/// After the frontend is killed, the new one takes the serial fd again: replay from the
/// log, and input and output work on a fresh client.
#[test]
fn console_reattaches_after_a_frontend_kill() {
    let Some(env) = Env::start("console_reattaches_after_a_frontend_kill", "63020-63029", &[]) else { return };
    env.run_vm("c3", "serial-echo");
    let path = env.endpoint("c3");
    let mut a = attach(&path);
    let mut ga = Vec::new();
    read_until(&mut a, &mut ga, LINE.as_bytes());
    // A socket no running VMM owns (a VM that went while the frontend was down) is cleared.
    let stray = env.d.path("run/console/gone.sock");
    drop(std::os::unix::net::UnixListener::bind(&stray).expect("stray socket"));
    let old = env.d.frontend_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGKILL).expect("kill");
    wait_for("a new frontend", Duration::from_secs(10), || {
        let p = env.d.frontend_pid();
        (p != old && env.rpc("compute.vm.status", json!({"vm_id": "c3"})).is_ok()).then_some(())
    });
    assert_eq!(env.ok("compute.vm.status", json!({"vm_id": "c3"}))["state"], "running");
    assert!(!stray.exists(), "the new frontend cleared the stray socket");
    let mut buf = [0u8; 64];
    a.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert!(matches!(a.read(&mut buf), Ok(0) | Err(_)), "the old client's connection ended");
    let path = env.endpoint("c3");
    let mut b = attach(&path);
    let mut gb = Vec::new();
    read_until(&mut b, &mut gb, LINE.as_bytes());
    if env.real {
        eprintln!("SKIP console_reattaches_after_a_frontend_kill (input): the PVH guest does not echo");
        return;
    }
    b.write_all(b"after-restart\n").expect("type");
    read_until(&mut b, &mut gb, b"after-restart\n");
    assert!(contains(&env.logs("c3", "console", 65536).0, b"after-restart\n"));
}

/// A chatty VMM's own log is trimmed (holes punched over all but its newest bytes), so it
/// is not killed at the 64 MiB bound; `logs` still reads its newest output.
#[test]
fn a_chatty_vmm_log_is_trimmed_not_killed() {
    let Some(env) = Env::start("a_chatty_vmm_log_is_trimmed_not_killed", "63040-63049", &[]) else { return };
    if env.real {
        eprintln!("SKIP a_chatty_vmm_log_is_trimmed_not_killed: only the double is chatty");
        return;
    }
    // 80 MiB in about 5 s: more than the 64 MiB kill bound, slower than the trims.
    env.run_vm("c5", "chatty-log=80");
    let log = env.d.path("run/vmm/c5/vmm.log");
    wait_for("the chatty VMM to finish", Duration::from_secs(60), || {
        let (data, _) = env.logs("c5", "vmm", 64);
        data.ends_with(b"chatty-done\n").then_some(())
    });
    let m = std::fs::metadata(&log).expect("vmm.log");
    assert!(m.len() > 80 << 20, "the apparent size keeps every byte written: {}", m.len());
    assert_eq!(env.ok("compute.vm.status", json!({"vm_id": "c5"}))["state"], "running", "not killed");
    let held = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&log).expect("vmm.log")) * 512;
    wait_for("the log to be trimmed below 9 MiB", Duration::from_secs(10), || (held() <= 9 << 20).then_some(()));
    let (tail, truncated) = env.logs("c5", "vmm", 4096);
    assert!(truncated);
    assert_eq!(tail.len(), 4096);
    assert!(tail[..4096 - 12].iter().all(|&b| b == b'y'), "the newest bytes are data, not a hole");
}

/// The serial log is capped with one rotation; `logs` returns its newest bytes.
#[test]
fn serial_log_rotates_at_its_cap() {
    let Some(env) = Env::start(
        "serial_log_rotates_at_its_cap",
        "63030-63039",
        &["--rpc-limit", "console-log-bytes=65536", "--rpc-limit", "console-replay-bytes=1024"],
    ) else {
        return;
    };
    if env.real {
        eprintln!("SKIP serial_log_rotates_at_its_cap: the PVH guest prints one line only");
        return;
    }
    // 256 KiB of numbered 8-byte lines: 0000000 to 0032767.
    env.run_vm("c4", "serial-flood=256");
    let (cur, old) = (env.d.path("run/vms/logs/c4.log"), env.d.path("run/vms/logs/c4.log.1"));
    wait_for("the flood to be logged", Duration::from_secs(10), || {
        std::fs::read(&cur).ok().filter(|b| b.ends_with(b"0032767\n")).map(drop)
    });
    let (c, o) = (std::fs::metadata(&cur).unwrap().len(), std::fs::metadata(&old).unwrap().len());
    assert!(c <= 65536 && o <= 65536 && o > 0, "both files within the cap: {c} {o}");
    let (data, truncated) = env.logs("c4", "console", 524288);
    assert!(!truncated, "all that is kept was returned");
    assert!(env.logs("c4", "console", 65536 + 1).1, "part of the kept log is truncated");
    assert_eq!(data.len() as u64, c + o, "both files, and no more");
    assert!(data.ends_with(b"0032767\n"));
    // Nothing lost or doubled between the two files: consecutive numbers from the first whole line.
    let text = String::from_utf8(data).expect("ascii");
    let start = text.find('\n').unwrap() + 1;
    let nums: Vec<u64> = text[start..].lines().map(|l| l.parse().expect("number")).collect();
    assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "consecutive lines");
    // A client's replay is the configured 1 KiB of the newest output.
    let path = env.endpoint("c4");
    let mut s = attach(&path);
    let mut got = Vec::new();
    read_until(&mut s, &mut got, b"0032767\n");
    std::thread::sleep(Duration::from_millis(300));
    let mut buf = [0u8; 4096];
    if let Ok(n) = s.read(&mut buf) {
        got.extend(&buf[..n]);
    }
    assert_eq!(got.len(), 1024, "the replay is 1 KiB");
}
