//! Readiness for systemd (`Type=notify`): a datagram socket connected to `$NOTIFY_SOCKET`
//! at start, before confinement, so that sending `READY=1` later takes only write(2).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use my_hypervisor_policy::notify::{NotifyAddr, READY, address};

/// The connected socket, or None when the daemon was not started with `$NOTIFY_SOCKET`.
pub fn connect_notify() -> Result<Option<UnixDatagram>, String> {
    let Some(value) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(None) };
    let sock = UnixDatagram::unbound().map_err(|e| format!("notify socket: {e}"))?;
    let connected = match address(value.as_bytes()).map_err(|e| e.to_string())? {
        NotifyAddr::Path(p) => sock.connect(p),
        NotifyAddr::Abstract(name) => SocketAddr::from_abstract_name(name).and_then(|a| sock.connect_addr(&a)),
    };
    connected.map(|()| Some(sock)).map_err(|e| format!("NOTIFY_SOCKET: {e}"))
}

/// Sends READY=1 once: the socket is used up.
pub fn ready(notify: Option<UnixDatagram>) {
    if let Some(Err(e)) = notify.map(|s| nix::unistd::write(&s, READY)) {
        tracing::error!(error = %e, "READY=1 to NOTIFY_SOCKET");
    }
}
