//! A broker test harness: the real daemon, with a stand-in frontend that hands the test its
//! broker channel, so that the test speaks the typed protocol directly.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use my_hypervisor_broker_proto::{Envelope, Event, FromBroker, PROTOCOL_VERSION, Reply, Request, recv, send};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use crate::{Daemon, scratch_root, staged_bin, wait_for};

pub struct Harness {
    pub d: Daemon,
    rendezvous: UnixListener,
    pub chan: OwnedFd,
    probe: UnixStream,
    next_id: u64,
    pub events: Vec<Event>,
}

impl Harness {
    /// Starts the daemon with `vmm` as its cloud-hypervisor and `extra` flags.
    pub fn start_with(vmm: &str, extra: &[&str]) -> Harness {
        let root = scratch_root();
        std::fs::create_dir(root.path().join("images")).expect("images");
        let rendezvous = UnixListener::bind(root.path().join("probe.sock")).expect("bind");
        std::fs::set_permissions(root.path().join("probe.sock"), PermissionsExt::from_mode(0o777)).expect("chmod");
        let probe = staged_bin(root.path(), "probe-frontend");
        let vmm = if vmm.starts_with('/') { PathBuf::from(vmm) } else { staged_bin(root.path(), vmm) };
        let mut args = vec!["--frontend-bin", probe.to_str().unwrap(), "--cloud-hypervisor", vmm.to_str().unwrap()];
        args.extend(extra);
        let d = Daemon::start_in(root, &args);
        let (probe, chan) = accept_channel(&rendezvous);
        Harness { d, rendezvous, chan, probe, next_id: 1, events: vec![] }
    }

    pub fn images(&self) -> PathBuf {
        self.d.path("images")
    }

    /// The next frontend's channel, after the broker dropped the last one.
    pub fn reconnect(&mut self) {
        let (probe, chan) = accept_channel(&self.rendezvous);
        self.probe = probe;
        self.chan = chan;
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

fn accept_channel(l: &UnixListener) -> (UnixStream, OwnedFd) {
    l.set_nonblocking(true).expect("nonblocking");
    let (s, _) = wait_for("the stand-in frontend", Duration::from_secs(20), || l.accept().ok());
    s.set_nonblocking(false).expect("blocking");
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
    (s, unsafe { OwnedFd::from_raw_fd(fd) })
}
