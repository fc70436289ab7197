//! Framing: one envelope per datagram, fds by SCM_RIGHTS with MSG_CMSG_CLOEXEC.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Envelope, MAX_FDS, MAX_MESSAGE, PROTOCOL_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("peer closed the channel")]
    Closed,
    #[error("would block")]
    WouldBlock,
    #[error("datagram or its fds were truncated")]
    Truncated,
    #[error("message does not decode: {0}")]
    Decode(postcard::Error),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("protocol version {0}, expected {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("message declares {declared} fds but {received} arrived")]
    FdCount { declared: u8, received: usize },
    #[error("message is {0} bytes, more than the maximum")]
    TooLarge(usize),
    #[error("unexpected control message")]
    Control,
    #[error("socket: {0}")]
    Io(nix::errno::Errno),
}

/// Encodes an envelope; fails if it would not fit in one datagram.
pub fn encode<T: Serialize>(env: &Envelope<T>) -> Result<Vec<u8>, WireError> {
    let bytes = postcard::to_stdvec(env).map_err(WireError::Decode)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(WireError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes exactly one envelope from exactly these bytes, with `nfds` fds received.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], nfds: usize) -> Result<Envelope<T>, WireError> {
    let (env, rest): (Envelope<T>, _) = postcard::take_from_bytes(bytes).map_err(WireError::Decode)?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    if env.version != PROTOCOL_VERSION {
        return Err(WireError::Version(env.version));
    }
    if usize::from(env.fds) != nfds {
        return Err(WireError::FdCount { declared: env.fds, received: nfds });
    }
    Ok(env)
}

/// Sends one envelope with `fds` attached; the envelope's `fds` field is set here.
pub fn send<T: Serialize>(sock: impl AsFd, mut env: Envelope<T>, fds: &[RawFd]) -> Result<(), WireError> {
    assert!(fds.len() <= MAX_FDS, "a message carries at most MAX_FDS fds");
    env.fds = fds.len() as u8;
    let bytes = encode(&env)?;
    let iov = [IoSlice::new(&bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(sock.as_fd().as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Err(WireError::WouldBlock),
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(WireError::Io(e)),
        }
    }
}

/// The most fds the kernel passes in one message (SCM_MAX_FD): room for all of them, so that
/// none is cut off and closed by the kernel inside the receiver's recvmsg.
const SCM_MAX_FD: usize = 253;

/// Receives one envelope and the fds it declares. Any fd that arrived is owned (and closed)
/// even when the message is refused.
pub fn recv<T: DeserializeOwned>(sock: impl AsFd) -> Result<(Envelope<T>, Vec<OwnedFd>), WireError> {
    let (env, fds) = recv_keeping_fds(sock);
    env.map(|env| (env, fds))
}

/// As [`recv`], but every fd that arrived is handed back even when the message is refused,
/// so that the caller decides where it is closed (closing a peer's fd can block).
pub fn recv_keeping_fds<T: DeserializeOwned>(sock: impl AsFd) -> (Result<Envelope<T>, WireError>, Vec<OwnedFd>) {
    let mut fds = Vec::new();
    (recv_into(sock, &mut fds), fds)
}

fn recv_into<T: DeserializeOwned>(sock: impl AsFd, fds: &mut Vec<OwnedFd>) -> Result<Envelope<T>, WireError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg_space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let (len, flags) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(sock.as_fd().as_raw_fd(), &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut stray = false;
                for c in msg.cmsgs().map_err(WireError::Io)? {
                    match c {
                        // SAFETY: the kernel just installed these fds in our table for us.
                        ControlMessageOwned::ScmRights(v) => {
                            fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }))
                        }
                        _ => stray = true,
                    }
                }
                if stray {
                    return Err(WireError::Control);
                }
                break (msg.bytes, msg.flags);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Err(WireError::WouldBlock),
            Err(nix::errno::Errno::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(WireError::Io(e)),
        }
    };
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        return Err(WireError::Truncated);
    }
    if len == 0 && fds.is_empty() {
        return Err(WireError::Closed);
    }
    if fds.len() > MAX_FDS {
        return Err(WireError::FdCount { declared: 0, received: fds.len() });
    }
    decode(&buf[..len], fds.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FromBroker, Reply, Request};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap()
    }

    fn env<T>(body: T) -> Envelope<T> {
        Envelope { version: PROTOCOL_VERSION, id: 9, fds: 0, body }
    }

    #[test]
    fn round_trip_with_fds() {
        let (a, b) = pair();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        send(&a, env(FromBroker::Reply(Reply::Connected)), &[file.as_raw_fd()]).unwrap();
        let (got, fds) = recv::<FromBroker>(&b).unwrap();
        assert_eq!(got.body, FromBroker::Reply(Reply::Connected));
        assert_eq!((got.id, got.fds, fds.len()), (9, 1, 1));
        let st = nix::sys::stat::fstat(&fds[0]).unwrap();
        assert_eq!(st.st_ino, nix::sys::stat::fstat(&file).unwrap().st_ino);
        let fl = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(fl & libc_cloexec(), 0, "received fds are close-on-exec");
    }

    fn libc_cloexec() -> i32 {
        nix::fcntl::FdFlag::FD_CLOEXEC.bits()
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = encode(&env(Request::Inventory)).unwrap();
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(decode::<Request>(&trailing, 0), Err(WireError::Trailing(1))));
        assert!(matches!(decode::<Request>(&good[..good.len() - 1], 0), Err(WireError::Decode(_))));
        assert!(matches!(decode::<Request>(&good, 1), Err(WireError::FdCount { .. })));
        let mut unknown = good.clone();
        *unknown.last_mut().unwrap() = 200; // variant index past the last request
        assert!(matches!(decode::<Request>(&unknown, 0), Err(WireError::Decode(_))));
        let mut old = env(Request::Inventory);
        old.version = 0;
        assert!(matches!(decode::<Request>(&encode(&old).unwrap(), 0), Err(WireError::Version(0))));
        let huge = env(Request::Release { vm: "x".repeat(MAX_MESSAGE) });
        assert!(matches!(encode(&huge), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn fds_of_a_refused_message_are_handed_back() {
        let (a, b) = pair();
        let files: Vec<_> = (0..12).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        sendmsg::<()>(a.as_raw_fd(), &[IoSlice::new(b"junk")], &cmsg, MsgFlags::empty(), None).unwrap();
        let (r, fds) = recv_keeping_fds::<Request>(&b);
        assert!(matches!(r, Err(WireError::FdCount { received: 12, .. })), "{r:?}");
        assert_eq!(fds.len(), 12, "more than MAX_FDS arrive whole, none closed by the kernel");
    }

    #[test]
    fn oversized_datagram_is_truncated_not_guessed() {
        let (a, b) = pair();
        nix::unistd::write(&a, &vec![0u8; MAX_MESSAGE + 1]).unwrap();
        assert!(matches!(recv::<Request>(&b), Err(WireError::Truncated)));
    }
}
