//! Running out of file descriptors must pause accepting, not spin on it. This test lowers the
//! process's descriptor limit, so it lives in a test binary of its own.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use common::{spec_methods, start};
use my_hypervisor_frontend::rpc::Limits;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

fn nofile() -> libc::rlimit {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own, passed by valid pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim
}

fn set_nofile(lim: libc::rlimit) {
    // SAFETY: setrlimit only reads the struct passed by valid pointer.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own, passed by valid pointer.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_backs_off_when_out_of_descriptors() {
    let server = start(spec_methods(), Limits::default());
    let addr = UnixAddr::new(&server.path).unwrap();
    // Client sockets are made before the limit drops; connecting them needs no new descriptor.
    let clients: Vec<OwnedFd> =
        (0..4).map(|_| socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap()).collect();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let saved = nofile();
    // Counting opens the directory, which holds one descriptor while it is read.
    let in_use = open_fds().saturating_sub(1);
    set_nofile(libc::rlimit { rlim_cur: in_use, rlim_max: saved.rlim_max });
    for fd in &clients {
        connect(std::os::fd::AsRawFd::as_raw_fd(fd), &addr).unwrap();
    }
    // The server now sees pending connections it cannot accept.
    let before = cpu_time();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_time() - before;
    set_nofile(saved);
    assert!(used < Duration::from_millis(300), "accept loop used {used:?} of CPU in 1 s while out of fds");

    // With descriptors back, the waiting clients are served.
    let started = Instant::now();
    let served = tokio::task::spawn_blocking(move || {
        clients
            .into_iter()
            .map(|fd| {
                let mut s = std::os::unix::net::UnixStream::from(fd);
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"sum\",\"params\":[1,2],\"id\":1}\n").unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                line
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for line in served {
        assert!(line.contains("\"result\":3"), "{line}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}
