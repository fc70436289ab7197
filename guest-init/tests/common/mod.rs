//! Starts the static guest-init in test mode as PID 1 of new PID, mount and UTS namespaces,
//! and speaks the exec protocol to it with the protocol crate.

#![allow(dead_code)]

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use my_hypervisor_exec_proto::{
    ExecCollector, ExecRequest, ExecResult, GuestFrame, HostFrame, MAX_CHUNK, ProtoError, check_hello, host_hello,
    read_frame, write_frame,
};

/// The static binary this package's build script made.
pub const STATIC_INIT: &str = env!("MYHV_STATIC_INIT");

/// True when the test may use root; otherwise prints why it skips. A CI run (CI=true) as
/// non-root fails instead, so nothing skips silently there.
pub fn have_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{test}: CI must run the tests as root");
    eprintln!("SKIP {test}: needs root (it creates PID, mount and UTS namespaces)");
    false
}

pub struct Init {
    /// Its pid in our namespace; it is 1 in its own.
    pub pid: i32,
    pub socket: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
    reaped: bool,
}

impl Init {
    /// guest-init --listen-unix, as PID 1 of a new PID + mount + UTS namespace, once it
    /// listens.
    pub fn start(extra: &[&str]) -> Init {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("exec.sock");
        let mut args = vec!["--listen-unix", socket.to_str().unwrap()];
        args.extend(extra);
        let init = Init::spawn(&args, Some(dir));
        let end = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&init.socket).is_err() {
            assert!(Instant::now() < end, "guest-init did not listen; log:\n{}", init.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        init
    }

    /// guest-init with `args`, as PID 1 of a new PID + mount + UTS namespace.
    pub fn spawn(extra: &[&str], dir: Option<tempfile::TempDir>) -> Init {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("tempdir"));
        let socket = dir.path().join("exec.sock");
        let log = dir.path().join("init.log");
        let mut args = vec![STATIC_INIT.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv_c: Vec<CString> = args.iter().map(|a| CString::new(a.as_str()).unwrap()).collect();
        let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let env_c = [CString::new("PATH=/usr/sbin:/usr/bin:/sbin:/bin").unwrap()];
        let envp = [env_c[0].as_ptr(), std::ptr::null()];
        let log_file = std::fs::File::create(&log).expect("log file");
        let log_fd = log_file.as_raw_fd();
        let flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::SIGCHLD;
        // SAFETY: clone without a new stack behaves like fork. The child only makes system
        // calls (mount, dup2, execve, _exit) on memory prepared before.
        let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
        if pid == 0 {
            // SAFETY: see above; the pointers stay valid in the child's copy of memory.
            unsafe {
                // In the child's new mount namespace, make `/` shared (a peer group of its
                // own) whatever the host's propagation, so that guest-init must make it
                // private itself before it mounts anything.
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SHARED,
                    std::ptr::null(),
                );
                libc::dup2(log_fd, 1);
                libc::dup2(log_fd, 2);
                libc::execve(argv[0], argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        assert!(pid > 0, "clone: {}", std::io::Error::last_os_error());
        Init { pid: pid as i32, socket, log, _dir: dir, reaped: false }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn connect(&self) -> Client {
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write_frame(&mut s, &host_hello()).expect("hello");
        let hello: GuestFrame = read_frame(&mut s).expect("read hello").expect("a hello");
        check_hello(&hello).expect("guest hello");
        Client { s }
    }

    /// Waits for the PID-1 process to end; its wait status, or None after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if rc == self.pid {
                self.reaped = true;
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Host pids of the processes whose parent is guest-init, with their state letter and name.
    pub fn children(&self) -> Vec<(i32, char, String)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // pid (comm) state ppid ...
            let Some((head, tail)) = stat.rsplit_once(')') else { continue };
            let comm = head.split_once('(').map(|(_, c)| c.to_string()).unwrap_or_default();
            let mut f = tail.split_ascii_whitespace();
            let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
            let ppid: i32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            if ppid == self.pid {
                out.push((pid, state, comm));
            }
        }
        out
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        if !self.reaped {
            // Killing PID 1 of the namespace ends everything in it.
            // SAFETY: kill and waitpid on our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

pub struct Client {
    pub s: UnixStream,
}

/// One exec as the host sees it: the collected result, or the guest's error.
#[derive(Debug, Default)]
pub struct Outcome {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: Option<ExecResult>,
    pub error: Option<String>,
}

impl Client {
    pub fn send(&mut self, f: &HostFrame) {
        write_frame(&mut self.s, f).expect("send frame");
    }

    pub fn recv(&mut self) -> GuestFrame {
        read_frame(&mut self.s).expect("read frame").expect("a frame, not the end of the stream")
    }

    /// Sends an exec (and its stdin), then collects frames until the exit or an error.
    pub fn exec(&mut self, req: ExecRequest, stdin: Option<&[u8]>) -> Outcome {
        self.start(req, stdin);
        self.finish()
    }

    pub fn start(&mut self, mut req: ExecRequest, stdin: Option<&[u8]>) {
        req.stdin = stdin.is_some();
        self.send(&HostFrame::Exec(req));
        if let Some(data) = stdin {
            for chunk in data.chunks(MAX_CHUNK) {
                self.send(&HostFrame::Stdin(chunk.to_vec()));
            }
            self.send(&HostFrame::StdinEnd);
        }
    }

    /// Collects the exec's frames with the protocol crate's collector (no output limit of
    /// its own beyond the guest's, so the tests see what the guest sent).
    pub fn finish(&mut self) -> Outcome {
        let mut c = ExecCollector::new(u64::MAX);
        loop {
            match c.push(self.recv()) {
                Ok(None) => {}
                Ok(Some(r)) => {
                    let (pid, stdout, stderr) = (r.pid, r.stdout.clone(), r.stderr.clone());
                    return Outcome { pid, stdout, stderr, exit: Some(r), error: None };
                }
                Err(ProtoError::Refused(message)) => {
                    return Outcome { error: Some(message), ..Outcome::default() };
                }
                Err(e) => panic!("during an exec: {e}"),
            }
        }
    }

    pub fn health(&mut self) -> (u64, u32) {
        self.send(&HostFrame::Health);
        match self.recv() {
            GuestFrame::Health { uptime_ms, running } => (uptime_ms, running),
            other => panic!("expected health, got {other:?}"),
        }
    }
}

pub fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["/bin/sh", "-c", script])
}

/// Polls `f` every 50 ms until it returns Some, or gives None after `timeout`.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
