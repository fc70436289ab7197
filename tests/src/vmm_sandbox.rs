//! Helpers for the VMM sandbox tests (`tests/sandbox.rs`, `tests/vmm_walls.rs`): a probe VM
//! started through the real broker, its log, the processes of a uid, and the kernel log.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use my_hypervisor_broker_proto::{HeldVm, Image, ImageRole, Reply, Request, VmmConfig};

use crate::harness::Harness;
use crate::proc_status;

/// A directory under /run for the test's runtime dir (where the default lies), removed at
/// the end.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new(tag: &str) -> RunDir {
        RunDir(PathBuf::from(format!("/run/myhv-test-{tag}-{}", std::process::id())))
    }
    pub fn vmm(&self) -> String {
        self.0.join("vmm").to_string_lossy().into_owned()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn image(path: &Path, role: ImageRole) -> Image {
    Image { path: path.to_string_lossy().into_owned(), role }
}

pub fn config() -> VmmConfig {
    VmmConfig { vcpus: 1, memory_mib: 64, cmdline: None, vsock: false }
}

/// Prepares `vm` with `kernel` holding `content` (and a writable disk, and a tap), spawns it,
/// and returns its uid, pid and log fd.
pub fn start(h: &mut Harness, vm: &str, content: &[u8], disk: bool, tap: bool) -> (u32, u32, OwnedFd) {
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
pub fn read_log(log: &OwnedFd) -> String {
    let mut f = std::fs::File::from(log.try_clone().expect("dup"));
    let mut s = String::new();
    use std::io::Seek;
    let _ = f.seek(std::io::SeekFrom::Start(0));
    let _ = f.read_to_string(&mut s);
    s
}

pub fn held(h: &mut Harness, vm: &str) -> HeldVm {
    let (reply, _) = h.call(Request::Inventory);
    let Reply::Inventory { vms } = reply else { panic!("{reply:?}") };
    vms.into_iter().find(|v| v.vm == vm).expect("held VM")
}

/// Every pid whose real, effective, saved or filesystem uid is `uid`.
pub fn pids_of_uid(uid: u32) -> Vec<i32> {
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

/// The kernel log from the moment it is opened: seccomp records (audit type 1326) land there
/// when no audit daemon takes them.
pub struct Kmsg(std::fs::File);

impl Kmsg {
    /// None where /dev/kmsg cannot be read (some containers).
    pub fn open_at_end() -> Option<Kmsg> {
        use std::io::Seek;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok()?;
        f.seek(std::io::SeekFrom::End(0)).ok()?;
        Some(Kmsg(f))
    }

    /// The seccomp records of `pid` logged since the last call (or the open).
    pub fn seccomp_records(&mut self, pid: u32) -> Vec<String> {
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
