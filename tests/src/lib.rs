//! Helpers shared by the integration tests: locating the built binaries, running the daemon
//! in a scratch tree, reading /proc, and speaking line-delimited JSON-RPC.

pub mod agent;
pub mod harness;
pub mod pvh;
pub mod vmm_sandbox;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// The directory cargo put the workspace's binaries in (`cargo build --workspace` builds them).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace` before the tests", p.display());
    p
}

/// `name` hard-linked (or copied) into `<root>/bin`, a directory every uid may traverse: the
/// frontend and the VMMs run as other uids and must reach the binaries they exec, wherever
/// the checkout lives and whatever its parents' modes.
pub fn staged_bin(root: &Path, name: &str) -> PathBuf {
    let dir = root.join("bin");
    if !dir.exists() {
        std::fs::create_dir(&dir).expect("bin dir");
        std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o755)).expect("chmod");
    }
    let to = dir.join(name);
    if !to.exists() && std::fs::hard_link(bin(name), &to).is_err() {
        std::fs::copy(bin(name), &to).expect("copy binary");
    }
    to
}

/// True when the test may use root; otherwise prints why it skips. A CI run (CI=true) as
/// non-root fails instead, so nothing skips silently there.
pub fn have_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{test}: CI must run the tests as root");
    eprintln!("SKIP {test}: needs root (it starts the daemon, which drops to other uids)");
    false
}

/// Polls `f` every 20 ms until it returns Some, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fields of /proc/PID/status, by name.
pub fn proc_status(pid: i32) -> Option<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(text.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.to_string(), v.trim().to_string())).collect())
}

/// The pids whose parent is `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if proc_status(child).and_then(|s| s.get("PPid").cloned()) == Some(pid.to_string()) {
            out.push(child);
        }
    }
    out
}

/// (uid, gid, mode & 0o7777) of a path, not following a final symlink.
pub fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.permissions().mode() & 0o7777)
}

/// A scratch dir that other uids may traverse (the frontend and VMMs must reach below it).
///
/// It is under /var/tmp, not /tmp: each VMM's mount namespace covers /tmp with an empty
/// tmpfs, so images and binaries there would be out of its sight.
pub fn scratch_root() -> tempfile::TempDir {
    let root = tempfile::Builder::new().prefix("myhv-test").tempdir_in("/var/tmp").expect("tempdir");
    std::fs::set_permissions(root.path(), PermissionsExt::from_mode(0o755)).expect("chmod");
    root
}

/// A daemon running in a scratch tree, stopped and cleaned up on drop.
pub struct Daemon {
    pub child: Child,
    pub root: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon with every path under a fresh scratch dir, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Daemon {
        Self::start_in(scratch_root(), extra)
    }

    /// Starts the daemon under `root`; its stderr goes to `<root>/daemon.log`. It stops its
    /// VMs when it exits, so that nothing a test started outlives the test.
    pub fn start_in(root: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let child = Self::spawn(root.path(), extra, true);
        Daemon { child, root }.serving()
    }

    /// As [`Daemon::start_in`], but with the daemon's default on exit: VMs keep running.
    pub fn start_keeping_vms(root: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let child = Self::spawn(root.path(), extra, false);
        Daemon { child, root }.serving()
    }

    fn spawn(root: &Path, extra: &[&str], stop_vms: bool) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(root.join("daemon.log")).expect("log");
        Self::command_with(root, extra, stop_vms).stderr(log).spawn().expect("start daemon")
    }

    fn serving(mut self) -> Daemon {
        self.wait_serving();
        self
    }

    fn wait_serving(&mut self) {
        wait_for("the rpc socket to accept", Duration::from_secs(10), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the daemon exited ({status}) before serving:\n{}", self.log());
            }
            UnixStream::connect(self.rpc_socket()).ok().map(drop)
        });
    }

    /// Ends the daemon with `sig` (waiting for it), unless it has exited already, and starts
    /// a new one on the same tree.
    pub fn restart(&mut self, sig: Signal, extra: &[&str], stop_vms: bool) {
        if self.child.try_wait().ok().flatten().is_none() {
            kill(Pid::from_raw(self.pid()), sig).expect("signal the daemon");
            let exit = wait_for("the daemon to exit", Duration::from_secs(15), || self.child.try_wait().ok().flatten());
            assert!(sig != Signal::SIGTERM || exit.success(), "{exit}:\n{}", self.log());
        }
        let _ = std::fs::remove_file(self.rpc_socket());
        self.child = Self::spawn(self.root.path(), extra, stop_vms);
        self.wait_serving();
        // The listener is the broker's: only an answer shows that the frontend runs (and
        // would take a SIGTERM), so that a test may stop this daemon at once.
        let reply = self.call(&serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "compute.vm.list"}));
        assert!(reply.get("result").is_some(), "{reply}");
    }

    /// What the daemon (broker, spawn helper and frontend) logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// The daemon's command line under `root`, stopping its VMs on exit.
    pub fn command(root: &Path, extra: &[&str]) -> Command {
        Self::command_with(root, extra, true)
    }

    pub fn command_with(root: &Path, extra: &[&str], stop_vms: bool) -> Command {
        for sibling in ["my_hypervisor-frontend", "my_hypervisor-frontend-launcher", "my_hypervisor-vmm-launcher"] {
            staged_bin(root, sibling);
        }
        let mut cmd = Command::new(staged_bin(root, "my_hypervisor-daemon"));
        cmd.arg("--rpc-socket")
            .arg(root.join("run/rpc.sock"))
            .arg("--state-dir")
            .arg(root.join("run/vms"))
            .arg("--console-dir")
            .arg(root.join("run/console"))
            .args(if extra.contains(&"--run-dir") { vec![] } else { vec!["--run-dir".into(), root.join("run/vmm")] })
            .arg("--image-root")
            .arg(root.join("images"))
            .args(extra)
            .args(stop_vms.then_some("--stop-vms-on-exit"))
            .stdin(Stdio::null());
        cmd
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    pub fn rpc_socket(&self) -> PathBuf {
        self.path("run/rpc.sock")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The current frontend's pid, waiting until one runs.
    pub fn frontend_pid(&self) -> i32 {
        wait_for("a frontend process", Duration::from_secs(10), || {
            children(self.pid()).into_iter().find(|&p| {
                std::fs::read_link(format!("/proc/{p}/exe"))
                    .is_ok_and(|e| e.to_string_lossy().contains("my_hypervisor-frontend"))
            })
        })
    }

    /// Sends one JSON-RPC line and returns the parsed reply line.
    pub fn call(&self, request: &Value) -> Value {
        let mut c = RpcClient::connect(&self.rpc_socket());
        c.call(request)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A line-delimited JSON-RPC client on one connection.
pub struct RpcClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl RpcClient {
    pub fn connect(path: &Path) -> RpcClient {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        RpcClient { reader: BufReader::new(s.try_clone().expect("clone")), writer: s }
    }

    /// Writes the line and its newline in one write, so a server that answers a too-long line
    /// and closes cannot make the newline's write fail.
    pub fn send_line(&mut self, line: &str) {
        self.writer.write_all(format!("{line}\n").as_bytes()).expect("write");
    }

    pub fn read_line(&mut self) -> Option<String> {
        let mut l = String::new();
        match self.reader.read_line(&mut l) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(l),
        }
    }

    pub fn call(&mut self, request: &Value) -> Value {
        self.send_line(&request.to_string());
        let line = self.read_line().expect("a reply line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }
}
