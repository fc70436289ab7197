//! A broker test harness: the real daemon, with a stand-in frontend that hands the test its
//! broker channel, so that the test speaks the typed protocol directly.

use std::io::{BufRead, BufReader, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use my_hypervisor_broker_proto::{Envelope, Event, FromBroker, PROTOCOL_VERSION, Reply, Request, recv, send};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use crate::{Daemon, scratch_root, staged_bin};

/// The raw `system.posix_acl_access` bytes of `p`, or None if it has no ACL (read directly,
/// so that the tests need no getfacl); `my_hypervisor_policy::acl::decode` reads them.
pub fn acl_bytes(p: &std::path::Path) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    let mut buf = vec![0u8; 65536];
    let name = my_hypervisor_policy::acl::XATTR;
    // SAFETY: a NUL-terminated path and name, and a buffer valid for its length.
    let n = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ENODATA), "getxattr {}: {e}", p.display());
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// Sets `p`'s ACL to exactly these bytes.
pub fn set_acl_bytes(p: &std::path::Path, bytes: &[u8]) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    let name = my_hypervisor_policy::acl::XATTR;
    // SAFETY: a NUL-terminated path and name, and a buffer valid for its length.
    let r = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), bytes.as_ptr().cast(), bytes.len(), 0) };
    assert_eq!(r, 0, "setxattr {}: {}", p.display(), std::io::Error::last_os_error());
}

/// A test bridge made with SIOCBRADDBR (no `ip` needed), deleted with SIOCBRDELBR when the
/// test ends however it ends.
pub struct Bridge(pub String);

fn bridge_ioctl(req: libc::c_ulong, name: &str) -> std::io::Result<()> {
    let c = std::ffi::CString::new(name).expect("bridge name");
    // SAFETY: socket() with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCBRADDBR and SIOCBRDELBR take a NUL-terminated interface name.
    let r = unsafe { libc::ioctl(fd, req as _, c.as_ptr()) };
    let e = std::io::Error::last_os_error();
    // SAFETY: we own fd.
    unsafe { libc::close(fd) };
    if r < 0 { Err(e) } else { Ok(()) }
}

impl Bridge {
    pub fn create(name: &str) -> Bridge {
        bridge_ioctl(0x89a0, name).unwrap_or_else(|e| panic!("SIOCBRADDBR {name}: {e}"));
        Bridge(name.to_string())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = bridge_ioctl(0x89a1, &self.0);
    }
}

pub struct Harness {
    pub d: Daemon,
    pub chan: OwnedFd,
    probe: BufReader<UnixStream>,
    next_id: u64,
    pub events: Vec<Event>,
}

impl Harness {
    /// Starts the daemon with `vmm` as its cloud-hypervisor and `extra` flags.
    pub fn start_with(vmm: &str, extra: &[&str]) -> Harness {
        let root = scratch_root();
        std::fs::create_dir(root.path().join("images")).expect("images");
        let probe = staged_bin(root.path(), "probe-frontend");
        let vmm = if vmm.starts_with('/') { PathBuf::from(vmm) } else { staged_bin(root.path(), vmm) };
        let mut args = vec!["--frontend-bin", probe.to_str().unwrap(), "--cloud-hypervisor", vmm.to_str().unwrap()];
        args.extend(extra);
        let d = Daemon::start_in(root, &args);
        let (probe, chan) = accept_channel(&d.rpc_socket());
        Harness { d, chan, probe, next_id: 1, events: vec![] }
    }

    pub fn images(&self) -> PathBuf {
        self.d.path("images")
    }

    /// The next frontend's channel, after the broker dropped the last one.
    pub fn reconnect(&mut self) {
        let (probe, chan) = accept_channel(&self.d.rpc_socket());
        self.probe = probe;
        self.chan = chan;
    }

    /// Sends one command to the stand-in frontend (tests/src/bin/probe-frontend.rs) and
    /// returns its one-line answer.
    pub fn probe(&mut self, command: &str) -> String {
        writeln!(self.probe.get_mut(), "{command}").expect("send a probe command");
        let mut answer = String::new();
        self.probe.read_line(&mut answer).expect("the probe's answer");
        answer.trim_end().to_string()
    }

    pub fn call(&mut self, req: Request) -> (Reply, Vec<OwnedFd>) {
        let id = self.next_id;
        self.next_id += 1;
        send(&self.chan, Envelope { version: PROTOCOL_VERSION, id, fds: 0, body: req }, &[]).expect("send");
        loop {
            let (env, fds) = recv::<FromBroker>(&self.chan).expect("reply");
            match env.body {
                FromBroker::Event(e) => self.events.push(e),
                FromBroker::Reply(r) => {
                    assert_eq!(env.id, id, "reply to our request");
                    assert_eq!(usize::from(r.fd_count()), fds.len(), "{r:?}");
                    return (r, fds);
                }
            }
        }
    }

    /// Asserts a refusal whose reason contains `why`, and that the audit log recorded it.
    pub fn refused(&mut self, req: Request, why: &str) {
        let (reply, _) = self.call(req.clone());
        let Reply::Refused { reason } = reply else { panic!("{req:?} must be refused, got {reply:?}") };
        assert!(reason.contains(why), "{req:?}: reason {reason:?} should mention {why:?}");
        let log = self.d.log();
        let audited = log.lines().any(|l| l.contains("verdict=\"refuse\"") && l.contains(&reason.replace('"', "\\\"")));
        let audited = audited || log.lines().any(|l| l.contains("verdict=\"refuse\"") && l.contains(why));
        assert!(
            audited,
            "refusal of {req:?} is not in the audit log:\n{}",
            log.lines().rev().take(3).collect::<Vec<_>>().join("\n")
        );
    }
}

impl Drop for Harness {
    /// Releases whatever a failed test left behind, so no VMM or tap outlives it.
    fn drop(&mut self) {
        let id = self.next_id;
        let env = Envelope { version: PROTOCOL_VERSION, id, fds: 0, body: Request::Inventory };
        if send(&self.chan, env, &[]).is_err() {
            return;
        }
        if let Ok((Envelope { body: FromBroker::Reply(Reply::Inventory { vms }), .. }, _)) = recv(&self.chan) {
            for v in vms {
                let env = Envelope { version: PROTOCOL_VERSION, id: 0, fds: 0, body: Request::Release { vm: v.vm } };
                let _ = send(&self.chan, env, &[]).and_then(|()| recv::<FromBroker>(&self.chan));
            }
        }
    }
}

/// Connects to the RPC socket, where the stand-in frontend hands each client its broker
/// channel: the only way out of its sandbox is through the fds it was given.
fn accept_channel(rpc_socket: &Path) -> (BufReader<UnixStream>, OwnedFd) {
    let s = UnixStream::connect(rpc_socket).expect("connect to the stand-in frontend");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    // Wait for the message first, retrying a wait a signal cut short, so that the receive
    // itself cannot be interrupted.
    let mut ready = [nix::poll::PollFd::new(s.as_fd(), nix::poll::PollFlags::POLLIN)];
    loop {
        match nix::poll::poll(&mut ready, nix::poll::PollTimeout::from(20_000u16)) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(0) => panic!("the stand-in frontend sent no channel within 20 s"),
            r => {
                r.expect("poll the stand-in");
                break;
            }
        }
    }
    let mut buf = [0u8; 2];
    let mut space = nix::cmsg_space!([i32; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).expect("recvmsg");
    let fd = msg
        .cmsgs()
        .expect("cmsgs")
        .find_map(|c| match c {
            ControlMessageOwned::ScmRights(v) => v.first().copied(),
            _ => None,
        })
        .expect("an fd");
    // SAFETY: the kernel just installed this fd for us.
    (BufReader::new(s), unsafe { OwnedFd::from_raw_fd(fd) })
}
