//! systemd readiness: the daemon sends exactly one `READY=1` datagram to `$NOTIFY_SOCKET`,
//! and only once the frontend serves the RPC socket; a restarted frontend sends no second one.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use my_hypervisor_tests::{Daemon, have_root, scratch_root, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

/// Starts the daemon with NOTIFY_SOCKET=`value` and waits for the datagram on `sock`.
/// When it comes, the RPC socket already answers a full request.
fn ready_only_when_serving(test: &str, value: &str, sock: &UnixDatagram, root: tempfile::TempDir) -> Daemon {
    let log = std::fs::File::create(root.path().join("daemon.log")).expect("log file");
    let mut cmd = Daemon::command(root.path(), &["--vm-uid-range", "63440-63449"]);
    let child = cmd.env("NOTIFY_SOCKET", value).stderr(log).spawn().expect("start daemon");
    let d = Daemon { child, root };
    sock.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("{test}: no READY=1 ({e}):\n{}", d.log()));
    assert_eq!(&buf[..n], b"READY=1");
    let r = d.call(&json!({"jsonrpc": "2.0", "id": 1, "method": "rpc.discover"}));
    assert!(r.get("result").is_some(), "the RPC socket answers once READY=1 came: {r}");
    d
}

#[test]
fn ready_goes_to_a_path_socket_once_the_rpc_socket_answers_and_only_once() {
    let test = "ready_goes_to_a_path_socket_once_the_rpc_socket_answers_and_only_once";
    if !have_root(test) {
        return;
    }
    let root = scratch_root();
    let path = root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    let d = ready_only_when_serving(test, path.to_str().unwrap(), &sock, root);
    // A restarted frontend says it serves too; the service manager hears nothing more.
    let first = d.frontend_pid();
    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill the frontend");
    wait_for("the new frontend to report it serves", Duration::from_secs(15), || {
        (d.log().matches("request=Serving verdict=\"allow\"").count() >= 2).then_some(())
    });
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let again = sock.recv(&mut buf);
    assert!(again.is_err(), "a second datagram: {:?}", again.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()));
}

#[test]
fn ready_goes_to_an_abstract_socket() {
    let test = "ready_goes_to_an_abstract_socket";
    if !have_root(test) {
        return;
    }
    let name = format!("myhv-notify-test-{}", std::process::id());
    let addr = <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract notify socket");
    ready_only_when_serving(test, &format!("@{name}"), &sock, scratch_root());
}

#[test]
fn a_bad_notify_socket_stops_the_daemon_with_a_clear_error() {
    let test = "a_bad_notify_socket_stops_the_daemon_with_a_clear_error";
    if !have_root(test) {
        return;
    }
    let root = scratch_root();
    let out = Daemon::command(root.path(), &[]).env("NOTIFY_SOCKET", "relative.sock").output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#"NOTIFY_SOCKET "relative.sock" is neither an absolute path"#), "{err}");
}
