//! The daemon's skeleton: privilege drop and sandbox of the frontend, socket and directory
//! modes, supervision, and failing closed.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use my_hypervisor_broker_proto::{Reply, Request};
use my_hypervisor_tests::harness::Harness;
use my_hypervisor_tests::{Daemon, have_root, owner_mode, proc_status, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

const FRONTEND_UID: u32 = 61000;

fn assert_serves(d: &Daemon) {
    let reply = d.call(&json!({"jsonrpc": "2.0", "id": 7, "method": "no.such.method"}));
    assert_eq!(reply["id"], 7, "{reply}");
    assert_eq!(reply["error"]["code"], -32601, "{reply}");
}

#[test]
fn frontend_runs_unprivileged_and_is_restarted() {
    if !have_root("frontend_runs_unprivileged_and_is_restarted") {
        return;
    }
    let d = Daemon::start(&[]);
    let pid = d.frontend_pid();
    let st = proc_status(pid).expect("frontend status");
    let uids: Vec<&str> = st["Uid"].split_whitespace().collect();
    assert_eq!(uids, vec!["61000"; 4], "real, effective, saved and fs uid");
    assert_eq!(st["Gid"].split_whitespace().collect::<Vec<_>>(), vec!["61000"; 4]);
    assert_eq!(st["Groups"], "", "no supplementary groups");
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
        assert_eq!(st[set], "0000000000000000", "{set}");
    }
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["Seccomp"], "2", "the frontend runs under its seccomp filter");
    assert_eq!(st["NSpid"].split_whitespace().last(), Some("1"), "PID 1 of its own PID namespace");
    for ns in ["mnt", "net", "pid", "ipc", "uts"] {
        let of = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).expect("ns link");
        assert_ne!(of(pid), of(d.pid()), "the frontend has its own {ns} namespace");
    }
    let net_dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).expect("the frontend's interfaces");
    let ifaces: Vec<&str> = net_dev.lines().skip(2).filter_map(|l| Some(l.split(':').next()?.trim())).collect();
    assert_eq!(ifaces, ["lo"], "an empty network namespace");
    // Only stdio, the listener and the broker channel are inherited.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for want in ["0", "1", "2", "3", "4"] {
        assert!(fds.iter().any(|f| f == want), "fd {want} in {fds:?}");
    }
    // The launcher's fds (the pinned binary, the report pipe) are closed at the exec.
    for fd in fds.iter().filter(|f| f.parse::<i32>().is_ok_and(|n| n > 4)) {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
        let target = target.to_string_lossy();
        assert!(!target.starts_with("pipe:") && !target.ends_with("my_hypervisor-frontend"), "fd {fd}: {target}");
    }
    assert_eq!(std::fs::read(format!("/proc/{pid}/environ")).expect("environ"), b"", "empty environment");

    assert_eq!(owner_mode(&d.rpc_socket()), (0, 0, 0o600), "rpc socket");
    assert_eq!(owner_mode(&d.path("run/vms")), (FRONTEND_UID, FRONTEND_UID, 0o700), "state dir");
    assert_eq!(owner_mode(&d.path("run/console")), (FRONTEND_UID, FRONTEND_UID, 0o700), "console dir");
    assert_eq!(owner_mode(&d.path("run/vmm")), (0, 0, 0o711), "run dir");
    assert_eq!(owner_mode(&d.path("images")), (0, 0, 0o755), "image root");
    assert_serves(&d);

    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill frontend");
    let new_pid = wait_for("a new frontend", Duration::from_secs(10), || {
        let p = d.frontend_pid();
        (p != pid).then_some(p)
    });
    assert_eq!(proc_status(new_pid).expect("status")["NoNewPrivs"], "1");
    wait_for("the new frontend to serve", Duration::from_secs(10), || {
        std::panic::catch_unwind(|| assert_serves(&d)).ok()
    });
    // PID 1 of a namespace ignores signals it has no handler for: the frontend handles SIGTERM.
    kill(Pid::from_raw(new_pid), Signal::SIGTERM).expect("SIGTERM the frontend");
    wait_for("the frontend to stop on SIGTERM", Duration::from_secs(5), || (d.frontend_pid() != new_pid).then_some(()));
}

/// Inside the frontend's box, a stand-in frontend tries its way out; each attempt runs in a
/// forked child, and the stand-in reports how it ended.
#[test]
fn the_frontend_sandbox_refuses_escapes() {
    if !have_root("the_frontend_sandbox_refuses_escapes") {
        return;
    }
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("a TCP listener");
    tcp.set_nonblocking(true).expect("nonblocking");
    let port = tcp.local_addr().expect("port").port();
    let mut h = Harness::start_with("stub-vmm", &["--vm-uid-range", "62200-62209"]);
    let pid = probe_pid(&h);
    let st = proc_status(pid).expect("status");
    assert_eq!((st["Seccomp"].as_str(), st["NoNewPrivs"].as_str()), ("2", "1"), "the stand-in is confined too");
    // World-readable by its mode, so only Landlock keeps the frontend out.
    let open_file = h.d.path("readable-by-all");
    std::fs::write(&open_file, b"x").expect("write");
    std::fs::set_permissions(&open_file, PermissionsExt::from_mode(0o644)).expect("chmod");
    let journal = h.d.path("run/vmm/broker.journal");
    assert!(journal.exists(), "the broker keeps its journal");
    let state = h.d.path("run/vms/probe");
    const SIGSYS: &str = "killed 31";
    const EACCES: &str = "err 13";
    let cases = [
        (format!("tcp {port}"), SIGSYS),
        ("userns".to_string(), SIGSYS),
        ("clone-userns".to_string(), SIGSYS),
        ("mount".to_string(), SIGSYS),
        ("read /etc/shadow".to_string(), EACCES),
        (format!("read {}", journal.display()), EACCES),
        (format!("read {}", open_file.display()), EACCES),
        (format!("write {}", h.d.path("run/console/x").display()), EACCES),
        // What the frontend needs still works in the same box.
        (format!("write {}", state.display()), "ok"),
        (format!("read {}", state.display()), "ok"),
        ("read /etc/ld.so.cache".to_string(), "ok"),
    ];
    for (attempt, want) in cases {
        assert_eq!(h.probe(&format!("try {attempt}")), want, "{attempt}");
    }
    assert!(tcp.accept().is_err(), "no TCP connection reached the host");
    assert_eq!(std::fs::read(&state).expect("the probe's file"), b"probe");
}

/// A restart ends the old frontend's whole process tree before the new frontend is served:
/// a child the old one forked, still holding the RPC listener, dies with it.
#[test]
fn a_restart_ends_the_old_frontends_forked_children() {
    if !have_root("a_restart_ends_the_old_frontends_forked_children") {
        return;
    }
    let mut h = Harness::start_with("stub-vmm", &["--vm-uid-range", "62210-62219"]);
    let old = probe_pid(&h);
    assert_eq!(h.probe("fork"), "forked 1");
    let forked = my_hypervisor_tests::children(old);
    assert_eq!(forked.len(), 1, "one forked child of {old}");
    let forked = forked[0];
    // A message the broker cannot decode: it kills the frontend and starts a new one.
    nix::sys::socket::send(h.chan.as_raw_fd(), b"junk", nix::sys::socket::MsgFlags::empty()).expect("send junk");
    wait_for("the channel to drop", Duration::from_secs(5), || {
        h.d.log().contains("verdict=\"drop-channel\"").then_some(())
    });
    // The log line comes just before the kill: wait for the new frontend, not for the old
    // one's end. By the time the new one exists, the child must be gone.
    wait_for("a new frontend", Duration::from_secs(10), || (probe_pid(&h) != old).then_some(()));
    assert!(
        !std::path::Path::new(&format!("/proc/{forked}")).exists(),
        "the forked child {forked} outlived the restart"
    );
    // The new frontend hands over its channel; a surviving child would answer "stale" instead.
    h.reconnect();
    let (reply, _) = h.call(Request::Inventory);
    assert!(matches!(reply, Reply::Inventory { .. }), "{reply:?}");
}

/// The stand-in frontend's pid: the daemon's child that runs `probe-frontend`.
fn probe_pid(h: &Harness) -> i32 {
    wait_for("the stand-in frontend", Duration::from_secs(10), || {
        my_hypervisor_tests::children(h.d.pid()).into_iter().find(|&p| {
            std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e.to_string_lossy().ends_with("probe-frontend"))
        })
    })
}

#[test]
fn existing_dirs_are_repaired_and_group_grant_applies() {
    if !have_root("existing_dirs_are_repaired_and_group_grant_applies") {
        return;
    }
    let scratch = my_hypervisor_tests::scratch_root();
    let root = scratch.path();
    std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    // A state dir left world-writable and owned by root must come back as documented.
    std::fs::create_dir_all(root.join("run/vms")).expect("mkdir");
    std::fs::set_permissions(root.join("run/vms"), std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let child =
        Daemon::command(root, &["--rpc-group", "4242", "--rpc-limit", "max-line-bytes=256"]).spawn().expect("spawn");
    let d = Daemon { child, root: scratch };
    wait_for("the rpc socket", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(d.rpc_socket()).ok()
    });
    assert_eq!(owner_mode(&d.path("run/vms")), (FRONTEND_UID, FRONTEND_UID, 0o700));
    assert_eq!(owner_mode(&d.rpc_socket()), (0, 4242, 0o660));
    assert_serves(&d);
    // The limit given to the daemon reaches the frontend: a 300-byte line is refused.
    let long = json!({"jsonrpc": "2.0", "id": 1, "method": "x".repeat(300)});
    let reply = d.call(&long);
    assert_eq!(reply["id"], serde_json::Value::Null, "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap_or_default().contains("too big"), "{reply}");
}

#[test]
fn a_dead_spawn_helper_stops_the_daemon() {
    if !have_root("a_dead_spawn_helper_stops_the_daemon") {
        return;
    }
    let mut d = Daemon::start(&[]);
    let frontend = d.frontend_pid();
    let helper = my_hypervisor_tests::children(d.pid()).into_iter().find(|&p| p != frontend).expect("the spawn helper");
    kill(Pid::from_raw(helper), Signal::SIGKILL).expect("kill the helper");
    let status = wait_for("the daemon to stop", Duration::from_secs(10), || d.child.try_wait().ok().flatten());
    assert!(!status.success());
    assert!(d.log().contains("the spawn helper exited"), "{}", d.log());
}

#[test]
fn fails_closed() {
    if !have_root("fails_closed") {
        return;
    }
    let scratch = my_hypervisor_tests::scratch_root();
    let cases: [&[&str]; 6] = [
        &["--rpc-limit", "no-such-limit=1"],
        &["--rpc-limit", "max-line-bytes=-5"],
        &["--frontend-bin", "/nonexistent/frontend"],
        &["--frontend-user", "0:0"],
        &["--vm-uid-range", "60990-61010"],
        &["--frontend-user", "no-such-user-anywhere"],
    ];
    for extra in cases {
        let out = Daemon::command(scratch.path(), extra).output().expect("run");
        assert!(!out.status.success(), "{extra:?} must stop the daemon");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("daemon stopped") || err.contains("invalid value"), "{extra:?}: {err}");
    }
    // A frontend that cannot be confined and exec'd is a failed start, reported by the
    // launcher: here a script, whose interpreter the frontend's Landlock rules do not allow.
    let script = scratch.path().join("frontend.sh");
    std::fs::write(&script, b"#!/bin/sh\nexit 0\n").expect("script");
    std::fs::set_permissions(&script, PermissionsExt::from_mode(0o755)).expect("chmod");
    let out = Daemon::command(scratch.path(), &["--frontend-bin", script.to_str().unwrap()]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("start frontend: frontend sandbox: exec the frontend"), "{err}");

    // A journal of an earlier broker that cannot be read is not ignored: its VMs could
    // otherwise be handed out twice.
    let scratch = my_hypervisor_tests::scratch_root();
    std::fs::create_dir_all(scratch.path().join("run/vmm")).expect("mkdir");
    std::fs::write(scratch.path().join("run/vmm/broker.journal"), [1, 1, b'a']).expect("journal");
    let out = Daemon::command(scratch.path(), &[]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broker.journal cannot be decoded"), "{err}");

    // A symlink where a directory belongs is refused, not followed.
    let scratch = my_hypervisor_tests::scratch_root();
    std::fs::create_dir_all(scratch.path().join("run")).expect("mkdir");
    std::os::unix::fs::symlink("/etc", scratch.path().join("run/vmm")).expect("symlink");
    let out = Daemon::command(scratch.path(), &[]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("symlink"));
}
