//! Guest agents for the tests of exec: guest-init in test mode (`--listen-unix`) as PID 1 of
//! new PID, mount and UTS namespaces, or the hostile agent (`hostile-agent`), each listening
//! where the cloud-hypervisor test double's hybrid-vsock muxer forwards a port to
//! (`guest-vsock-<port>.sock` next to the VM's `vsock.sock`), owned by the VM's uid so the
//! double may connect.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{bin, bin_dir, wait_for};

/// The vsock port guest-init listens on by default, which the frontend connects to.
pub const PORT: u32 = 1024;

/// The guest-side listener of `port` for the VM whose runtime dir is `vm_dir`.
pub fn listener_path(vm_dir: &Path, port: u32) -> PathBuf {
    vm_dir.join(format!("guest-vsock-{port}.sock"))
}

/// The static guest-init the workspace build made (target/static-init/<target>/<profile>/),
/// or the ordinary one when that is missing.
pub fn guest_init() -> PathBuf {
    let profile = bin_dir();
    let name = profile.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let static_dir = profile.parent().map(|t| t.join("static-init"));
    if let Some(found) = static_dir
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(&name).join("my_hypervisor-init"))
        .find(|p| p.exists())
    {
        return found;
    }
    bin("my_hypervisor-init")
}

/// A process that plays the guest's agent; killed (with its namespace) on drop.
pub struct Agent {
    pub pid: i32,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// guest-init `--listen-unix <vm_dir>/guest-vsock-1024.sock` as PID 1 of a new PID + mount +
    /// UTS namespace, once it listens, its socket handed to the VM's uid.
    pub fn guest_init(vm_dir: &Path, log_dir: &Path) -> Agent {
        let socket = listener_path(vm_dir, PORT);
        let args = [guest_init().to_string_lossy().into_owned(), "--listen-unix".into(), path_str(&socket)];
        let flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS;
        Agent::spawn(&args, flags, socket, &log_dir.join("guest-init.log"), vm_dir)
    }

    /// `hostile-agent <socket> <mode>` (see tests/src/bin/hostile-agent.rs).
    pub fn hostile(vm_dir: &Path, log_dir: &Path, mode: &str) -> Agent {
        let socket = listener_path(vm_dir, PORT);
        let args = [bin("hostile-agent").to_string_lossy().into_owned(), path_str(&socket), mode.to_string()];
        Agent::spawn(&args, 0, socket, &log_dir.join(format!("hostile-{mode}.log")), vm_dir)
    }

    fn spawn(args: &[String], ns_flags: i32, socket: PathBuf, log: &Path, vm_dir: &Path) -> Agent {
        let _ = std::fs::remove_file(&socket);
        let argv_c: Vec<CString> = args.iter().map(|a| CString::new(a.as_str()).expect("no NUL")).collect();
        let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let env_c = [CString::new("PATH=/usr/sbin:/usr/bin:/sbin:/bin").expect("env")];
        let envp = [env_c[0].as_ptr(), std::ptr::null()];
        let log_file = std::fs::File::create(log).expect("agent log");
        let log_fd = log_file.as_raw_fd();
        let flags = ns_flags | libc::SIGCHLD;
        // SAFETY: clone without a new stack behaves like fork. The child only makes system
        // calls (mount, dup2, execve, _exit) on memory prepared before.
        let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
        if pid == 0 {
            // SAFETY: see above; the pointers stay valid in the child's copy of memory.
            unsafe {
                if ns_flags & libc::CLONE_NEWNS != 0 {
                    // Shared `/` in the new mount namespace, so guest-init must make it private
                    // itself before it mounts anything (as guest-init's own tests do).
                    libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_SHARED,
                        std::ptr::null(),
                    );
                }
                libc::dup2(log_fd, 1);
                libc::dup2(log_fd, 2);
                libc::execve(argv[0], argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        assert!(pid > 0, "clone: {}", std::io::Error::last_os_error());
        let agent = Agent { pid: pid as i32, socket, log: log.to_path_buf() };
        wait_for("the agent to listen", Duration::from_secs(10), || UnixStream::connect(&agent.socket).ok());
        // The double runs as the VM's uid, the owner of the VM's runtime dir.
        let uid = std::fs::metadata(vm_dir).expect("vm dir").uid();
        std::os::unix::fs::chown(&agent.socket, Some(uid), None).expect("chown the agent's socket");
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Host pids of the processes in the agent's process tree below it.
    pub fn descendants(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let mut frontier = vec![self.pid];
        while let Some(p) = frontier.pop() {
            for c in crate::children(p) {
                out.push(c);
                frontier.push(c);
            }
        }
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Killing PID 1 of the namespace ends everything in it.
        // SAFETY: kill and waitpid on our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
