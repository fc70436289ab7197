//! Exec and agent gating through the real daemon, as root: the frontend → the broker's vsock
//! stream → the cloud-hypervisor test double's hybrid-vsock muxer → a guest agent listening
//! where the muxer forwards port 1024: guest-init in `--listen-unix` mode as PID 1 of new
//! PID + mount + UTS namespaces, or the hostile agent. Real cloud-hypervisor with the PVH test
//! guest has no vsock driver in the guest, so only the gating failure cases run with it.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use my_hypervisor_tests::agent::Agent;
use my_hypervisor_tests::{Daemon, have_root, pvh, scratch_root, staged_bin, wait_for};
use serde_json::{Value, json};

const NO_AGENT: i64 = -32040;
const AGENT_UNREACHABLE: i64 = -32041;
const EXEC_TIMEOUT: i64 = -32042;
const EXEC_REFUSED: i64 = -32043;
const NOT_RUNNING: i64 = -32025;
const INVALID_PARAMS: i64 = -32602;
const INVALID_SPEC: i64 = -32024;

struct Env {
    d: Daemon,
    real: Option<String>,
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
    /// A daemon with its own VM uids (this file's range is 63100-63199).
    fn start(test: &str, first_uid: u32) -> Option<Env> {
        if !have_root(test) {
            return None;
        }
        let root = scratch_root();
        let real = std::env::var("MYHV_CLOUD_HYPERVISOR").ok();
        let vmm = real.clone().unwrap_or_else(|| staged_bin(root.path(), "ch-double").to_string_lossy().into_owned());
        let range = format!("{first_uid}-{}", first_uid + 19);
        let d = Daemon::start_in(root, &["--cloud-hypervisor", &vmm, "--vm-uid-range", &range]);
        Some(Env { d, real })
    }

    fn guest(&self) -> String {
        self.pvh(false)
    }

    /// The PVH test guest, idle or powering itself off once it runs.
    fn pvh(&self, shutdown: bool) -> String {
        let p = self.d.path("images").join(if shutdown { "guest-off.elf" } else { "guest.elf" });
        if !p.exists() {
            std::fs::write(&p, pvh::guest("my_hypervisor exec guest", shutdown)).expect("guest");
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
        self.rpc(method, params.clone()).unwrap_or_else(|e| panic!("{method} {params}: {e:?}\n{}", self.d.log()))
    }

    fn create(&self, id: &str, agent: bool, cmdline: Option<&str>) {
        let mut spec =
            json!({"id": id, "vcpus": 1, "memory_mib": 64, "kernel": self.guest(), "vsock": true, "agent": agent});
        if let Some(c) = cmdline {
            spec["cmdline"] = json!(c);
        }
        self.ok("compute.vm.create", spec);
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.d.path(&format!("run/vmm/{id}"))
    }

    fn state(&self, id: &str) -> String {
        self.ok("compute.vm.status", json!({"vm_id": id}))["state"].as_str().unwrap_or_default().to_string()
    }

    fn history(&self, id: &str) -> Vec<Value> {
        self.ok("compute.vm.events.tail", json!({"vm_id": id}))["events"].as_array().cloned().unwrap_or_default()
    }

    fn last_reason(&self, id: &str) -> String {
        self.history(id).last().map(|e| e["reason"].as_str().unwrap_or("").to_string()).unwrap_or_default()
    }

    /// Starts `id` on another thread and, once its VMM serves vsock, starts the agent
    /// `make` gives; returns the start's answer and the agent.
    fn start_with_agent(
        &self,
        id: &str,
        make: impl FnOnce(&std::path::Path) -> Agent,
    ) -> (Result<Value, (i64, String)>, Agent) {
        thread::scope(|s| {
            let start = s.spawn(|| self.rpc("compute.vm.start", json!({"vm_id": id})));
            let vsock = self.vm_dir(id).join("vsock.sock");
            wait_for("the VMM's vsock socket", Duration::from_secs(20), || vsock.exists().then_some(()));
            let agent = make(&self.vm_dir(id));
            (start.join().expect("start thread"), agent)
        })
    }

    fn exec(&self, params: Value) -> Result<Value, (i64, String)> {
        self.rpc("compute.vm.exec", params)
    }

    fn agent_log_dir(&self) -> PathBuf {
        self.d.root.path().to_path_buf()
    }
}

fn b64(v: &Value) -> Vec<u8> {
    B64.decode(v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))).expect("base64")
}

#[test]
fn exec_round_trip_through_the_muxer_to_guest_init() {
    let test = "exec_round_trip_through_the_muxer_to_guest_init";
    let Some(env) = Env::start(test, 63100) else { return };
    if env.real.is_some() {
        return eprintln!("SKIP {test} with real cloud-hypervisor: the PVH test guest has no vsock driver");
    }
    env.ok(
        "compute.vm.create",
        json!({"id": "x", "vcpus": 1, "memory_mib": 64, "kernel": env.guest(), "cmdline": "console=ttyS0",
               "nets": [{"mtu": 1400}], "vsock": true}),
    );
    let logs = env.agent_log_dir();
    let (started, agent) = env.start_with_agent("x", |dir| Agent::guest_init(dir, &logs));
    let started = started.unwrap_or_else(|e| panic!("start: {e:?}\n{}\n{}", env.d.log(), agent.log_text()));
    assert_eq!(started["state"], "running");
    let moves: Vec<String> = env.history("x").iter().map(|e| format!("{} {}", e["to"], e["reason"])).collect();
    assert!(moves.last().is_some_and(|m| m.contains("running") && m.contains("guest agent answers")), "{moves:?}");
    // guest-init's words reached the VMM's command line after the spec's own.
    let pid = env.ok("compute.vm.status", json!({"vm_id": "x"}))["pid"].as_i64().expect("pid");
    let argv = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).replace('\0', " ");
    assert!(argv.contains("--cmdline console=ttyS0 myhv.port=1024 myhv.mtu=eth0:1400 "), "{argv}");

    // argv, env, cwd, binary stdin, stdout and stderr, exit code.
    let stdin: Vec<u8> = (0..=255u8).chain(b"\n\0end".iter().copied()).collect();
    let r = env.ok(
        "compute.vm.exec",
        json!({"vm_id": "x", "argv": ["/bin/sh", "-c", "echo \"$FOO|$1\"; pwd; cat; echo err >&2; exit 7", "argv0", "first arg"],
               "env": {"FOO": "bar baz"}, "cwd": "/usr", "stdin": B64.encode(&stdin), "encoding": "base64"}),
    );
    assert_eq!(r["exit_code"], 7, "{r}");
    assert!(r.get("signal").is_none(), "{r}");
    assert_eq!(r["encoding"], "base64");
    let mut want = b"bar baz|first arg\n/usr\n".to_vec();
    want.extend(&stdin);
    assert_eq!(b64(&r["stdout"]), want, "{r}");
    assert_eq!(b64(&r["stderr"]), b"err\n");
    assert_eq!((r["stdout_truncated"].clone(), r["stderr_truncated"].clone()), (json!(false), json!(false)));
    assert!(r["duration_ms"].is_u64(), "{r}");

    // Output that is not UTF-8 comes back byte for byte.
    let r = env.ok("compute.vm.exec", json!({"vm_id": "x", "argv": ["/usr/bin/printf", "\\377\\000\\200"]}));
    assert_eq!(b64(&r["stdout"]), b"\xff\x00\x80");

    // A signal.
    let r = env.ok("compute.vm.exec", json!({"vm_id": "x", "argv": ["/bin/sh", "-c", "kill -KILL $$"]}));
    assert_eq!(r["signal"], 9, "{r}");
    assert!(r.get("exit_code").is_none(), "{r}");

    // Truncation: the rest is counted, not kept.
    let r = env.ok(
        "compute.vm.exec",
        json!({"vm_id": "x", "argv": ["/usr/bin/head", "-c", "300000", "/dev/zero"], "max_output_bytes": 1000}),
    );
    assert_eq!(b64(&r["stdout"]).len(), 1000);
    assert_eq!((r["stdout_truncated"].clone(), r["stdout_bytes"].clone()), (json!(true), json!(300000)), "{r}");

    // A timeout: the guest kills the whole process group (a grandchild too) and the call says so.
    let t = Instant::now();
    let e = env
        .exec(json!({"vm_id": "x", "argv": ["/bin/sh", "-c", "sleep 60 & wait"], "timeout_secs": 1}))
        .expect_err("the command times out");
    assert_eq!(e.0, EXEC_TIMEOUT, "{e:?}");
    assert!(e.1.contains("1 s"), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let sleeps = || agent.descendants().into_iter().filter(|p| comm(*p) == "sleep").count();
    wait_for("the timed-out group to be gone", Duration::from_secs(10), || (sleeps() == 0).then_some(()));

    // Clear errors: a program that does not exist, bad params.
    let e = env.exec(json!({"vm_id": "x", "argv": ["/nonexistent/prog"]})).expect_err("refused");
    assert_eq!(e.0, EXEC_REFUSED, "{e:?}");
    let e = env.exec(json!({"vm_id": "x", "argv": ["true"], "stdin": "not base64!"})).expect_err("bad stdin");
    assert!(e.0 == INVALID_PARAMS && e.1.contains("stdin"), "{e:?}");
    let e = env.exec(json!({"vm_id": "x", "argv": ["true"], "env": {"A=B": "c"}})).expect_err("bad env");
    assert!(e.0 == INVALID_PARAMS && e.1.contains("env"), "{e:?}");

    // Not running: after a stop the same VM answers -32025.
    env.ok("compute.vm.stop", json!({"vm_id": "x", "timeout_secs": 1}));
    let e = env.exec(json!({"vm_id": "x", "argv": ["true"]})).expect_err("stopped");
    assert_eq!(e.0, NOT_RUNNING, "{e:?}");
    drop(agent);

    // A VM created without an agent: -32040, whatever its state.
    env.ok("compute.vm.create", json!({"id": "n", "vcpus": 1, "memory_mib": 64, "kernel": env.guest()}));
    let e = env.exec(json!({"vm_id": "n", "argv": ["true"]})).expect_err("no agent");
    assert_eq!(e.0, NO_AGENT, "{e:?}");
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

#[test]
fn hostile_agents_cost_a_bounded_wait() {
    let test = "hostile_agents_cost_a_bounded_wait";
    let Some(env) = Env::start(test, 63120) else { return };
    if env.real.is_some() {
        return eprintln!("SKIP {test} with real cloud-hypervisor: the PVH test guest has no vsock driver");
    }
    env.create("h", true, None);
    let logs = env.agent_log_dir();
    let (started, first) = env.start_with_agent("h", |dir| Agent::hostile(dir, &logs, "endless"));
    assert_eq!(started.expect("start")["state"], "running", "the hostile agent answers health");
    let dir = env.vm_dir("h");

    // Endless output, past what was asked for: dropped at once, not read for ever.
    let t = Instant::now();
    let e = env.exec(json!({"vm_id": "h", "argv": ["yes"], "max_output_bytes": 1000})).expect_err("flood");
    assert!(e.0 == AGENT_UNREACHABLE && e.1.contains("more than the 1000 asked for"), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(first);

    // A frame length far over the limit: refused before anything is allocated.
    let _agent = Agent::hostile(&dir, &logs, "oversized");
    let e = env.exec(json!({"vm_id": "h", "argv": ["x"]})).expect_err("oversized");
    assert!(e.0 == AGENT_UNREACHABLE && e.1.contains("larger than the limit"), "{e:?}");
    drop(_agent);

    // A guest that ignores the timeout: the host cancels after timeout + 5 s, and says so.
    let agent = Agent::hostile(&dir, &logs, "ignore-timeout");
    let t = Instant::now();
    let e = env.exec(json!({"vm_id": "h", "argv": ["x"], "timeout_secs": 1})).expect_err("timeout");
    assert!(e.0 == EXEC_TIMEOUT && e.1.contains("cancelled"), "{e:?}");
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(5) && took < Duration::from_secs(15), "{took:?}");
    let marker = agent.socket.with_extension("sock.cancelled");
    assert!(marker.exists(), "the agent got a cancel: {}", agent.log_text());
    drop(agent);

    // A handshake that never finishes: 5 s, then a clear error.
    let _agent = Agent::hostile(&dir, &logs, "stall");
    let t = Instant::now();
    let e = env.exec(json!({"vm_id": "h", "argv": ["x"]})).expect_err("stalled");
    assert!(e.0 == AGENT_UNREACHABLE && e.1.contains("hello"), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(_agent);

    // Nothing listening: the muxer closes the stream, a clear error at once.
    let e = env.exec(json!({"vm_id": "h", "argv": ["x"]})).expect_err("no listener");
    assert!(e.0 == AGENT_UNREACHABLE && e.1.contains("nothing listens"), "{e:?}");
    env.ok("compute.vm.stop", json!({"vm_id": "h", "timeout_secs": 1}));
}

#[test]
fn an_agent_that_never_answers_fails_the_start() {
    let test = "an_agent_that_never_answers_fails_the_start";
    let Some(env) = Env::start(test, 63140) else { return };
    env.create("s", true, None);
    let logs = env.agent_log_dir();
    let real = env.real.is_some();
    let t = Instant::now();
    let (started, _agent) = env.start_with_agent("s", |dir| {
        // With real CH nothing forwards to this socket; the guest never answers either way.
        Agent::hostile(dir, &logs, "stall")
    });
    let e = started.expect_err("the start fails");
    assert!(e.1.contains("the guest agent did not answer"), "{e:?}");
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(25) && took < Duration::from_secs(60), "{took:?}");
    assert_eq!(env.state("s"), "start_failed");
    let moves: Vec<String> = env.history("s").iter().map(|e| format!("{}", e["to"])).collect();
    assert!(!moves.contains(&"\"running\"".to_string()), "never running: {moves:?}");
    let reason = env.last_reason("s");
    assert!(reason.contains("did not answer") && reason.contains("resources released"), "{reason}");
    if !real {
        assert!(reason.contains("hello"), "the stalled handshake is the last error: {reason}");
    }
    assert!(!env.vm_dir("s").exists(), "released");
}

#[test]
fn a_guest_that_powers_off_before_its_agent_answers_is_stopped() {
    let test = "a_guest_that_powers_off_before_its_agent_answers_is_stopped";
    let Some(env) = Env::start(test, 63160) else { return };
    // The PVH guest that powers off as soon as it runs (with the double and real CH alike:
    // its VMM may exit before vm.info says Running), and, with the double, an idle guest that
    // powers off 1.5 s after boot, while the agent is being asked.
    let mut cases = vec![("o", env.pvh(true), None)];
    if env.real.is_none() {
        cases.push(("p", env.guest(), Some("ch_double.fault=guest-shutdown=1500")));
    }
    for (id, kernel, cmdline) in cases {
        let mut spec = json!({"id": id, "vcpus": 1, "memory_mib": 64, "kernel": kernel, "vsock": true});
        if let Some(c) = cmdline {
            spec["cmdline"] = json!(c);
        }
        env.ok("compute.vm.create", spec);
        let r = env.rpc("compute.vm.start", json!({"vm_id": id}));
        assert!(r.is_ok(), "{id}: a guest powering off is no failed start: {r:?}");
        wait_for("the VM to be stopped", Duration::from_secs(20), || (env.state(id) == "stopped").then_some(()));
        let reason = env.last_reason(id);
        assert!(reason.contains("the guest powered off before its agent answered"), "{id}: {reason}");
        let moves: Vec<String> = env.history(id).iter().map(|e| format!("{}", e["to"])).collect();
        assert!(!moves.iter().any(|m| m.contains("failed")), "{id}: {moves:?}");
    }
}

#[test]
fn a_cmdline_that_would_not_fit_is_refused_at_create() {
    let test = "a_cmdline_that_would_not_fit_is_refused_at_create";
    let Some(env) = Env::start(test, 63180) else { return };
    let long = "x".repeat(2040);
    let spec = |agent: bool| {
        json!({"id": "c", "vcpus": 1, "memory_mib": 64, "kernel": env.guest(), "cmdline": long,
               "vsock": true, "agent": agent})
    };
    let e = env.rpc("compute.vm.create", spec(true)).expect_err("too long with guest-init's words");
    assert!(e.0 == INVALID_SPEC && e.1.contains("cmdline") && e.1.contains("guest-init"), "{e:?}");
    env.ok("compute.vm.create", spec(false));
}
