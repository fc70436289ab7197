//! A stand-in frontend for broker tests. The daemon starts it exactly as it starts the real
//! frontend; it hands its broker channel (fd 4) to the test over `<root>/probe.sock`, where
//! `<root>` is two levels above `--state-dir`, and lives until the test hangs up.

use std::io::{IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let state_dir = args.iter().position(|a| a == "--state-dir").map(|i| PathBuf::from(&args[i + 1]));
    let root = state_dir.as_deref().and_then(|p| p.parent()?.parent()).expect("--state-dir <root>/run/vms");
    let mut s = UnixStream::connect(root.join("probe.sock")).expect("connect to the test");
    let fds = [4];
    sendmsg::<()>(s.as_raw_fd(), &[IoSlice::new(b"fd")], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
        .expect("pass the broker channel");
    let mut buf = [0u8; 1];
    let _ = s.read(&mut buf);
}
