//! The VMM sandbox, end to end: a probe started through the real spawn path and launcher,
//! under a VM's policy, tries to escape; the `--explain` report against its golden file; and,
//! with `MYHV_CLOUD_HYPERVISOR` set, a real cloud-hypervisor booting a tiny PVH guest.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use my_hypervisor_broker_proto::{ExitStatus, HeldVm, Image, ImageRole, Reply, Request, SocketRole, VmmConfig};
use my_hypervisor_tests::harness::Harness;
use my_hypervisor_tests::{have_root, proc_status, pvh, staged_bin, wait_for};

/// A directory under /run for the test's runtime dir, so the VMM's bind-mount of its own dir
/// (/run is covered in its namespace) is exercised; removed at the end.
struct RunDir(PathBuf);

impl RunDir {
    fn new(tag: &str) -> RunDir {
        RunDir(PathBuf::from(format!("/run/myhv-test-{tag}-{}", std::process::id())))
    }
    fn vmm(&self) -> String {
        self.0.join("vmm").to_string_lossy().into_owned()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn image(path: &Path, role: ImageRole) -> Image {
    Image { path: path.to_string_lossy().into_owned(), role }
}

fn config() -> VmmConfig {
    VmmConfig { vcpus: 1, memory_mib: 64, cmdline: None, vsock: false }
}

/// Prepares `vm` with `kernel` holding `content` (and a writable disk, and a tap), spawns it,
/// and returns its uid, pid and log fd.
fn start(h: &mut Harness, vm: &str, content: &[u8], disk: bool, tap: bool) -> (u32, u32, OwnedFd) {
    let kernel = h.images().join(format!("{vm}.kernel"));
    std::fs::write(&kernel, content).expect("kernel");
    let mut images = vec![image(&kernel, ImageRole::Kernel)];
    if disk {
        let d = h.images().join(format!("{vm}.disk"));
        std::fs::write(&d, b"").expect("disk");
        std::fs::set_permissions(&d, PermissionsExt::from_mode(0o600)).expect("chmod");
        images.push(image(&d, ImageRole::Disk { readonly: false }));
    }
    let (reply, _) = h.call(Request::Prepare { vm: vm.into(), images });
    let Reply::Prepared { uid, .. } = reply else { panic!("prepare {vm}: {reply:?}") };
    if tap {
        let (reply, _) = h.call(Request::CreateTap { vm: vm.into(), mac: None, mtu: None, bridge: None });
        assert!(matches!(reply, Reply::Tap { .. }), "create tap for {vm}: {reply:?}");
    }
    let (reply, fds) = h.call(Request::Spawn { vm: vm.into(), config: config() });
    let Reply::Spawned { pid, .. } = reply else { panic!("spawn {vm}: {reply:?}") };
    let log = fds.into_iter().nth(1).expect("log fd");
    (uid, pid, log)
}

/// The log so far, read through the broker's read-only fd.
fn read_log(log: &OwnedFd) -> String {
    let mut f = std::fs::File::from(log.try_clone().expect("dup"));
    let mut s = String::new();
    use std::io::Seek;
    let _ = f.seek(std::io::SeekFrom::Start(0));
    let _ = f.read_to_string(&mut s);
    s
}

fn held(h: &mut Harness, vm: &str) -> HeldVm {
    let (reply, _) = h.call(Request::Inventory);
    let Reply::Inventory { vms } = reply else { panic!("{reply:?}") };
    vms.into_iter().find(|v| v.vm == vm).expect("held VM")
}

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

/// Every pid whose real, effective, saved or filesystem uid is `uid`.
fn pids_of_uid(uid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if proc_status(pid)
            .is_some_and(|s| s.get("Uid").is_some_and(|u| u.split_whitespace().any(|x| x == uid.to_string())))
        {
            out.push(pid);
        }
    }
    out
}

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
    let mut kmsg = Kmsg::open_at_end();
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

    // The fork was let through and logged: the kernel log check above is not blind.
    match kmsg.as_mut().map(|k| k.seccomp_records(pid)) {
        Some(records) => {
            assert!(records.iter().any(|r| r.contains(&format!("syscall={}", libc::SYS_clone))), "{records:?}")
        }
        None => eprintln!("a_forked_child_ends_with_its_vm: /dev/kmsg is not readable; the log record is not checked"),
    }
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

/// A minimal HTTP/1.1 exchange on a connected api socket: (status, body).
pub fn http(sock: OwnedFd, method: &str, path: &str) -> (u16, String) {
    let mut s = UnixStream::from(sock);
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Length: 0\r\n\r\n")
        .expect("request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).expect("response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return (status, body[..len].to_string());
            }
        }
        assert!(n > 0, "connection closed mid-response: {text}");
    }
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

/// The kernel log from the moment it is opened: seccomp records (audit type 1326) land there
/// when no audit daemon takes them.
struct Kmsg(std::fs::File);

impl Kmsg {
    /// None where /dev/kmsg cannot be read (some containers).
    fn open_at_end() -> Option<Kmsg> {
        use std::io::Seek;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok()?;
        f.seek(std::io::SeekFrom::End(0)).ok()?;
        Some(Kmsg(f))
    }

    /// The seccomp records of `pid` logged since the last call (or the open).
    fn seccomp_records(&mut self, pid: u32) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if rec.contains("type=1326") && rec.contains(&format!(" pid={pid} ")) {
                        out.push(rec.trim_end().to_string());
                    }
                }
                // EPIPE: records were overwritten while reading; go on with the next.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }
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
