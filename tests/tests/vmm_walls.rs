//! The walls that keep a VMM's processes and output inside its VM, end to end through the
//! real broker and launcher: a forked child ends with its VM, a uid still in use is never
//! handed out, writes stop at the run dir's limit, and real cloud-hypervisor needs no call
//! the filters refuse.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use my_hypervisor_broker_proto::{ExitStatus, ImageRole, Reply, Request, SocketRole, VmmConfig};
use my_hypervisor_tests::harness::Harness;
use my_hypervisor_tests::vmm_sandbox::{Kmsg, RunDir, held, http, image, pids_of_uid, read_log, start};
use my_hypervisor_tests::{have_root, proc_status, pvh, wait_for};

#[test]
fn a_forked_child_ends_with_its_vm() {
    if !have_root("a_forked_child_ends_with_its_vm") {
        return;
    }
    let run = RunDir::new("fork");
    // The debugging mode lets the fork through (and logs it), as a stand-in for a VMM that
    // found a way to fork.
    let args = ["--run-dir", &run.vmm(), "--vm-uid-range", "62140-62149", "--vmm-seccomp", "log"];
    let mut h = Harness::start_with("sandbox-probe", &args);
    let (uid, pid, log) = start(&mut h, "f", b"fork", false, true);
    wait_for("the probe to fork", Duration::from_secs(20), || read_log(&log).contains("FORKED").then_some(()));
    let child = wait_for("the forked child", Duration::from_secs(5), || {
        my_hypervisor_tests::children(pid as i32).into_iter().next()
    });
    assert_eq!(proc_status(child).expect("child")["Uid"].split_whitespace().next(), Some(uid.to_string().as_str()));
    let tap = format!("mh{uid}n0");
    assert!(Path::new("/sys/class/net").join(&tap).exists(), "the tap exists while the VM runs");
    let dir = run.0.join("vmm").join("f");
    assert!(dir.exists());

    assert_eq!(h.call(Request::Release { vm: "f".into() }).0, Reply::Released);
    assert!(proc_status(child).is_none(), "the forked child {child} outlived Release");
    assert_eq!(pids_of_uid(uid), Vec::<i32>::new(), "processes still run under the VM uid {uid}");
    assert!(!Path::new("/sys/class/net").join(&tap).exists(), "tap {tap} outlived Release");
    assert!(!dir.exists(), "the run dir outlived Release");
    // The next VM may take the uid.
    std::fs::write(h.images().join("g.kernel"), b"x").expect("kernel");
    let images = vec![image(&h.images().join("g.kernel"), ImageRole::Kernel)];
    assert!(
        matches!(h.call(Request::Prepare { vm: "g".into(), images }).0, Reply::Prepared { uid: u, .. } if u == uid)
    );
    assert_eq!(h.call(Request::Release { vm: "g".into() }).0, Reply::Released);
}

#[test]
fn a_uid_in_use_is_not_handed_out() {
    if !have_root("a_uid_in_use_is_not_handed_out") {
        return;
    }
    let run = RunDir::new("uidbusy");
    let mut h = Harness::start_with("sandbox-probe", &["--run-dir", &run.vmm(), "--vm-uid-range", "62150-62159"]);
    // A process left under the first uid of the range, as an orphan of an old VMM would be.
    let mut orphan = std::process::Command::new("sleep")
        .arg("60")
        .uid(62150)
        .gid(62150)
        .spawn()
        .expect("start a process as uid 62150");
    wait_for("the orphan to run as 62150", Duration::from_secs(5), || pids_of_uid(62150).first().copied());
    std::fs::write(h.images().join("u.kernel"), b"x").expect("kernel");
    let images = vec![image(&h.images().join("u.kernel"), ImageRole::Kernel)];
    let (reply, _) = h.call(Request::Prepare { vm: "u".into(), images });
    let _ = orphan.kill();
    let _ = orphan.wait();
    assert!(matches!(reply, Reply::Prepared { uid: 62151, .. }), "uid 62150 is in use: {reply:?}");
    let log = h.d.log();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && l.contains("62150") && l.contains(&orphan.id().to_string())),
        "the skipped uid and its process are logged as an error:\n{log}"
    );
    assert_eq!(h.call(Request::Release { vm: "u".into() }).0, Reply::Released);
}

#[test]
fn writes_stop_at_the_run_dirs_limit() {
    if !have_root("writes_stop_at_the_run_dirs_limit") {
        return;
    }
    let run = RunDir::new("fill");
    let mut h = Harness::start_with("sandbox-probe", &["--run-dir", &run.vmm(), "--vm-uid-range", "62170-62179"]);
    let (_, _, log) = start(&mut h, "w", b"fill", false, false);
    let exit = wait_for("the probe to fill its run dir", Duration::from_secs(60), || held(&mut h, "w").exit);
    let dir = run.0.join("vmm").join("w");
    let st = nix::sys::statvfs::statvfs(&dir).expect("statvfs of the run dir");
    assert_eq!(st.blocks() * st.fragment_size(), 160 << 20, "the run dir is its own 160 MiB tmpfs");
    assert_eq!(st.files(), 64, "with 64 inodes");
    let dev = |p: &Path| std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(p).expect("stat"));
    assert_ne!(dev(&dir.join("vmm.log")), dev(&run.0), "the log is not on the host's /run");
    let ExitStatus::Code(mib) = exit else { panic!("the probe must stop writing, not die: {exit:?}") };
    assert!((150..=160).contains(&mib), "the log stopped at {mib} MiB, not at the limit");
    let len = std::fs::metadata(dir.join("vmm.log")).expect("log").len();
    assert!(len <= 160 << 20, "{len}");
    let mut head = String::new();
    use std::io::Seek;
    let mut f = std::fs::File::from(log);
    f.seek(std::io::SeekFrom::Start(0)).expect("seek");
    f.take(4096).read_to_string(&mut head).ok();
    let sockets = head.lines().find_map(|l| l.strip_prefix("SOCKETS ")).expect("the socket count");
    let (n, why) = sockets.split_once(' ').expect("count and outcome");
    assert!(why.starts_with("denied:ENOSPC"), "{sockets}");
    // 64 inodes: the root, vmm.log, events.json, sandbox.txt and api.sock are the broker's.
    assert!(n.parse::<u32>().expect("count") <= 59, "{sockets}");
    assert_eq!(h.call(Request::Release { vm: "w".into() }).0, Reply::Released);
    assert!(!dir.exists(), "the run dir outlived Release");
}

/// Real cloud-hypervisor with a disk, a tap and vsock, under `--vmm-seccomp log`: it must
/// reach Running without one syscall or ioctl the filters would refuse (each would be in
/// the kernel log as a seccomp record of its pid).
#[test]
fn real_cloud_hypervisor_needs_nothing_unlisted() {
    let Some(ch) = std::env::var_os("MYHV_CLOUD_HYPERVISOR") else {
        eprintln!(
            "SKIP real_cloud_hypervisor_needs_nothing_unlisted: set MYHV_CLOUD_HYPERVISOR=/path/to/cloud-hypervisor"
        );
        return;
    };
    if !have_root("real_cloud_hypervisor_needs_nothing_unlisted") {
        return;
    }
    let run = RunDir::new("realchlog");
    let args = ["--run-dir", &run.vmm(), "--vm-uid-range", "62160-62169", "--vmm-seccomp", "log"];
    let mut h = Harness::start_with(&ch.to_string_lossy(), &args);
    let kernel = h.images().join("k.elf");
    std::fs::write(&kernel, pvh::guest("my_hypervisor seccomp check guest", false)).expect("kernel");
    let disk = h.images().join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    std::fs::set_permissions(&disk, PermissionsExt::from_mode(0o600)).expect("chmod");
    let images = vec![image(&kernel, ImageRole::Kernel), image(&disk, ImageRole::Disk { readonly: false })];
    let (reply, _) = h.call(Request::Prepare { vm: "n".into(), images });
    assert!(matches!(reply, Reply::Prepared { .. }), "{reply:?}");
    let (reply, _) = h.call(Request::CreateTap { vm: "n".into(), mac: None, mtu: Some(1400), bridge: None });
    assert!(matches!(reply, Reply::Tap { .. }), "{reply:?}");
    let config = VmmConfig { vcpus: 1, memory_mib: 64, cmdline: None, vsock: true };
    let mut kmsg = Kmsg::open_at_end().expect("/dev/kmsg, where the kernel logs seccomp records");
    // Without an audit daemon the records go through printk, whose rate limit (10 per 5 s by
    // default) drops what comes after a burst, such as forbidden_syscalls_kill_the_vmm's:
    // start from a quiet window.
    std::thread::sleep(Duration::from_secs(6));
    let (reply, fds) = h.call(Request::Spawn { vm: "n".into(), config });
    let Reply::Spawned { pid } = reply else { panic!("{reply:?}") };
    let log = fds.into_iter().nth(1).expect("log fd");
    wait_for("vm.info to say Running", Duration::from_secs(20), || {
        let (reply, fds) = h.call(Request::Connect { vm: "n".into(), role: SocketRole::Api });
        if reply != Reply::Connected {
            return None;
        }
        let (status, body) = http(fds.into_iter().next()?, "GET", "/api/v1/vm.info");
        let info: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200 && info["state"] == "Running").then_some(())
    });
    for role in [SocketRole::Serial, SocketRole::Vsock] {
        assert_eq!(h.call(Request::Connect { vm: "n".into(), role }).0, Reply::Connected, "{role:?}");
    }
    assert_eq!(kmsg.seccomp_records(pid), Vec::<String>::new(), "{}", read_log(&log));
    assert_eq!(h.call(Request::Release { vm: "n".into() }).0, Reply::Released);
}
