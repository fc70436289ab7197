//! The root broker through the real daemon: a stand-in frontend hands the test its broker
//! channel, and the test speaks the typed protocol on it directly.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use my_hypervisor_broker_proto::{
    Envelope, Event, ExitStatus, FromBroker, HeldVm, Image, ImageRole, PROTOCOL_VERSION, Reply, Request, SocketRole,
    VmmConfig, VmmSignal, encode, recv,
};
use my_hypervisor_policy::acl::{GROUP, GROUP_OBJ, MASK, NO_ID, OTHER, READ, USER, USER_OBJ, decode};
use my_hypervisor_tests::harness::{Bridge, Harness, acl_bytes, set_acl_bytes};
use my_hypervisor_tests::{Daemon, have_root, proc_status, scratch_root, wait_for};
use nix::sys::socket::MsgFlags;

/// Each test of this file hands out uids from its own part of 62000-62099.
const VM_UID: u32 = 62001;

fn write_file(p: &Path, mode: u32) {
    std::fs::write(p, b"image").expect("write");
    std::fs::set_permissions(p, PermissionsExt::from_mode(mode)).expect("chmod");
}

fn img(path: &Path, role: ImageRole) -> Image {
    Image { path: path.to_str().unwrap().to_string(), role }
}

/// The named user entries of `p`'s ACL.
fn acl_users(p: &Path) -> Vec<(u16, u32)> {
    acl_bytes(p)
        .map(|b| decode(&b))
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.0 == USER)
        .map(|e| (e.1, e.2))
        .collect()
}

#[test]
fn requests_refusals_and_release() {
    if !have_root("requests_refusals_and_release") {
        return;
    }
    let mut h = Harness::start_with("stub-vmm", &["--allowed-bridge", &bridge_name(), "--vm-uid-range", "62001-62009"]);
    let images = h.images();

    let (reply, _) = h.call(Request::KvmCheck);
    let Reply::Kvm { api_version, extensions } = reply else { panic!("{reply:?}") };
    assert_eq!(api_version, 12);
    assert!(extensions.iter().any(|(n, ok)| n == "KVM_CAP_USER_MEMORY" && *ok), "{extensions:?}");

    let kernel = images.join("vmlinux");
    write_file(&kernel, 0o600); // not world-readable: granted by ACL
    let disk = images.join("disk.raw");
    write_file(&disk, 0o600);
    let ro = images.join("ro.raw");
    write_file(&ro, 0o644);
    let outside = h.d.path("outside.raw");
    write_file(&outside, 0o644);
    std::os::unix::fs::symlink(&outside, images.join("link.raw")).expect("symlink");
    std::fs::create_dir(images.join("sub")).expect("mkdir");
    std::os::unix::fs::symlink("/etc", images.join("sub/etc")).expect("symlink");

    let prep = |vm: &str, imgs: Vec<Image>| Request::Prepare { vm: vm.into(), images: imgs };
    let k = img(&kernel, ImageRole::Kernel);
    h.refused(prep("Bad_Id", vec![k.clone()]), "vm id");
    h.refused(
        prep("a", vec![Image { path: format!("{}/../outside.raw", images.display()), role: ImageRole::Kernel }]),
        "'..'",
    );
    h.refused(prep("a", vec![img(&outside, ImageRole::Kernel)]), "not under any image root");
    h.refused(prep("a", vec![img(&images.join("link.raw"), ImageRole::Kernel)]), "not a regular file");
    h.refused(prep("a", vec![img(&images.join("sub/etc/shadow"), ImageRole::Kernel)]), "open beneath");
    h.refused(prep("a", vec![img(&images.join("a,b"), ImageRole::Kernel)]), "','");
    h.refused(prep("a", vec![img(&images.join("a=b"), ImageRole::Kernel)]), "'='");
    h.refused(Request::Spawn { vm: "never".into(), config: config() }, "never prepared");
    assert!(!h.d.path("run/vmm/a").exists(), "a refused prepare leaves no runtime dir");

    let (reply, _) = h.call(prep(
        "a",
        vec![k.clone(), img(&disk, ImageRole::Disk { readonly: false }), img(&ro, ImageRole::Disk { readonly: true })],
    ));
    assert_eq!(reply, Reply::Prepared { uid: VM_UID, run_dir: h.d.path("run/vmm/a").to_string_lossy().into() });
    let dir = std::fs::metadata(h.d.path("run/vmm/a")).expect("run dir");
    assert_eq!((dir.uid(), dir.gid(), dir.mode() & 0o7777), (VM_UID, VM_UID, 0o700));
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), VM_UID, "writable disk handed to the VM uid");
    assert_eq!(acl_users(&kernel), vec![(READ, VM_UID)], "read granted by ACL");
    assert_eq!(acl_bytes(&ro), None, "a world-readable image needs no ACL");

    h.refused(prep("b", vec![k.clone(), img(&disk, ImageRole::Disk { readonly: true })]), "already granted to VM a");
    assert_eq!(acl_users(&kernel), vec![(READ, VM_UID)], "the refused Prepare undid its kernel grant");
    assert!(!h.d.path("run/vmm/b").exists(), "and removed its run dir");
    h.refused(Request::Signal { vm: "a".into(), signal: VmmSignal::Term }, "never spawned");
    h.refused(Request::Connect { vm: "a".into(), role: SocketRole::Serial }, "never spawned");

    // A real tap, with its MTU, on a test bridge.
    let bridge = bridge_name();
    h.refused(
        Request::CreateTap { vm: "a".into(), mac: None, mtu: None, bridge: Some("docker0".into()) },
        "not one the daemon allows",
    );
    let _bridge = Bridge::create(&bridge);
    let (reply, _) = h.call(Request::CreateTap {
        vm: "a".into(),
        mac: Some("52:54:00:00:00:01".into()),
        mtu: Some(1400),
        bridge: Some(bridge.clone()),
    });
    let Reply::Tap { name } = reply else { panic!("{reply:?}") };
    let sys = PathBuf::from("/sys/class/net").join(&name);
    assert_eq!(std::fs::read_to_string(sys.join("mtu")).unwrap().trim(), "1400");
    assert_eq!(std::fs::read_link(sys.join("master")).unwrap().file_name().unwrap().to_str(), Some(bridge.as_str()));
    assert_eq!(std::fs::read_to_string(sys.join("tun_flags")).unwrap().trim(), "0x5002", "tap, no_pi, vnet_hdr");

    let (reply, fds) = h.call(Request::Spawn { vm: "a".into(), config: config() });
    let Reply::Spawned { pid } = reply else { panic!("{reply:?}") };
    let report = std::fs::read_to_string(h.d.path("run/vmm/a/sandbox.txt")).expect("the stored sandbox report");
    assert!(report.starts_with("sandbox of VM a\n"), "{report}");
    assert_eq!(fds.len(), 2, "event-monitor file and log, read-only");
    let st = proc_status(pid as i32).expect("VMM status");
    assert_eq!(st["Uid"].split_whitespace().next(), Some(VM_UID.to_string().as_str()));
    assert_eq!(st["CapEff"], "0000000000000000");
    assert_eq!(st["NoNewPrivs"], "1");
    h.refused(Request::Spawn { vm: "a".into(), config: config() }, "already spawned");

    let serial = h.d.path("run/vmm/a/serial.sock");
    wait_for("the VMM's serial socket", Duration::from_secs(10), || serial.exists().then_some(()));
    let (reply, fds) = h.call(Request::Connect { vm: "a".into(), role: SocketRole::Serial });
    assert_eq!((reply, fds.len()), (Reply::Connected, 1));
    let (reply, fds) = h.call(Request::Connect { vm: "a".into(), role: SocketRole::Api });
    assert_eq!((reply, fds.len()), (Reply::Connected, 1));
    // A VMM that plants a symlink to a host socket gains nothing.
    std::os::unix::fs::symlink(h.d.rpc_socket(), h.d.path("run/vmm/a/vsock.sock")).expect("plant");
    h.refused(Request::Connect { vm: "a".into(), role: SocketRole::Vsock }, "not a socket owned by the VM uid");

    let (reply, _) = h.call(Request::Signal { vm: "a".into(), signal: VmmSignal::Term });
    assert_eq!(reply, Reply::Signalled);
    wait_for("the VMM exit event", Duration::from_secs(10), || {
        let (reply, _) = h.call(Request::Inventory);
        let Reply::Inventory { vms } = reply else {
            return None;
        };
        (!vms[0].alive).then_some(())
    });
    assert!(
        h.events.iter().any(|e| matches!(e, Event::VmmExited { vm, pid: p, .. } if vm == "a" && *p == pid)),
        "{:?}",
        h.events
    );
    h.refused(Request::Signal { vm: "a".into(), signal: VmmSignal::Kill }, "has exited");

    let (reply, _) = h.call(Request::Release { vm: "a".into() });
    assert_eq!(reply, Reply::Released);
    assert!(!sys.exists(), "tap {name} is gone after release");
    assert!(!h.d.path("run/vmm/a").exists(), "runtime dir removed");
    let m = std::fs::metadata(&disk).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o600), "disk ownership restored");
    assert_eq!(acl_bytes(&kernel), None, "the ACL the grant added is gone");
    assert_eq!(std::fs::metadata(&kernel).unwrap().mode() & 0o7777, 0o600, "mode restored");
    assert_eq!(h.call(Request::Release { vm: "a".into() }).0, Reply::Released, "release is idempotent");
    assert_eq!(h.call(Request::Inventory).0, Reply::Inventory { vms: vec![] });
    // The journal holds nothing for a released VM (postcard: an empty list is one zero byte).
    assert_eq!(std::fs::read(h.d.path("run/vmm/broker.journal")).unwrap(), vec![0]);
}

/// The test bridge the daemon of `requests_refusals_and_release` allows.
fn bridge_name() -> String {
    format!("mhtb{}", std::process::id() % 100_000)
}

fn config() -> VmmConfig {
    VmmConfig { vcpus: 1, memory_mib: 64, cmdline: Some("console=ttyS0".into()), vsock: false }
}

#[test]
fn malformed_messages_drop_the_channel() {
    if !have_root("malformed_messages_drop_the_channel") {
        return;
    }
    // Without SO_PASSRIGHTS, so that the stray fd reaches the broker and is seen there.
    let mut h = Harness::start_with("stub-vmm", &["--vm-uid-range", "62090-62099", "--no-passrights"]);
    let good = encode(&Envelope { version: PROTOCOL_VERSION, id: 1, fds: 0, body: Request::Inventory }).unwrap();
    let mut trailing = good.clone();
    trailing.push(0);
    let mut unknown = good.clone();
    *unknown.last_mut().unwrap() = 77;
    let file = std::fs::File::open("/dev/null").unwrap();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("oversized", vec![1u8; my_hypervisor_broker_proto::MAX_MESSAGE + 1], false),
        ("truncated", good[..good.len() - 1].to_vec(), false),
        ("trailing bytes", trailing, false),
        ("unknown variant", unknown, false),
        ("stray fd", good.clone(), true),
    ];
    for (n, (what, bytes, with_fd)) in cases.into_iter().enumerate() {
        let fds = [file.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let cmsgs: &[nix::sys::socket::ControlMessage] = if with_fd { &cmsg } else { &[] };
        nix::sys::socket::sendmsg::<()>(
            h.chan.as_raw_fd(),
            &[std::io::IoSlice::new(&bytes)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .expect("send");
        let r = recv::<FromBroker>(&h.chan);
        assert!(r.is_err(), "{what}: the broker must drop the channel, got {r:?}");
        wait_for("the drop in the audit log", Duration::from_secs(5), || {
            (h.d.log().matches("verdict=\"drop-channel\"").count() > n).then_some(())
        });
        h.reconnect();
        assert!(matches!(h.call(Request::Inventory).0, Reply::Inventory { .. }), "{what}: a new frontend is served");
    }
}

#[test]
fn broker_is_confined() {
    if !have_root("broker_is_confined") {
        return;
    }
    let h = Harness::start_with("stub-vmm", &[]);
    let st = proc_status(h.d.pid()).expect("broker status");
    // CAP_CHOWN 0, CAP_DAC_OVERRIDE 1, CAP_FOWNER 3, CAP_KILL 5, CAP_NET_ADMIN 12.
    let documented = (1u64 << 0) | (1 << 1) | (1 << 3) | (1 << 5) | (1 << 12);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(u64::from_str_radix(&st[set], 16).unwrap(), documented, "{set}");
    }
    assert_eq!(st["CapInh"], "0000000000000000");
    assert_eq!(st["CapAmb"], "0000000000000000");
    assert_eq!(st["Seccomp"], "2", "the broker serves under its seccomp filter");
    assert_eq!(st["NoNewPrivs"], "1");

    // The spawn helper holds every fd at 64 or above; the numbers a keep-list moves fds to
    // hold only placeholders on /dev/null.
    let exe = std::fs::read_link(format!("/proc/{}/exe", h.d.pid())).unwrap();
    let helper = my_hypervisor_tests::children(h.d.pid())
        .into_iter()
        .find(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == exe))
        .expect("the spawn helper");
    let mut held = vec![];
    for entry in std::fs::read_dir(format!("/proc/{helper}/fd")).unwrap() {
        let entry = entry.unwrap();
        let n: i32 = entry.file_name().to_str().unwrap().parse().unwrap();
        let target = std::fs::read_link(entry.path()).unwrap();
        if (3..64).contains(&n) {
            assert_eq!(target, Path::new("/dev/null"), "fd {n} of the spawn helper");
        } else if n >= 64 {
            held.push(target.to_string_lossy().into_owned());
        }
    }
    assert!(held.iter().any(|t| t.starts_with("socket:")), "its channel lies at 64 or above: {held:?}");
    assert!(held.iter().any(|t| t.ends_with("my_hypervisor-vmm-launcher")), "and the launcher's handle: {held:?}");
}

/// Two VMs share a read-only image granted by ACL, on a file whose ACL already has a mask
/// and named entries: the first release leaves the second VM's read; the last one puts the
/// exact original ACL bytes and mode back.
#[test]
fn shared_read_only_image_acl_is_restored_exactly() {
    if !have_root("shared_read_only_image_acl_is_restored_exactly") {
        return;
    }
    let mut h = Harness::start_with("stub-vmm", &["--vm-uid-range", "62010-62019"]);
    let kernel = h.images().join("shared-vmlinux");
    write_file(&kernel, 0o620);
    let original_acl = vec![
        (USER_OBJ, 6, NO_ID),
        (USER, 6, 34),
        (GROUP_OBJ, 2, NO_ID),
        (GROUP, 2, 50),
        (MASK, 2, NO_ID),
        (OTHER, 0, NO_ID),
    ];
    set_acl_bytes(&kernel, &my_hypervisor_policy::acl::encode(original_acl.clone()));
    let original = acl_bytes(&kernel).expect("the original ACL");
    let mode = std::fs::metadata(&kernel).unwrap().mode();
    let prep = |vm: &str| Request::Prepare { vm: vm.into(), images: vec![img(&kernel, ImageRole::Kernel)] };
    assert!(matches!(h.call(prep("sa")).0, Reply::Prepared { uid: 62010, .. }));
    assert!(matches!(h.call(prep("sb")).0, Reply::Prepared { uid: 62011, .. }));
    assert_eq!(acl_users(&kernel), vec![(6, 34), (READ, 62010), (READ, 62011)]);
    // The journal records what restores the file: its original ACL bytes (postcard keeps a
    // byte string as its length, then the bytes).
    let journal = std::fs::read(h.d.path("run/vmm/broker.journal")).unwrap();
    assert!(journal.windows(original.len()).any(|w| w == original.as_slice()), "the journal holds the original ACL");

    assert_eq!(h.call(Request::Release { vm: "sa".into() }).0, Reply::Released);
    assert_eq!(acl_users(&kernel), vec![(6, 34), (READ, 62011)], "the second VM keeps its entry");
    let left = decode(&acl_bytes(&kernel).unwrap());
    assert!(left.contains(&(MASK, 2 | READ, NO_ID)), "and the mask that lets it read: {left:?}");

    assert_eq!(h.call(Request::Release { vm: "sb".into() }).0, Reply::Released);
    assert_eq!(acl_bytes(&kernel), Some(original), "the exact original ACL bytes");
    assert_eq!(decode(&acl_bytes(&kernel).unwrap()), original_acl);
    assert_eq!(std::fs::metadata(&kernel).unwrap().mode(), mode, "the original mode");
}

/// Opening a FIFO would block Prepare: it is refused within 1 s, and the broker serves on.
/// A read-only image with a second link is refused as well.
#[test]
fn fifo_and_linked_images_are_refused() {
    if !have_root("fifo_and_linked_images_are_refused") {
        return;
    }
    let mut h = Harness::start_with("stub-vmm", &["--vm-uid-range", "62020-62029"]);
    let fifo = h.images().join("fifo-kernel");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
    let started = Instant::now();
    h.refused(Request::Prepare { vm: "f".into(), images: vec![img(&fifo, ImageRole::Kernel)] }, "not a regular file");
    assert!(started.elapsed() < Duration::from_secs(1), "refused in {:?}", started.elapsed());
    let linked = h.images().join("linked");
    write_file(&linked, 0o644);
    std::fs::hard_link(&linked, h.images().join("other-name")).expect("link");
    h.refused(
        Request::Prepare { vm: "f".into(), images: vec![img(&linked, ImageRole::Disk { readonly: true })] },
        "exactly one link",
    );
    assert_eq!(h.call(Request::Inventory).0, Reply::Inventory { vms: vec![] }, "the broker serves on");
}

/// A journal that cannot be written: every state-changing request but Release is refused,
/// a Spawn whose record cannot be written has its VMM killed, and refused or read-only
/// requests do not touch the journal.
#[test]
fn journal_failure_fails_closed() {
    if !have_root("journal_failure_fails_closed") {
        return;
    }
    let mut h = Harness::start_with("stub-vmm", &["--vm-uid-range", "62030-62039"]);
    let kernel = h.images().join("vmlinux");
    write_file(&kernel, 0o644);
    let k = || vec![img(&kernel, ImageRole::Kernel)];
    assert!(matches!(h.call(Request::Prepare { vm: "j".into(), images: k() }).0, Reply::Prepared { .. }));
    let journal = h.d.path("run/vmm/broker.journal");
    let before = std::fs::metadata(&journal).unwrap().ino();
    h.refused(Request::Prepare { vm: "j".into(), images: k() }, "already prepared");
    assert!(matches!(h.call(Request::Inventory).0, Reply::Inventory { .. }));
    assert_eq!(std::fs::metadata(&journal).unwrap().ino(), before, "refused and read-only requests leave it");

    // The journal's temp file is a directory: no write can succeed.
    let tmp = h.d.path("run/vmm/broker.journal.tmp");
    std::fs::create_dir(&tmp).expect("block the journal");
    h.refused(Request::Spawn { vm: "j".into(), config: config() }, "journal cannot be written");
    let Reply::Inventory { vms } = h.call(Request::Inventory).0 else { panic!("inventory") };
    assert!(
        matches!(&vms[..], [HeldVm { alive: false, pid: Some(_), exit: Some(ExitStatus::Signal(9)), .. }]),
        "the VMM whose spawn could not be recorded was killed: {vms:?}"
    );
    h.refused(Request::Prepare { vm: "k".into(), images: k() }, "journal cannot be written");
    assert!(!h.d.path("run/vmm/k").exists(), "nothing was prepared");
    assert!(matches!(h.call(Request::KvmCheck).0, Reply::Kvm { .. }), "read-only requests are served");
    assert_eq!(h.call(Request::Release { vm: "j".into() }).0, Reply::Released, "Release is always served");

    std::fs::remove_dir(&tmp).expect("unblock");
    assert!(matches!(h.call(Request::Prepare { vm: "k".into(), images: k() }).0, Reply::Prepared { .. }));
    assert_eq!(h.call(Request::Release { vm: "k".into() }).0, Reply::Released);
    assert_eq!(std::fs::read(&journal).unwrap(), vec![0]);
}

/// `--image-root /`, a system dir and a group-writable root stop the daemon at start.
#[test]
fn unsafe_image_roots_are_refused_at_start() {
    if !have_root("unsafe_image_roots_are_refused_at_start") {
        return;
    }
    let root = scratch_root();
    std::fs::create_dir(root.path().join("images")).expect("images");
    let gw = root.path().join("group-writable");
    std::fs::create_dir(&gw).expect("mkdir");
    std::fs::set_permissions(&gw, PermissionsExt::from_mode(0o775)).expect("chmod");
    let gw = gw.to_str().unwrap().to_string();
    for (flag, why) in [
        ("/", "is / or a system directory"),
        ("/etc", "is / or a system directory"),
        (gw.as_str(), "must be owned by root and writable by no group or other"),
    ] {
        let mut child = Daemon::command(root.path(), &["--image-root", flag, "--vm-uid-range", "62040-62049"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start daemon");
        let status = wait_for("the daemon to refuse", Duration::from_secs(10), || child.try_wait().ok().flatten());
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "--image-root {flag} must stop the daemon");
        assert!(err.contains(why), "--image-root {flag}: {err}");
    }
}

/// A TCP socket with SO_LINGER {on, 30 s} and a send queue the peer never reads: closing it
/// would block for 30 s. A frontend that sends it on a request must not freeze the broker.
fn lingering_socket() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let linger = libc::linger { l_onoff: 1, l_linger: 30 };
    // SAFETY: setsockopt reads a struct linger from a valid pointer of its size.
    let r = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER");
    client.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 65536];
    while std::io::Write::write(&mut &client, &chunk).is_ok() {}
    (client, server)
}

fn lingering_fd_does_not_freeze_the_broker(test: &str, extra: &[&str]) {
    if !have_root(test) {
        return;
    }
    let mut args = vec!["--vm-uid-range", "62050-62059"];
    args.extend(extra);
    let mut h = Harness::start_with("stub-vmm", &args);
    let fallback = !extra.is_empty();
    let mode = if fallback { "to a closer process" } else { "refuse fds (SO_PASSRIGHTS)" };
    assert!(h.d.log().contains(mode), "the broker runs with stray fds going {mode}:\n{}", h.d.log());
    let (client, server) = lingering_socket();
    let bytes = encode(&Envelope { version: PROTOCOL_VERSION, id: 1, fds: 1, body: Request::Inventory }).unwrap();
    let fds = [client.as_raw_fd()];
    let started = Instant::now();
    let sent = nix::sys::socket::sendmsg::<()>(
        h.chan.as_raw_fd(),
        &[std::io::IoSlice::new(&bytes)],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    );
    if fallback {
        sent.expect("without SO_PASSRIGHTS the fd reaches the broker");
        // Whichever copy is closed last lingers: the broker's must not be it, and this test's
        // own may be (if the closer was quicker), so it is closed off the test's thread.
        std::thread::spawn(move || drop(client));
        assert!(recv::<FromBroker>(&h.chan).is_err(), "the broker drops that frontend");
        h.reconnect();
    } else {
        assert_eq!(sent.err(), Some(nix::errno::Errno::EPERM), "the broker's end refuses fds");
    }
    assert!(matches!(h.call(Request::Inventory).0, Reply::Inventory { .. }));
    assert!(started.elapsed() < Duration::from_secs(2), "served again after {:?}", started.elapsed());
    // A later SIGTERM still shuts the daemon down cleanly.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(h.d.pid()), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_for("the daemon to exit", Duration::from_secs(5), || h.d.child.try_wait().ok().flatten());
    assert!(status.success(), "{status}:\n{}", h.d.log());
    // The peer goes first and resets the connection, so that no close of ours lingers.
    drop(server);
}

#[test]
fn lingering_fd_on_a_request_is_refused() {
    lingering_fd_does_not_freeze_the_broker("lingering_fd_on_a_request_is_refused", &[]);
}

#[test]
fn lingering_fd_goes_to_the_closer_without_passrights() {
    lingering_fd_does_not_freeze_the_broker("lingering_fd_goes_to_the_closer_without_passrights", &["--no-passrights"]);
}
