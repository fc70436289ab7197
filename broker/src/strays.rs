//! Fds a frontend sends the broker. Requests never carry fds, and closing a received fd can
//! block the broker's only thread (a TCP socket with a long SO_LINGER and unsent data, a
//! FUSE file), so the broker never closes one. Where the kernel has SO_PASSRIGHTS (6.16+),
//! the broker's end of every frontend channel refuses fds: the frontend's sendmsg fails.
//! Elsewhere, or with the hidden debugging flag `--no-passrights`, a closer process, forked
//! before the broker's filter goes on and holding no capability, takes every stray fd and
//! closes it.
//!
//! The broker hands a batch of strays to the closer, closes its own copies (the message in
//! flight or the closer still holds each file, so that close is never the last), then sends
//! an empty marker; the closer closes every batch it holds only when a marker arrives.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use my_hypervisor_broker_proto::{Request, WireError, recv_keeping_fds};
use my_hypervisor_policy::net::SO_PASSRIGHTS;
use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair};
use nix::unistd::{ForkResult, fork};

pub enum Strays {
    /// Frontend channels refuse fds (SO_PASSRIGHTS off on the broker's end).
    Refused,
    /// The closer's end of its channel.
    Closer(OwnedFd),
}

fn refuse_fds(fd: &impl AsFd) -> std::io::Result<()> {
    let off: libc::c_int = 0;
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    let (fd, value) = (fd.as_fd().as_raw_fd(), (&raw const off).cast());
    // SAFETY: setsockopt reads an int from a pointer valid for `len` bytes.
    let r = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, SO_PASSRIGHTS, value, len) };
    crate::unpriv::sys("setsockopt", r.into()).map(drop)
}

/// A SOCK_SEQPACKET socketpair, close-on-exec.
pub fn pair() -> Result<(OwnedFd, OwnedFd), String> {
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| format!("socketpair: {e}"))
}

impl Strays {
    /// Before the broker's filter: SO_PASSRIGHTS if the kernel has it and it is not turned
    /// off, else the closer.
    pub fn start(no_passrights: bool) -> Result<Strays, String> {
        let (probe, _) = pair()?;
        if !no_passrights && refuse_fds(&probe).is_ok() {
            tracing::info!("frontend channels refuse fds (SO_PASSRIGHTS)");
            return Ok(Strays::Refused);
        }
        let (ours, theirs) = pair()?;
        // SAFETY: no thread exists yet, so the child may do anything the parent could.
        match unsafe { fork() }.map_err(|e| format!("fork the fd closer: {e}"))? {
            ForkResult::Child => {
                drop(ours);
                closer(theirs)
            }
            ForkResult::Parent { child } => {
                tracing::info!(pid = child.as_raw(), "stray fds go to a closer process (no SO_PASSRIGHTS)");
                nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
                    .map_err(|e| format!("closer channel: {e}"))?;
                Ok(Strays::Closer(ours))
            }
        }
    }

    /// Makes a new frontend channel refuse fds, where the kernel can.
    pub fn guard(&self, chan: &OwnedFd) -> Result<(), String> {
        match self {
            Strays::Refused => refuse_fds(chan).map_err(|e| format!("SO_PASSRIGHTS: {e}")),
            Strays::Closer(_) => Ok(()),
        }
    }

    /// Gets rid of fds that came with a request, without closing the last copy here. One
    /// that cannot be handed over is leaked rather than closed.
    pub fn dispose(&self, fds: Vec<OwnedFd>) {
        if fds.is_empty() {
            return;
        }
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        let send = |chan: &OwnedFd, bytes: &[u8], fds: &[i32]| {
            let cmsg = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
            sendmsg::<()>(chan.as_raw_fd(), &[IoSlice::new(bytes)], cmsgs, flags, None).is_ok()
        };
        let count = fds.len();
        match self {
            Strays::Closer(chan) if send(chan, b"f", &fds.iter().map(AsRawFd::as_raw_fd).collect::<Vec<_>>()) => {
                drop(fds);
                let _ = send(chan, b"m", &[]);
            }
            _ => {
                tracing::warn!(count, "stray fds left open: closing them here could block the broker");
                fds.into_iter().for_each(std::mem::forget);
            }
        }
    }

    /// Takes the messages still queued on a dropped channel (at most 256: a peer that keeps
    /// sending must not hold the broker here), so that no fd in them is released when the
    /// channel closes.
    pub fn drain(&self, chan: &OwnedFd) {
        for _ in 0..256 {
            let (r, fds) = recv_keeping_fds::<Request>(chan);
            self.dispose(fds);
            if matches!(r, Err(WireError::WouldBlock | WireError::Closed | WireError::Io(_))) {
                return;
            }
        }
    }
}

/// The closer: no capability, no other fd; closes what the broker hands it.
fn closer(chan: OwnedFd) -> ! {
    let fd = chan.as_raw_fd() as u32;
    // SAFETY: closes every fd but the channel (and stdio); nothing in this fresh child uses them.
    unsafe {
        libc::close_range(3, fd.saturating_sub(1), 0);
        libc::close_range(fd + 1, u32::MAX, 0);
    }
    if crate::confine::keep_only(&[]).is_err() {
        std::process::exit(1);
    }
    let mut held: Vec<OwnedFd> = Vec::new();
    loop {
        let (r, fds) = recv_keeping_fds::<Request>(&chan);
        let marker = fds.is_empty();
        held.extend(fds);
        match r {
            Err(WireError::Closed | WireError::Io(_)) => std::process::exit(0),
            _ if marker => held.clear(),
            _ => {}
        }
    }
}
