//! End to end, as root: the daemon started as a user would, every RPC method driven through its
//! socket (create, start, status, list, events, console, logs, exec, stop, remove) on one VM
//! with a writable disk, a tap with an MTU, vsock and its guest agent, and the process tree
//! checked from the host: the frontend and the VMM are non-root, hold no capabilities, run with
//! no_new_privs and a seccomp filter; the VMM has its own namespaces, sees only its minimal
//! root, and holds its tap fd but no unattached /dev/net/tun.
//!
//! The daemon runs with its defaults: besides `--cloud-hypervisor` (the double must come from
//! a flag or PATH) and this file's own `--vm-uid-range` (63600-63619), it gets no flag. Those
//! paths (/run/my_hypervisor, /var/lib/my_hypervisor/images) are host-global, so the test
//! holds a file lock under /run meanwhile, takes them only when no daemon serves there and
//! they hold no VM, and removes exactly what did not exist before. When an installed daemon
//! owns them, it runs on the scratch paths the other daemon tests use instead, and says so.
//!
//! With `MYHV_CLOUD_HYPERVISOR` set, the VM runs on real cloud-hypervisor with `agent: false`
//! (the PVH test guest has no vsock driver) and exec is skipped with a SKIP line.

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use my_hypervisor_tests::agent::Agent;
use my_hypervisor_tests::vmm_sandbox::pids_of_uid;
use my_hypervisor_tests::{Daemon, RpcClient, have_root, proc_status, pvh, scratch_root, staged_bin, wait_for};
use serde_json::{Value, json};

const LINE: &str = "my_hypervisor end to end guest";
const NOT_FOUND: i64 = -32020;

/// The daemon's default paths (docs/operations.md).
const DEFAULT_RPC: &str = "/run/my_hypervisor/rpc.sock";
const DEFAULT_STATE: &str = "/run/my_hypervisor/vms";
const DEFAULT_RUN: &str = "/run/my_hypervisor/vmm";
const DEFAULT_IMAGES: &str = "/var/lib/my_hypervisor/images";
/// What the daemon (or this test) may create under the defaults, parents first; the files of
/// the test's VM `e` too, in case a failed test leaves them.
const DEFAULT_TREE: [&str; 13] = [
    "/run/my_hypervisor",
    "/var/lib/my_hypervisor",
    DEFAULT_IMAGES,
    DEFAULT_RPC,
    DEFAULT_STATE,
    "/run/my_hypervisor/vms/logs",
    "/run/my_hypervisor/vms/sequence",
    "/run/my_hypervisor/console",
    DEFAULT_RUN,
    "/run/my_hypervisor/vms/e.json",
    "/run/my_hypervisor/vms/logs/e.log",
    "/run/my_hypervisor/vms/logs/e.log.1",
    "/run/my_hypervisor/console/e.sock",
];
/// Held while the test owns the default paths: other runs of this suite wait for it.
const LOCK: &str = "/run/my_hypervisor-e2e.lock";
const UIDS: std::ops::RangeInclusive<u32> = 63600..=63619;

/// An exclusive flock on [`LOCK`]; the file is removed (while still held) on drop.
struct Lock {
    /// Closing it releases the lock, after the drop removed the file.
    _file: std::fs::File,
}

impl Lock {
    fn take() -> Lock {
        wait_for("the end-to-end lock", Duration::from_secs(300), || {
            let f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(LOCK).expect("lock file");
            // SAFETY: flock on an fd we own; no memory is passed.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return None;
            }
            // A holder that finished may have removed the file after we opened it: the lock
            // counts only on the file the path still names.
            let same = std::fs::metadata(LOCK).is_ok_and(|m| m.ino() == f.metadata().expect("fstat").ino());
            same.then_some(Lock { _file: f })
        })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(LOCK);
    }
}

/// Removes, on drop, exactly the paths that did not exist before the test.
struct Created(Vec<PathBuf>);

impl Drop for Created {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir_all(p));
        }
    }
}

/// True when no daemon serves on the defaults and they hold no VM: a test may take them over.
fn defaults_free() -> bool {
    let journal_empty = std::fs::read(Path::new(DEFAULT_RUN).join("broker.journal")).map_or(true, |j| j == [0]);
    let no_vm = std::fs::read_dir(DEFAULT_STATE)
        .map(|d| d.flatten().all(|e| !e.file_name().to_string_lossy().ends_with(".json")))
        .unwrap_or(true);
    UnixStream::connect(DEFAULT_RPC).is_err() && journal_empty && no_vm
}

struct Env {
    d: Daemon,
    rpc_socket: PathBuf,
    run: PathBuf,
    images: PathBuf,
    vmm: PathBuf,
    real: bool,
    _created: Created,
    _lock: Option<Lock>,
}

impl Drop for Env {
    /// VMMs outlive their daemon by design; this test's must not outlive the test.
    fn drop(&mut self) {
        let marker = format!("{}/", self.run.display());
        for pid in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = pid.file_name().to_string_lossy().parse::<i32>() else { continue };
            let ours = proc_status(pid)
                .and_then(|s| s.get("Uid")?.split_whitespace().next()?.parse::<u32>().ok())
                .is_some_and(|u| UIDS.contains(&u));
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if ours && String::from_utf8_lossy(&cmd).contains(&marker) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

impl Env {
    /// The daemon with its default paths when they are free (under [`LOCK`]); otherwise, as
    /// when an installed daemon runs on this host, with the scratch paths the other daemon
    /// tests use. Either way only `--cloud-hypervisor` (the double must come from a flag or
    /// PATH) and this file's own `--vm-uid-range` besides.
    fn start(test: &str) -> Option<Env> {
        if !have_root(test) {
            return None;
        }
        let root = scratch_root();
        let real = std::env::var("MYHV_CLOUD_HYPERVISOR").ok();
        let vmm = real.clone().map(PathBuf::from).unwrap_or_else(|| staged_bin(root.path(), "ch-double"));
        // The daemon resolves the binary to its real path; so does the check of the VMM's root.
        let vmm = std::fs::canonicalize(&vmm).unwrap_or_else(|e| panic!("{}: {e}", vmm.display()));
        let uids = format!("{}-{}", UIDS.start(), UIDS.end());
        let mut args: Vec<String> =
            vec!["--cloud-hypervisor".into(), vmm.to_string_lossy().into(), "--vm-uid-range".into(), uids];
        let lock = Lock::take();
        let (lock, created, rpc_socket, run, images) = if defaults_free() {
            let created = Created(DEFAULT_TREE.iter().map(PathBuf::from).filter(|p| !p.exists()).collect());
            std::fs::create_dir_all(DEFAULT_IMAGES).expect("the default image root");
            (Some(lock), created, PathBuf::from(DEFAULT_RPC), PathBuf::from(DEFAULT_RUN), PathBuf::from(DEFAULT_IMAGES))
        } else {
            drop(lock);
            eprintln!("NOTE {test}: another daemon holds the default paths; using scratch paths");
            let p = |rel: &str| root.path().join(rel);
            for (flag, rel) in [
                ("--rpc-socket", "run/rpc.sock"),
                ("--state-dir", "run/vms"),
                ("--console-dir", "run/console"),
                ("--run-dir", "run/vmm"),
                ("--image-root", "images"),
            ] {
                args.extend([flag.to_string(), p(rel).to_string_lossy().into_owned()]);
            }
            std::fs::create_dir_all(p("images")).expect("images");
            (None, Created(vec![]), p("run/rpc.sock"), p("run/vmm"), p("images"))
        };
        for sibling in ["my_hypervisor-frontend", "my_hypervisor-frontend-launcher", "my_hypervisor-vmm-launcher"] {
            staged_bin(root.path(), sibling);
        }
        let log = std::fs::File::create(root.path().join("daemon.log")).expect("log file");
        let child = std::process::Command::new(staged_bin(root.path(), "my_hypervisor-daemon"))
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        let mut d = Daemon { child, root };
        wait_for("the rpc socket to accept", Duration::from_secs(10), || {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("the daemon exited ({status}) before serving:\n{}", d.log());
            }
            UnixStream::connect(&rpc_socket).ok().map(drop)
        });
        Some(Env { d, rpc_socket, run, images, vmm, real: real.is_some(), _created: created, _lock: lock })
    }

    fn rpc(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let mut c = RpcClient::connect(&self.rpc_socket);
        let reply = c.call(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
        match reply.get("error") {
            Some(e) => Err((e["code"].as_i64().unwrap_or(0), e["message"].as_str().unwrap_or("").to_string())),
            None => Ok(reply["result"].clone()),
        }
    }

    fn ok(&self, method: &str, params: Value) -> Value {
        self.rpc(method, params.clone()).unwrap_or_else(|e| panic!("{method} {params}: {e:?}\n{}", self.d.log()))
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.run.join(id)
    }
}

/// A follower of every VM's transitions on its own connection.
struct Follower {
    c: RpcClient,
    sub: Value,
}

impl Follower {
    fn new(socket: &Path) -> Follower {
        let mut c = RpcClient::connect(socket);
        let r = c.call(&json!({"jsonrpc": "2.0", "id": 7, "method": "compute.vm.events.follow", "params": {}}));
        let sub = r.get("result").cloned().unwrap_or_else(|| panic!("follow: {r}"));
        Follower { c, sub }
    }

    /// `(to, reason)` of each notification until one goes `to` `last` (30 s read timeout).
    fn until(&mut self, last: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        loop {
            let line = self.c.read_line().unwrap_or_else(|| panic!("the follower ended before {last}: {out:?}"));
            let n: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(n["method"], "compute.vm.event", "{n}");
            assert_eq!(n["params"]["subscription"], self.sub, "{n}");
            let e = &n["params"]["result"];
            assert_eq!(e["vm_id"], "e", "{n}");
            let to = e["to"].as_str().unwrap_or_default().to_string();
            out.push((to.clone(), e["reason"].as_str().unwrap_or_default().to_string()));
            if to == last {
                return out;
            }
        }
    }
}

/// Capability sets empty, no_new_privs, a seccomp filter, and no uid 0 among real, effective,
/// saved and filesystem uids.
fn assert_confined(what: &str, pid: i32) {
    let st = proc_status(pid).unwrap_or_else(|| panic!("{what} ({pid}) is gone"));
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(st[set], "0000000000000000", "{what}: {set}");
    }
    assert_eq!(st["NoNewPrivs"], "1", "{what}");
    assert_eq!(st["Seccomp"], "2", "{what} runs under a seccomp filter");
    let uids: Vec<&str> = st["Uid"].split_whitespace().collect();
    assert_eq!(uids.len(), 4, "{what}: {}", st["Uid"]);
    assert!(uids.iter().all(|u| *u != "0"), "{what} is not root: Uid {}", st["Uid"]);
}

/// Every path in the VMM's root, seen from the host through /proc/PID/root; the VM's own run
/// dir is listed as it is, not walked.
fn root_entries(pid: i32, vm_dir: &Path) -> Vec<PathBuf> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut todo = vec![root.clone()];
    let mut seen = Vec::new();
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())).flatten() {
            let inside = Path::new("/").join(e.path().strip_prefix(&root).expect("inside"));
            let is_dir = e.file_type().expect("type").is_dir();
            if is_dir && inside != vm_dir {
                todo.push(e.path());
                continue;
            }
            seen.push(inside);
        }
    }
    seen
}

/// The interfaces the VMM's /dev/net/tun fds are attached to (fdinfo's `iff:` line); panics on
/// a /dev/net/tun fd attached to none, which could make new taps.
fn tap_fds(pid: i32) -> Vec<String> {
    let mut taps = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the VMM's fds").flatten() {
        let Ok(link) = std::fs::read_link(e.path()) else { continue };
        if link != Path::new("/dev/net/tun") {
            continue;
        }
        let n = e.file_name().to_string_lossy().into_owned();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).expect("fdinfo");
        let iff = info.lines().find_map(|l| l.strip_prefix("iff:")).map(|v| v.trim().to_string());
        let iff = iff.unwrap_or_else(|| panic!("fd {n} of the VMM is an unattached /dev/net/tun:\n{info}"));
        taps.push(iff);
    }
    taps
}

fn read_console_until(s: &mut UnixStream, want: &[u8]) {
    let end = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while !got.windows(want.len()).any(|w| w == want) {
        assert!(Instant::now() < end, "the console never showed {:?}", String::from_utf8_lossy(want));
        match s.read(&mut buf) {
            Ok(0) => panic!("console EOF; got {:?}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("console read: {e}"),
        }
    }
}

#[test]
fn every_method_through_the_socket_and_a_confined_process_tree() {
    let test = "every_method_through_the_socket_and_a_confined_process_tree";
    let Some(env) = Env::start(test) else { return };
    let mut follower = Follower::new(&env.rpc_socket);

    // create: a writable disk, a tap with an MTU, vsock, and the guest agent (with the double).
    let kernel = env.images.join(format!("e2e-{}-guest.elf", std::process::id()));
    let _kernel_file = Created(vec![kernel.clone()]);
    std::fs::write(&kernel, pvh::guest(LINE, false)).expect("guest");
    let disk = env.images.join(format!("e2e-{}-disk.raw", std::process::id()));
    let _disk_file = Created(vec![disk.clone()]);
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let created = env.ok(
        "compute.vm.create",
        json!({"id": "e", "vcpus": 1, "memory_mib": 64, "kernel": kernel, "cmdline": "console=ttyS0",
               "disks": [{"path": disk, "readonly": false}], "nets": [{"mtu": 1400}],
               "vsock": true, "agent": !env.real}),
    );
    assert_eq!(created["state"], "pending", "{created}");

    // start: with the double, guest-init (--listen-unix) answers behind its vsock muxer.
    let (started, agent) = thread::scope(|s| {
        let start = s.spawn(|| env.rpc("compute.vm.start", json!({"vm_id": "e"})));
        let agent = (!env.real).then(|| {
            let vsock = env.vm_dir("e").join("vsock.sock");
            wait_for("the VMM's vsock socket", Duration::from_secs(20), || vsock.exists().then_some(()));
            Agent::guest_init(&env.vm_dir("e"), env.d.root.path())
        });
        (start.join().expect("start thread"), agent)
    });
    let agent_log = || agent.as_ref().map(Agent::log_text).unwrap_or_default();
    let started = started.unwrap_or_else(|e| panic!("start: {e:?}\n{}\n{}", env.d.log(), agent_log()));
    assert_eq!(started["state"], "running", "{started}");

    // status and list.
    let st = env.ok("compute.vm.status", json!({"vm_id": "e"}));
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["spec"]["nets"][0]["mtu"], 1400, "{st}");
    let pid = st["pid"].as_i64().unwrap_or_else(|| panic!("status has the VMM's pid: {st}")) as i32;
    let list = env.ok("compute.vm.list", json!({}));
    let vms = list["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 1, "{list}");
    assert_eq!((vms[0]["vm_id"].as_str(), vms[0]["state"].as_str()), (Some("e"), Some("running")), "{list}");

    // events: tail holds create's transition through running, and the follower saw the same.
    let tail = env.ok("compute.vm.events.tail", json!({"vm_id": "e"}));
    let states: Vec<&str> =
        tail["events"].as_array().expect("events").iter().filter_map(|e| e["to"].as_str()).collect();
    assert_eq!(states, ["pending", "provisioning", "configured", "starting", "running"], "{tail}");
    let followed = follower.until("running");
    let followed_states: Vec<&str> = followed.iter().map(|(to, _)| to.as_str()).collect();
    assert_eq!(followed_states, states, "{followed:?}");
    if !env.real {
        assert!(followed.last().is_some_and(|(_, why)| why.contains("guest agent answers")), "{followed:?}");
    }

    // console and logs: the guest's serial line reaches a console client and `logs`.
    let ep = env.ok("compute.vm.console.endpoint", json!({"vm_id": "e"}));
    assert_eq!(ep["protocol"], "raw", "{ep}");
    let path = PathBuf::from(ep["path"].as_str().expect("path"));
    let mut console = wait_for("the console socket", Duration::from_secs(10), || UnixStream::connect(&path).ok());
    console.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    read_console_until(&mut console, LINE.as_bytes());
    let logs = wait_for("the serial line in logs", Duration::from_secs(10), || {
        let r = env.ok("compute.vm.logs", json!({"vm_id": "e", "stream": "console", "max_bytes": 65536}));
        let data = B64.decode(r["data"].as_str().expect("data")).expect("base64");
        data.windows(LINE.len()).any(|w| w == LINE.as_bytes()).then_some(r)
    });
    assert_eq!((logs["stream"].as_str(), logs["encoding"].as_str()), (Some("console"), Some("base64")), "{logs}");
    let vmm_log = env.ok("compute.vm.logs", json!({"vm_id": "e", "stream": "vmm", "max_bytes": 4096}));
    assert_eq!(vmm_log["stream"], "vmm", "{vmm_log}");

    // exec: to guest-init behind the double's muxer.
    if env.real {
        eprintln!("SKIP {test} (exec) with real cloud-hypervisor: the PVH test guest has no vsock driver");
    } else {
        let r = env.ok(
            "compute.vm.exec",
            json!({"vm_id": "e", "argv": ["/bin/sh", "-c", "echo \"$GREETING\"; exit 3"],
                   "env": {"GREETING": "hello from the guest"}, "encoding": "base64"}),
        );
        assert_eq!(r["exit_code"], 3, "{r}\n{}", agent_log());
        assert_eq!(B64.decode(r["stdout"].as_str().expect("stdout")).expect("base64"), b"hello from the guest\n");
    }

    // The process tree. The frontend: a child of the daemon, confined.
    let frontend = env.d.frontend_pid();
    assert_confined("the frontend", frontend);
    let st = proc_status(frontend).expect("the frontend");
    for ids in ["Uid", "Gid"] {
        let all: Vec<&str> = st[ids].split_whitespace().collect();
        assert_eq!(all, ["61000"; 4], "the frontend runs as --frontend-user's default: {ids} {}", st[ids]);
    }
    // The VMM: confined, under a VM uid, in its own namespaces.
    assert_confined("the VMM", pid);
    let uid: u32 = proc_status(pid).expect("VMM")["Uid"].split_whitespace().next().unwrap().parse().expect("uid");
    assert!(UIDS.contains(&uid), "the VMM runs as a uid of the range: {uid}");
    let under_uid = pids_of_uid(uid);
    assert!(under_uid.contains(&pid), "{under_uid:?}");
    for p in under_uid {
        assert_confined(&format!("process {p} of the VM's uid"), p);
    }
    let ns = |kind: &str, p: &str| std::fs::read_link(format!("/proc/{p}/ns/{kind}")).expect("ns link");
    for kind in ["pid", "ipc", "uts", "mnt", "net"] {
        assert_ne!(ns(kind, &pid.to_string()), ns(kind, "self"), "the VMM has its own {kind} namespace");
        assert_ne!(ns(kind, &pid.to_string()), ns(kind, &frontend.to_string()), "not the frontend's {kind} namespace");
    }
    // Its minimal root: /dev's nodes, its own run dir, its two images, the binary and its
    // libraries; no other VM's dir, no broker journal, no other image.
    let seen = root_entries(pid, &env.vm_dir("e"));
    let libs = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"];
    for p in &seen {
        let ok = *p == env.vm_dir("e")
            || *p == kernel
            || *p == disk
            || *p == env.vmm
            || ["/dev/kvm", "/dev/urandom", "/dev/null"].iter().any(|n| p == Path::new(n))
            || libs.iter().any(|l| p.starts_with(l));
        assert!(ok, "{} is in the VMM's root: {seen:?}", p.display());
    }
    for needed in [&env.vmm, &env.vm_dir("e"), &kernel, &disk] {
        assert!(seen.contains(needed), "{} is not in the VMM's root: {seen:?}", needed.display());
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    for gone in ["etc", "proc", "bin/sh", "dev/net/tun", "sys"] {
        assert!(!root.join(gone).exists(), "/{gone} is in the VMM's root");
    }
    // Its tap fd, attached to the VM's tap with the spec's MTU; no unattached /dev/net/tun.
    let tap = format!("mh{uid}n0");
    let taps = tap_fds(pid);
    assert!(!taps.is_empty() && taps.iter().all(|t| *t == tap), "the VMM holds tap {tap}: {taps:?}");
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{tap}/mtu")).expect("the tap exists");
    assert_eq!(mtu.trim(), "1400");

    // stop: the VMM and its tap go.
    assert_eq!(env.ok("compute.vm.stop", json!({"vm_id": "e", "timeout_secs": 1}))["state"], "stopped");
    drop(agent);
    wait_for("the VMM to go", Duration::from_secs(10), || {
        proc_status(pid).is_none_or(|s| s["State"].starts_with('Z')).then_some(())
    });
    assert!(!Path::new("/sys/class/net").join(&tap).exists(), "tap {tap} outlived stop");
    let followed: Vec<String> = follower.until("stopped").into_iter().map(|(to, _)| to).collect();
    assert_eq!(followed, ["stopping", "stopped"]);

    // remove: the VM is gone from status and list, and the follower sees it go.
    env.ok("compute.vm.remove", json!({"vm_id": "e"}));
    assert_eq!(env.rpc("compute.vm.status", json!({"vm_id": "e"})).unwrap_err().0, NOT_FOUND);
    assert_eq!(env.ok("compute.vm.list", json!({}))["vms"], json!([]));
    let followed: Vec<String> = follower.until("removed").into_iter().map(|(to, _)| to).collect();
    assert_eq!(followed, ["removed"]);
    assert!(!env.vm_dir("e").exists(), "the run dir outlived remove");
    assert_eq!(std::fs::read(env.run.join("broker.journal")).expect("journal"), vec![0], "journal empty");
}
