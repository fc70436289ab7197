//! The cloud-hypervisor test double, run directly (not through the daemon). The assertions
//! that are not about injected faults also run against real cloud-hypervisor when
//! MYHV_CLOUD_HYPERVISOR names its binary (real CH needs /dev/kvm, so root).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use my_hypervisor_tests::{pvh, wait_for};
use serde_json::Value;

/// The VMMs to check: the double, and real CH when asked for and usable.
fn targets() -> Vec<(&'static str, PathBuf)> {
    let mut t = vec![("double", PathBuf::from(env!("CARGO_BIN_EXE_ch-double")))];
    if let Some(real) = std::env::var_os("MYHV_CLOUD_HYPERVISOR") {
        if nix::unistd::geteuid().is_root() {
            t.push(("cloud-hypervisor", PathBuf::from(real)));
        } else {
            eprintln!("SKIP real cloud-hypervisor: it needs root for /dev/kvm");
        }
    }
    t
}

fn double() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ch-double"))
}

/// A VMM started with the project's kind of argv in a scratch dir, killed on drop.
struct Vmm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Vmm {
    fn start(exe: &Path, guest_line: &str, shutdown: bool, cmdline: &str, extra: &[&str]) -> Vmm {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("guest.elf");
        std::fs::write(&kernel, pvh::guest(guest_line, shutdown)).expect("guest");
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let mut cmd = Command::new(exe);
        cmd.arg("--api-socket")
            .arg(format!("path={}", p("api.sock")))
            .arg("--event-monitor")
            .arg(format!("path={}", p("events.json")))
            .arg("--kernel")
            .arg(&kernel);
        if !cmdline.is_empty() {
            cmd.arg("--cmdline").arg(cmdline);
        }
        cmd.args(["--cpus", "boot=1", "--memory", "size=64M"])
            .arg("--serial")
            .arg(format!("socket={}", p("serial.sock")))
            .args(["--console", "off"])
            .arg("--vsock")
            .arg(format!("cid=3,socket={}", p("vsock.sock")))
            .args(["--seccomp", "true", "--pvpanic"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap());
        let child = cmd.spawn().expect("spawn the VMM");
        Vmm { child, dir }
    }

    fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.path("stderr")).unwrap_or_default()
    }

    /// A connection to the API socket, once it is there.
    fn api(&mut self) -> Api {
        let path = self.path("api.sock");
        let child = &mut self.child;
        let s = wait_for("the api socket", Duration::from_secs(10), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("the VMM exited early: {st}");
            }
            UnixStream::connect(&path).ok()
        });
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Api { r: BufReader::new(s.try_clone().unwrap()), w: s }
    }

    fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.path("events.json")).unwrap_or_default();
        serde_json::Deserializer::from_str(&text).into_iter::<Value>().map_while(Result::ok).collect()
    }

    fn event_names(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| format!("{}/{}", e["source"].as_str().unwrap(), e["event"].as_str().unwrap()))
            .collect()
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        wait_for("the VMM to exit", timeout, || child.try_wait().ok().flatten())
    }

    fn wait_event(&self, name: &str) {
        wait_for(name, Duration::from_secs(10), || self.event_names().iter().any(|e| e == name).then_some(()));
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Api {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

struct Response {
    status: u16,
    head: String,
    body: String,
}

impl Api {
    fn call(&mut self, method: &str, path: &str) -> Response {
        write!(self.w, "{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n").unwrap();
        self.read()
    }

    fn read(&mut self) -> Response {
        let mut head = String::new();
        loop {
            let mut l = String::new();
            assert!(self.r.read_line(&mut l).expect("a response") > 0, "connection closed");
            if l == "\r\n" {
                break;
            }
            head.push_str(&l);
        }
        let status = head[9..12].parse().unwrap();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |n| n.trim().parse::<usize>().unwrap());
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).unwrap();
        Response { status, head, body: String::from_utf8(body).unwrap() }
    }

    /// Polls vm.info until Running: CH serves the API before it has created (404) and booted
    /// (`Created`) the VM, as the frontend must expect.
    fn wait_running(&mut self, name: &str) -> Value {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.call("GET", "vm.info");
            if r.status == 200 {
                let v: Value = serde_json::from_str(&r.body).unwrap();
                if v["state"] == "Running" {
                    return v;
                }
                assert_eq!(v["state"], "Created", "{name}");
            } else {
                assert_eq!(r.status, 404, "{name}: {}", r.body);
            }
            assert!(Instant::now() < end, "{name}: not Running in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn info(&mut self) -> Value {
        let r = self.call("GET", "vm.info");
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(&r.body).unwrap()
    }
}

fn run(exe: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(exe).args(args).output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn command_line_acceptance_and_rejection() {
    for (name, exe) in targets() {
        let (st, err) = run(&exe, &["--bogus"]);
        assert_eq!(st.code(), Some(2), "{name}: {err}");
        assert!(err.contains("unexpected argument '--bogus'"), "{name}: {err}");
        let (st, err) = run(&exe, &["--disk", "path=/x"]);
        assert_eq!(st.code(), Some(2), "{name}: a vm-config flag needs a payload: {err}");
        let (st, err) = run(&exe, &["--kernel", "/k", "--disk", "path=/x,foo=bar", "--console", "off"]);
        assert_eq!(st.code(), Some(1), "{name}: {err}");
        assert!(err.contains("unknown option: foo"), "{name}: {err}");
        let (st, err) = run(&exe, &["--kernel", "/nonexistent", "--console", "off", "--serial", "null"]);
        assert_eq!(st.code(), Some(1), "{name}: {err}");
        assert!(err.contains("Cannot open kernel file"), "{name}: {err}");
    }
}

#[test]
fn start_events_info_keep_alive_and_vmm_shutdown() {
    for (name, exe) in targets() {
        let mut v = Vmm::start(&exe, "my line", false, "console=ttyS0", &[]);
        let mut api = v.api();
        // Two requests on one connection; micro_http's status line has no reason phrase.
        let ping = api.call("GET", "vmm.ping");
        assert!(ping.head.starts_with("HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\n"), "{name}: {}", ping.head);
        assert!(ping.head.contains("Connection: keep-alive\r\n"), "{name}");
        let ping: Value = serde_json::from_str(&ping.body).unwrap();
        assert_eq!(ping["pid"], v.child.id(), "{name}");
        let info = api.wait_running(name);
        assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1, "{name}");
        assert_eq!(info["config"]["memory"]["size"], 64 << 20, "{name}");
        assert_eq!(info["memory_actual_size"], 64 << 20, "{name}");
        assert_eq!(info["config"]["payload"]["cmdline"], "console=ttyS0", "{name}");
        assert_eq!(info["config"]["vsock"]["cid"], 3, "{name}");
        assert!(info["device_tree"].is_object(), "{name}");
        assert_eq!(api.call("GET", "vm.nonsense").status, 404, "{name}");
        assert_eq!(api.call("PUT", "vm.info").status, 400, "{name}");
        let boot = api.call("PUT", "vm.boot");
        assert_eq!(boot.status, 500, "{name}");
        assert!(boot.body.contains("VM is already created"), "{name}: {}", boot.body);

        // The event file: pretty-printed objects, each followed by a blank line.
        let text = std::fs::read_to_string(v.path("events.json")).unwrap();
        assert!(text.starts_with("{\n  \"timestamp\": {\n    \"secs\": 0,\n    \"nanos\": "), "{name}: {text}");
        assert!(text.contains("\n  \"source\": \"vmm\",\n  \"event\": \"starting\",\n  \"properties\": null\n}\n\n"));
        assert_eq!(v.event_names()[..3], ["vmm/starting", "vm/booting", "vm/booted"], "{name}");

        let r = api.call("PUT", "vmm.shutdown");
        assert_eq!(r.status, 200, "{name}");
        assert!(r.head.contains("Content-Length: 0\r\n"), "{name}: {}", r.head);
        assert_eq!(v.wait_exit(Duration::from_secs(10)).code(), Some(0), "{name}");
        let names = v.event_names();
        assert_eq!(names[names.len() - 3..], ["vm/shutdown", "vm/deleted", "vmm/shutdown"], "{name}");
        assert!(!v.path("api.sock").exists(), "{name}: the api socket is removed after a clean run");
    }
}

#[test]
fn power_button_ignored_vm_shutdown_created_boot_and_sigterm() {
    for (name, exe) in targets() {
        let mut v = Vmm::start(&exe, "my line", false, "", &[]);
        let mut api = v.api();
        api.wait_running(name);
        let r = api.call("PUT", "vm.power-button");
        assert_eq!(r.status, 204, "{name}");
        assert!(!r.head.contains("Content-Length"), "{name}: 204 has no Content-Length: {}", r.head);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(api.info()["state"], "Running", "{name}: the PVH guest has no ACPI");
        assert_eq!(api.call("PUT", "vm.shutdown").status, 204, "{name}");
        let info = api.info();
        assert_eq!(info["state"], "Created", "{name}");
        assert!(info["device_tree"].is_null(), "{name}");
        assert!(!v.path("serial.sock").exists(), "{name}: the serial socket goes with the VM");
        assert_eq!(api.call("PUT", "vm.power-button").status, 500, "{name}");
        assert_eq!(api.call("PUT", "vm.boot").status, 204, "{name}");
        assert_eq!(api.info()["state"], "Running", "{name}");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(v.child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        assert_eq!(v.wait_exit(Duration::from_secs(10)).code(), Some(0), "{name}");
        assert_eq!(v.event_names().last().map(String::as_str), Some("vmm/shutdown"), "{name}");
    }
}

#[test]
fn shutdown_variant_of_the_pvh_guest_exits_0() {
    for (name, exe) in targets() {
        let mut v = Vmm::start(&exe, "bye", true, "", &[]);
        assert_eq!(v.wait_exit(Duration::from_secs(10)).code(), Some(0), "{name}: {}", v.stderr());
        let names = v.event_names();
        assert!(names.contains(&"vm/shutdown".to_string()), "{name}: {names:?}");
    }
}

#[test]
fn serial_socket_replays_the_guest_line() {
    for (name, exe) in targets() {
        let mut v = Vmm::start(&exe, "my line", false, "", &[]);
        // vm.info answers once the VM is booted (the API socket comes up before that).
        v.api().wait_running(name);
        let (_, _, mode) = my_hypervisor_tests::owner_mode(&v.path("serial.sock"));
        assert_eq!(mode, 0o700, "{name}: created under umask 077");
        let s = UnixStream::connect(v.path("serial.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert_eq!(line, "my line\n", "{name}");
    }
}

#[test]
fn hybrid_vsock_handshake_data_and_eof() {
    // Real CH answers only once the guest's vsock driver is up, which the PVH guest lacks.
    let mut v = Vmm::start(&double(), "my line", false, "", &[]);
    assert_eq!(v.api().info()["state"], "Running");
    let connect = |port: u32| {
        let mut s = UnixStream::connect(v.path("vsock.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        s
    };
    let mut nobody = connect(1234);
    let mut buf = Vec::new();
    assert_eq!(nobody.read_to_end(&mut buf).unwrap(), 0, "EOF when nothing listens");

    let guest = UnixListener::bind(v.path("guest-vsock-1024.sock")).unwrap();
    std::fs::set_permissions(v.path("guest-vsock-1024.sock"), PermissionsExt::from_mode(0o777)).unwrap();
    let host = connect(1024);
    let (mut g, _) = guest.accept().unwrap();
    let mut r = BufReader::new(host.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    let port: u32 = ok.strip_prefix("OK ").and_then(|p| p.trim().parse().ok()).expect(&ok);
    assert!((1 << 30..1 << 31).contains(&port), "{ok}");
    (&host).write_all(b"ping").unwrap();
    let mut four = [0; 4];
    g.read_exact(&mut four).unwrap();
    assert_eq!(&four, b"ping");
    g.write_all(b"pong").unwrap();
    r.read_exact(&mut four).unwrap();
    assert_eq!(&four, b"pong");
}

#[test]
fn fault_guest_shutdown_exits_0_after_the_event() {
    let mut v = Vmm::start(&double(), "x", false, "quiet ch_double.fault=guest-shutdown=200", &[]);
    assert_eq!(v.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let names = v.event_names();
    assert_eq!(names[names.len() - 3..], ["vm/shutdown", "vm/deleted", "vmm/shutdown"]);
}

#[test]
fn fault_crash_while_running() {
    let mut v = Vmm::start(&double(), "x", false, "ch_double.fault=crash=300", &[]);
    assert_eq!(v.api().info()["state"], "Running");
    let st = v.wait_exit(Duration::from_secs(10));
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
    let mut v = Vmm::start(&double(), "x", false, "ch_double.fault=crash-exit=100", &[]);
    assert_eq!(v.wait_exit(Duration::from_secs(10)).code(), Some(1));
}

#[test]
fn fault_exit_at_boot() {
    let mut v = Vmm::start(&double(), "x", false, "ch_double.fault=exit-at-boot", &[]);
    assert_eq!(v.wait_exit(Duration::from_secs(10)).code(), Some(1));
    assert!(v.stderr().contains("Error booting VM"), "{}", v.stderr());
    assert_eq!(v.event_names(), ["vmm/starting", "vm/booting", "vm/shutdown", "vm/deleted", "vmm/shutdown"]);
}

#[test]
fn fault_panic_event_keeps_running() {
    let mut v = Vmm::start(&double(), "x", false, "ch_double.fault=panic=100", &[]);
    v.wait_event("guest/panic");
    let e = v.events().into_iter().find(|e| e["source"] == "guest").unwrap();
    assert_eq!(e["properties"]["event"], "panic");
    assert_eq!(v.api().info()["state"], "Running");
}

#[test]
fn fault_slow_boot_holds_requests_until_booted() {
    let started = Instant::now();
    let mut v = Vmm::start(&double(), "x", false, "ch_double.fault=slow-boot=800", &[]);
    let mut api = v.api();
    assert_eq!(api.info()["state"], "Running");
    assert!(started.elapsed() >= Duration::from_millis(800));
}

#[test]
fn fault_hang_answers_nothing_and_ignores_sigterm() {
    let mut v = Vmm::start(&double(), "x", false, "ch_double.fault=hang", &[]);
    let mut api = v.api();
    api.w.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    write!(api.w, "GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n").unwrap();
    let mut b = [0; 1];
    assert!(api.w.read(&mut b).is_err(), "no answer");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(v.child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(v.child.try_wait().unwrap().is_none(), "still there");
    assert!(v.events().is_empty());
}

#[test]
fn fault_power_button_honoured_and_unknown_fault_refused() {
    let mut v = Vmm::start(&double(), "x", false, "ch_double.fault=honour-power-button", &[]);
    assert_eq!(v.api().call("PUT", "vm.power-button").status, 204);
    assert_eq!(v.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let mut v = Vmm::start(&double(), "x", false, "ch_double.fault=nonsense", &[]);
    assert_eq!(v.wait_exit(Duration::from_secs(10)).code(), Some(1));
}

#[test]
fn api_and_event_monitor_as_inherited_fds() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    for (name, exe) in targets() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("guest.elf");
        std::fs::write(&kernel, pvh::guest("fd", false)).unwrap();
        let listener = UnixListener::bind(dir.path().join("api.sock")).unwrap();
        let events = std::fs::File::create(dir.path().join("events.json")).unwrap();
        let (lfd, efd) = (listener.as_raw_fd(), events.as_raw_fd());
        let mut cmd = Command::new(&exe);
        cmd.args(["--api-socket", "fd=3", "--event-monitor", "fd=4", "--kernel"])
            .arg(&kernel)
            .args(["--console", "off", "--serial", "null"])
            .stderr(Stdio::null());
        // SAFETY: only dup2, which is async-signal-safe, runs between fork and exec. The fds
        // go through high numbers first, so that neither clobbers the other at 3 or 4.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(lfd, 200) < 0
                    || libc::dup2(efd, 201) < 0
                    || libc::dup2(200, 3) < 0
                    || libc::dup2(201, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let mut child = KillOnDrop(child);
        let child = &mut child.0;
        let s = UnixStream::connect(dir.path().join("api.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut api = Api { r: BufReader::new(s.try_clone().unwrap()), w: s };
        api.wait_running(name);
        assert_eq!(api.call("PUT", "vmm.shutdown").status, 200, "{name}");
        let st = wait_for("exit", Duration::from_secs(10), || child.try_wait().ok().flatten());
        assert_eq!(st.code(), Some(0), "{name}");
        assert!(dir.path().join("api.sock").exists(), "{name}: fd mode leaves the socket alone");
        let text = std::fs::read_to_string(dir.path().join("events.json")).unwrap();
        assert!(text.contains("\"event\": \"booted\""), "{name}: {text}");
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fault_slow_create_answers_created_first() {
    let mut v = Vmm::start(&double(), "x", false, "ch_double.fault=slow-create=500", &[]);
    let mut api = v.api();
    assert_eq!(api.info()["state"], "Created");
    api.wait_running("double");
}
