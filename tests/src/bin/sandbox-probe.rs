//! A stand-in VMM for the escape tests. The daemon starts it exactly as it would start
//! cloud-hypervisor (real spawn path, real launcher, the VM's own sandbox), with CH's argv.
//! What it does is written in its "kernel" file:
//! - `all <host-socket>`: try every escape that should fail with an error and every operation
//!   a VMM needs, print one `RESULT <name> <outcome>` line each, then `READY`, and idle;
//! - `fork`: fork a child that idles; print `FORKED <pid>` (the child's pid in the probe's
//!   PID namespace) and idle. Should die by SIGSYS unless the daemon runs `--vmm-seccomp log`;
//! - `fill`: bind Unix sockets in its run dir until that fails, print `SOCKETS <n> <outcome>`,
//!   then write to its log until that fails, and exit with the MiB written as its status;
//! - `<syscall>`: make that one forbidden syscall, which should kill it with SIGSYS; if it
//!   returns, print `SURVIVED <syscall> <outcome>`.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

fn arg_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.windows(2).find(|w| w[0] == flag).map(|w| w[1].as_str())
}

fn outcome<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => {
            format!("denied:{}", e.raw_os_error().map_or("?".into(), |n| nix::errno::Errno::from_raw(n).to_string()))
        }
    }
}

/// A raw syscall's outcome, as `outcome` reports it.
fn sys(r: libc::c_long) -> std::io::Result<libc::c_long> {
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) }
}

/// execve in place, with no fork; returns only on failure.
fn exec(path: &str) -> std::io::Result<()> {
    let p = std::ffi::CString::new(path).expect("path");
    let argv = [p.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NUL-terminated argv and envp that outlive the call.
    unsafe { libc::execve(p.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(std::io::Error::last_os_error())
}

fn main() {
    // The daemon checks its cloud-hypervisor's version at start: answer as a current one.
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("cloud-hypervisor v53.0");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let kernel = arg_after(&args, "--kernel").expect("--kernel");
    let serial = arg_after(&args, "--serial").and_then(|s| s.strip_prefix("socket=")).expect("--serial");
    let run_dir = Path::new(serial).parent().expect("runtime dir");
    let disk = arg_after(&args, "--disk").and_then(|d| d.strip_prefix("path=")).map(|d| d.split(',').next().unwrap());
    let what = std::fs::read_to_string(kernel).expect("read the kernel");
    let mut words = what.split_whitespace();
    let op = words.next().unwrap_or_default();
    let out = &mut std::io::stdout();
    let mut report = |name: &str, o: String| {
        let _ = writeln!(out, "RESULT {name} {o}");
        let _ = out.flush();
    };
    if op == "all" {
        let host_socket = words.next().expect("a host socket path");
        report("read-kernel", "ok".into());
        report("read-etc-shadow", outcome(std::fs::read("/etc/shadow")));
        // World-readable, so only Landlock stands in the way of these two.
        report("read-etc-passwd", outcome(std::fs::read("/etc/passwd")));
        report("list-image-root", outcome(std::fs::read_dir(Path::new(kernel).parent().unwrap())));
        let other = run_dir.parent().unwrap().join("other");
        report("read-other-vm-dir", outcome(std::fs::read_dir(&other)));
        report("write-beside-own-dir", outcome(std::fs::write(run_dir.parent().unwrap().join("x"), b"x")));
        report("write-var-tmp", outcome(std::fs::write("/var/tmp/myhv-escape", b"x")));
        report("open-dev-mem", outcome(std::fs::File::open("/dev/mem")));
        report(
            "open-disk-device",
            outcome(std::fs::File::open("/dev/vda").or_else(|_| std::fs::File::open("/dev/sda"))),
        );
        // execve in place: a fork would be killed by the seccomp filter.
        report("exec-bin-sh", outcome(exec("/bin/sh")));
        report("exec-image", outcome(exec(kernel)));
        report("exec-run-dir-file", outcome(exec(&run_dir.join("vmm.log").to_string_lossy())));
        report("read-etc-hostname", outcome(std::fs::read("/etc/hostname")));
        report("list-proc", outcome(std::fs::read_dir("/proc")));
        // SAFETY: io_uring_setup with no params pointer; the filter answers before the kernel.
        report("io-uring-setup", outcome(sys(unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, 0) })));
        // The first tap, at fd 5 (VMM_FIRST_TAP_FD).
        let mut ifr = [0u8; 40];
        // SAFETY: each request reads or writes one struct ifreq (40 bytes) or an int.
        unsafe {
            report("tap-tungetiff", outcome(sys(libc::ioctl(5, 0x8004_54d2, ifr.as_mut_ptr()) as libc::c_long)));
            report("tap-tunsetpersist", outcome(sys(libc::ioctl(5, 0x4004_54cb, 1) as libc::c_long)));
            ifr[16..18].copy_from_slice(&1u16.to_ne_bytes()); // ARPHRD_ETHER
            ifr[18..24].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x66]);
            report("tap-siocsifhwaddr", outcome(sys(libc::ioctl(5, 0x8924, ifr.as_mut_ptr()) as libc::c_long)));
        }
        report("connect-tcp", outcome(std::net::TcpStream::connect("127.0.0.1:22")));
        report("connect-host-unix-socket", outcome(UnixStream::connect(host_socket)));
        let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
        // SAFETY: KVM_CREATE_VM takes a machine type (0) and returns a new fd.
        let vm = kvm.and_then(|k| sys(unsafe { libc::ioctl(k.as_raw_fd(), 0xAE01, 0) } as libc::c_long));
        report("kvm-create-vm", outcome(vm));
        let disk = disk.expect("a --disk");
        report(
            "write-own-disk",
            outcome(std::fs::OpenOptions::new().write(true).open(disk).and_then(|mut f| f.write_all(b"disk"))),
        );
        report("socket-in-own-dir", outcome(UnixListener::bind(run_dir.join("probe.sock"))));
        let _ = writeln!(out, "READY");
        let _ = out.flush();
        loop {
            std::thread::park();
        }
    }
    if op == "fill" {
        let mut socks = Vec::new();
        let err = loop {
            match UnixListener::bind(run_dir.join(format!("s{}.sock", socks.len()))) {
                Ok(l) => socks.push(l),
                Err(e) => break e,
            }
        };
        let _ = writeln!(out, "SOCKETS {} {}", socks.len(), outcome::<()>(Err(err)));
        let _ = out.flush();
        let chunk = vec![b'x'; 1 << 16];
        let mut written: u64 = 0;
        while let Ok(n) = out.write(&chunk) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        std::process::exit((written >> 20).min(255) as i32);
    }
    if op == "fork" {
        // SAFETY: the probe is single-threaded here; the child only sleeps.
        match unsafe { libc::fork() } {
            0 => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            pid => {
                let _ = writeln!(out, "FORKED {pid}");
                let _ = out.flush();
                loop {
                    std::thread::park();
                }
            }
        }
    }
    // SAFETY: each is a plain syscall with harmless arguments; the filter should kill first.
    let r = unsafe {
        match op {
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
            "mount" => libc::syscall(libc::SYS_mount, c"none".as_ptr(), c"/".as_ptr(), c"tmpfs".as_ptr(), 0, 0),
            "unshare" => libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER),
            "bpf" => libc::syscall(libc::SYS_bpf, 0, 0, 0),
            "kexec_load" => libc::syscall(libc::SYS_kexec_load, 0, 0, 0, 0),
            "init_module" => libc::syscall(libc::SYS_init_module, 0, 0, 0),
            "keyctl" => libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0),
            "setuid" => libc::syscall(libc::SYS_setuid, 0),
            other => panic!("unknown op {other:?}"),
        }
    };
    let _ = writeln!(out, "SURVIVED {op} {}", outcome(sys(r)));
}
