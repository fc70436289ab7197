//! The daemon's skeleton: privilege drop of the frontend, socket and directory modes,
//! supervision, and failing closed.

use std::time::Duration;

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
    // Only stdio, the listener and the broker channel are inherited.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for want in ["0", "1", "2", "3", "4"] {
        assert!(fds.iter().any(|f| f == want), "fd {want} in {fds:?}");
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
    // A journal that still lists VMs of an earlier broker is not ignored.
    let scratch = my_hypervisor_tests::scratch_root();
    std::fs::create_dir_all(scratch.path().join("run/vmm")).expect("mkdir");
    std::fs::write(scratch.path().join("run/vmm/broker.journal"), [1, 1, b'a']).expect("journal");
    let out = Daemon::command(scratch.path(), &[]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lists VMs an earlier broker held"));

    // A symlink where a directory belongs is refused, not followed.
    let scratch = my_hypervisor_tests::scratch_root();
    std::fs::create_dir_all(scratch.path().join("run")).expect("mkdir");
    std::os::unix::fs::symlink("/etc", scratch.path().join("run/vmm")).expect("symlink");
    let out = Daemon::command(scratch.path(), &[]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("symlink"));
}
