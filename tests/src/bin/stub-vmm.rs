//! A stand-in VMM for broker tests: not a cloud-hypervisor double, only a process that
//! takes cloud-hypervisor's argv, creates its serial socket the way CH does (as the VM uid,
//! umask 077) and then idles until it is signalled. Like CH it exits on SIGTERM through a
//! handler: as PID 1 of its own PID namespace it would ignore a SIGTERM it had no handler for.

use std::os::unix::net::UnixListener;

extern "C" fn on_term(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

fn main() {
    // The daemon checks its cloud-hypervisor's version at start: answer as a current one.
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("cloud-hypervisor v53.0");
        return;
    }
    // SAFETY: installs a handler that only calls _exit.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
    let args: Vec<String> = std::env::args().collect();
    let serial = args
        .windows(2)
        .find(|w| w[0] == "--serial")
        .and_then(|w| w[1].strip_prefix("socket="))
        .expect("--serial socket=PATH")
        .to_string();
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let _l = UnixListener::bind(&serial).expect("bind serial socket");
    loop {
        std::thread::park();
    }
}
