//! The root broker through the real daemon: a stand-in frontend hands the test its broker
//! channel, and the test speaks the typed protocol on it directly.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use my_hypervisor_broker_proto::{
    Envelope, Event, FromBroker, Image, ImageRole, PROTOCOL_VERSION, Reply, Request, SocketRole, VmmConfig, VmmSignal,
    encode, recv,
};
use my_hypervisor_tests::harness::Harness;
use my_hypervisor_tests::{have_root, proc_status, wait_for};
use nix::sys::socket::MsgFlags;

const VM_UID: u32 = 61001;

fn write_file(p: &Path, mode: u32) {
    std::fs::write(p, b"image").expect("write");
    std::fs::set_permissions(p, PermissionsExt::from_mode(mode)).expect("chmod");
}

fn img(path: &Path, role: ImageRole) -> Image {
    Image { path: path.to_str().unwrap().to_string(), role }
}

fn getfacl(p: &Path) -> String {
    let out = Command::new("getfacl").arg("-cn").arg(p).output().expect("getfacl (apt package acl)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip (apt package iproute2)");
    assert!(st.success(), "ip {args:?}");
}

#[test]
fn requests_refusals_and_release() {
    if !have_root("requests_refusals_and_release") {
        return;
    }
    let mut h = Harness::start_with("stub-vmm", &["--allowed-bridge", &bridge_name()]);
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
    h.refused(prep("a", vec![img(&images.join("link.raw"), ImageRole::Kernel)]), "open beneath");
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
    assert!(getfacl(&kernel).contains(&format!("user:{VM_UID}:r--")), "{}", getfacl(&kernel));
    assert!(!getfacl(&ro).contains("user:6"), "a world-readable image needs no ACL");

    h.refused(prep("b", vec![k.clone(), img(&disk, ImageRole::Disk { readonly: true })]), "already granted to VM a");
    h.refused(Request::Signal { vm: "a".into(), signal: VmmSignal::Term }, "never spawned");
    h.refused(Request::Connect { vm: "a".into(), role: SocketRole::Serial }, "never spawned");

    // A real tap, with its MTU, on a test bridge.
    let bridge = bridge_name();
    h.refused(
        Request::CreateTap { vm: "a".into(), mac: None, mtu: None, bridge: Some("docker0".into()) },
        "not one the daemon allows",
    );
    ip(&["link", "add", "name", &bridge, "type", "bridge"]);
    let _bridge = Bridge(bridge.clone());
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
    assert_eq!(st["Uid"].split_whitespace().next(), Some("61001"));
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
    assert!(!getfacl(&kernel).contains("user:6"), "ACL entry removed: {}", getfacl(&kernel));
    assert_eq!(std::fs::metadata(&kernel).unwrap().mode() & 0o7777, 0o600, "mode restored");
    assert_eq!(h.call(Request::Release { vm: "a".into() }).0, Reply::Released, "release is idempotent");
    assert_eq!(h.call(Request::Inventory).0, Reply::Inventory { vms: vec![] });
    // The journal holds nothing for a released VM (postcard: an empty list is one zero byte).
    assert_eq!(std::fs::read(h.d.path("run/vmm/broker.journal")).unwrap(), vec![0]);
}

/// A test bridge, deleted when the test ends however it ends.
struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
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
    let mut h = Harness::start_with("stub-vmm", &[]);
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
}
