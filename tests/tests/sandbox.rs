//! The VMM sandbox, end to end: a probe started through the real spawn path and launcher,
//! under a VM's policy, tries to escape; the `--explain` report against its golden file; and,
//! with `MYHV_CLOUD_HYPERVISOR` set, a real cloud-hypervisor booting a tiny PVH guest.
//! `vmm_walls.rs` tests what keeps a VMM's processes and output inside its VM.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use my_hypervisor_broker_proto::{ExitStatus, ImageRole, Reply, Request, SocketRole};
use my_hypervisor_tests::harness::Harness;
use my_hypervisor_tests::vmm_sandbox::{RunDir, held, http, image, read_log, start};
use my_hypervisor_tests::{have_root, proc_status, pvh, staged_bin, wait_for};

#[test]
fn escapes_fail_and_needs_succeed() {
    if !have_root("escapes_fail_and_needs_succeed") {
        return;
    }
    let run = RunDir::new("escape");
    let mut h = Harness::start_with("sandbox-probe", &["--run-dir", &run.vmm(), "--vm-uid-range", "62100-62109"]);
    let host_socket = PathBuf::from(format!("/run/myhv-escape-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&host_socket);
    let _listener = UnixListener::bind(&host_socket).expect("host socket");
    std::fs::set_permissions(&host_socket, PermissionsExt::from_mode(0o777)).expect("chmod");

    let (reply, _) = h.call(Request::Prepare {
        vm: "other".into(),
        images: vec![image(&h.images().join("other.kernel"), ImageRole::Kernel)],
    });
    assert!(matches!(reply, Reply::Refused { .. }), "the kernel does not exist yet: {reply:?}");
    std::fs::write(h.images().join("other.kernel"), b"other").expect("write");
    let (reply, _) = h.call(Request::Prepare {
        vm: "other".into(),
        images: vec![image(&h.images().join("other.kernel"), ImageRole::Kernel)],
    });
    assert!(matches!(reply, Reply::Prepared { .. }), "{reply:?}");

    let content = format!("all {}", host_socket.display());
    let (uid, pid, log) = start(&mut h, "a", content.as_bytes(), true, true);
    let text = wait_for("the probe's report", Duration::from_secs(20), || {
        let t = read_log(&log);
        t.contains("READY").then_some(t)
    });
    let _ = std::fs::remove_file(&host_socket);
    let result = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("RESULT {name} ")))
            .unwrap_or_else(|| panic!("no result for {name} in:\n{text}"))
            .to_string()
    };
    for denied in [
        "read-etc-shadow",
        "read-etc-passwd",
        "list-image-root",
        "read-other-vm-dir",
        "write-beside-own-dir",
        "write-var-tmp",
        "open-dev-mem",
        "open-disk-device",
        "exec-bin-sh",
        "exec-image",
        "exec-run-dir-file",
        "read-etc-hostname",
        "list-proc",
        "connect-tcp",
        "connect-host-unix-socket",
    ] {
        let r = result(denied);
        assert!(
            ["denied:EACCES", "denied:EPERM", "denied:ENOENT", "denied:EROFS"].iter().any(|d| r.starts_with(d)),
            "{denied} must fail with EACCES, EPERM, ENOENT or EROFS, got {r}\n{text}"
        );
    }
    for allowed in ["read-kernel", "kvm-create-vm", "write-own-disk", "socket-in-own-dir", "tap-tungetiff"] {
        assert_eq!(result(allowed), "ok", "{allowed}\n{text}");
    }
    // Refused by request number on the tap fd the broker passed, with an errno, not a kill.
    for refused in ["tap-tunsetpersist", "tap-siocsifhwaddr"] {
        assert!(result(refused).starts_with("denied:ENOTTY"), "{refused}\n{text}");
    }
    assert!(result("io-uring-setup").starts_with("denied:ENOSYS"), "{text}");
    // Host files are out of sight: nothing exists there but its own tree.
    for gone in ["read-etc-shadow", "read-etc-passwd", "read-etc-hostname", "list-proc", "exec-bin-sh"] {
        assert!(result(gone).starts_with("denied:ENOENT"), "{gone}: {}", result(gone));
    }
    // Seen from outside: its root holds /dev's three nodes, its own runtime dir, its images,
    // and the probe with its interpreter and libraries; no /proc, no /etc.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let (probe, images) = (h.d.path("bin/sandbox-probe"), h.images());
    let lib_dirs = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"];
    let mut todo = vec![root.clone()];
    let mut seen = Vec::new();
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read the probe's tree").flatten() {
            let inside = Path::new("/").join(e.path().strip_prefix(&root).expect("inside"));
            if e.file_type().expect("type").is_dir() && !inside.starts_with(&run.0) {
                todo.push(e.path());
                continue;
            }
            let ok = inside.starts_with(&run.0)
                || inside.starts_with(&images)
                || inside == probe
                || ["/dev/kvm", "/dev/urandom", "/dev/null"].iter().any(|n| inside == Path::new(n))
                || lib_dirs.iter().any(|l| inside.starts_with(l));
            assert!(ok, "{} is in the probe's root", inside.display());
            seen.push(inside);
        }
    }
    assert!(seen.contains(&probe) && seen.len() < 30, "{seen:?}");
    assert!(!root.join("proc").exists() && !root.join("etc").exists());
    let ns = |kind: &str, p: &str| std::fs::read_link(format!("/proc/{p}/ns/{kind}")).expect("ns link");
    for kind in ["pid", "ipc", "uts", "mnt", "net"] {
        // Its own namespaces: the links differ from the test's.
        assert_ne!(ns(kind, &pid.to_string()), ns(kind, "self"), "the probe has its own {kind} namespace");
    }
    assert!(text.contains("landlock ABI 6 FullyEnforced"), "{text}");

    // From outside: the probe's identity, capabilities, no_new_privs and seccomp.
    let st = proc_status(pid as i32).expect("probe status");
    assert_eq!(st["Uid"].split_whitespace().collect::<Vec<_>>(), vec![uid.to_string(); 4]);
    assert_eq!(st["Gid"].split_whitespace().collect::<Vec<_>>(), vec![uid.to_string(); 4]);
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
        assert_eq!(st[set], "0000000000000000", "{set}");
    }
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["Seccomp"], "2");
    assert_eq!(st["Seccomp_filters"], "2", "the allow-list and the second filter");
    assert_eq!(h.call(Request::Release { vm: "a".into() }).0, Reply::Released);
}

#[test]
fn forbidden_syscalls_kill_the_vmm() {
    if !have_root("forbidden_syscalls_kill_the_vmm") {
        return;
    }
    let run = RunDir::new("sigsys");
    let mut h = Harness::start_with("sandbox-probe", &["--run-dir", &run.vmm(), "--vm-uid-range", "62110-62129"]);
    for op in ["fork", "ptrace", "mount", "unshare", "bpf", "kexec_load", "init_module", "keyctl", "setuid"] {
        let vm = format!("k-{}", op.replace('_', "-"));
        let (_, _, log) = start(&mut h, &vm, op.as_bytes(), false, false);
        let exit = wait_for(&format!("{op} to end the probe"), Duration::from_secs(10), || held(&mut h, &vm).exit);
        let text = read_log(&log);
        assert_eq!(exit, ExitStatus::Signal(libc::SIGSYS), "{op}: {text}");
        assert!(!text.contains("SURVIVED"), "{op}: {text}");
        assert_eq!(h.call(Request::Release { vm }).0, Reply::Released);
    }
}

#[test]
fn explain_matches_golden() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let out = std::process::Command::new(my_hypervisor_tests::bin("my_hypervisor-vmm-launcher"))
        .arg("--explain")
        .arg(fixtures.join("explain-spec.json"))
        .output()
        .expect("run the launcher");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = String::from_utf8(out.stdout).expect("utf-8");
    let golden = fixtures.join("explain.golden");
    if std::env::var_os("MYHV_UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &got).expect("write golden");
    }
    let want = std::fs::read_to_string(&golden).expect("golden file");
    assert_eq!(got, want, "--explain changed; if on purpose, rerun with MYHV_UPDATE_GOLDEN=1 and review the diff");
}

#[test]
fn real_cloud_hypervisor_boots_in_the_sandbox() {
    let Some(ch) = std::env::var_os("MYHV_CLOUD_HYPERVISOR") else {
        eprintln!(
            "SKIP real_cloud_hypervisor_boots_in_the_sandbox: set MYHV_CLOUD_HYPERVISOR=/path/to/cloud-hypervisor"
        );
        return;
    };
    if !have_root("real_cloud_hypervisor_boots_in_the_sandbox") {
        return;
    }
    let run = RunDir::new("realch");
    let mut h = Harness::start_with(&ch.to_string_lossy(), &["--run-dir", &run.vmm(), "--vm-uid-range", "62130-62139"]);
    let guest = pvh::guest("my_hypervisor sandbox test guest", false);
    let (_, pid, log) = start(&mut h, "real", &guest, false, false);
    let state = wait_for("vm.info to say Running", Duration::from_secs(20), || {
        let (reply, fds) = h.call(Request::Connect { vm: "real".into(), role: SocketRole::Api });
        if reply != Reply::Connected {
            return None;
        }
        let (status, body) = http(fds.into_iter().next()?, "GET", "/api/v1/vm.info");
        let info: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200 && info["state"] == "Running").then_some(info["state"].clone())
    });
    assert_eq!(state, "Running", "{}", read_log(&log));
    let st = proc_status(pid as i32).expect("CH status");
    assert_eq!(
        (st["Seccomp"].as_str(), st["NoNewPrivs"].as_str(), st["CapEff"].as_str()),
        ("2", "1", "0000000000000000")
    );
    eprintln!("real cloud-hypervisor {} is Running in its sandbox; its log:\n{}", ch.to_string_lossy(), read_log(&log));
    assert_eq!(h.call(Request::Release { vm: "real".into() }).0, Reply::Released);
    let _ = staged_bin;
}
