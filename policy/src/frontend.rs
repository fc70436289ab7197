//! The frontend's box, as data: the namespaces the broker's spawn path creates for it, the
//! Landlock rules and the seccomp allow-list that `my_hypervisor-frontend-launcher` applies
//! before it execs the frontend binary. Whatever binary is given as the frontend runs in it,
//! the tests' stand-ins included.

use std::ffi::{CString, NulError, OsString};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use landlock::{AccessFs, BitFlags};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

use crate::sandbox::Rule;
use crate::seccomp::{Allow, Mode, When, only, sys};

/// The frontend is cloned into new mount, network (empty), PID, IPC and UTS namespaces; it
/// is PID 1 of its PID namespace, so its death ends every process it forked.
pub const NAMESPACES: u64 =
    (libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) as u64;

/// The frontend's inheritance: the bound, listening RPC socket and its end of the broker
/// channel (SOCK_SEQPACKET).
pub const LISTEN_FD: i32 = 3;
pub const BROKER_FD: i32 = 4;
/// The fd the launcher finds the pinned frontend binary at (O_PATH); it is exec'd through it.
pub const EXE_FD: i32 = 5;
/// The fd the launcher reports a failed step on (the broker's spawn path reads it until the
/// frontend's exec closes it), so that a frontend that cannot be confined is a failed start.
pub const REPORT_FD: i32 = 6;

/// The frontend launcher's keep-list, (source fd, target fd): stdout and stderr stay the
/// daemon's, then the RPC listener, the broker channel and the pinned frontend binary. The
/// report pipe (REPORT_FD) is added by the spawn path.
pub fn keep_list(listen: i32, channel: i32, exe: i32) -> Vec<(i32, i32)> {
    vec![(1, 1), (2, 2), (listen, LISTEN_FD), (channel, BROKER_FD), (exe, EXE_FD)]
}

/// Read and list: the shared libraries the frontend links against, and the loader's cache.
pub const LIB_PATHS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache"];

/// The ELF interpreters the kernel may execute for a dynamically linked frontend (Landlock
/// checks the interpreter's exec too). No other program may be executed.
pub const LOADERS: &[&str] = &[
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/ld-linux-aarch64.so.1",
    "/lib/ld-musl-x86_64.so.1",
    "/lib/ld-musl-aarch64.so.1",
];

/// Everything the frontend is started with, from the daemon's flags.
#[derive(Debug, Clone)]
pub struct FrontendPlan<'a> {
    pub frontend_bin: &'a Path,
    pub state_dir: &'a Path,
    pub console_dir: &'a Path,
    pub image_roots: &'a [PathBuf],
    pub log_format: &'a str,
    /// `--rpc-limit` NAME=VALUE pairs, passed on as `--rpc-NAME=VALUE`.
    pub rpc_limits: &'a [(String, String)],
    pub seccomp: Mode,
    pub landlock_best_effort: bool,
}

impl FrontendPlan<'_> {
    /// The launcher's argv, `launcher` first: its own flags, `--`, then the frontend's argv.
    /// An argument holding a NUL byte is an error.
    pub fn launcher_argv(&self, launcher: &Path) -> Result<Vec<CString>, NulError> {
        let args = std::iter::once(launcher.as_os_str().to_owned()).chain(self.launcher_args());
        args.map(|a| CString::new(a.into_vec())).collect()
    }

    /// The launcher's arguments after its name.
    pub fn launcher_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["--state-dir".into(), self.state_dir.into()];
        v.extend(["--console-dir".into(), self.console_dir.into()]);
        v.extend(["--seccomp".into(), format!("{:?}", self.seccomp).to_lowercase().into()]);
        if self.landlock_best_effort {
            v.push("--landlock-best-effort".into());
        }
        v.extend(["--".into(), self.frontend_bin.into()]);
        v.extend([
            "--listen-fd".into(),
            LISTEN_FD.to_string().into(),
            "--broker-fd".into(),
            BROKER_FD.to_string().into(),
        ]);
        v.extend(["--state-dir".into(), self.state_dir.into(), "--console-dir".into(), self.console_dir.into()]);
        v.extend(["--log-format".into(), self.log_format.into()]);
        for root in self.image_roots {
            v.extend(["--image-root".into(), root.into()]);
        }
        v.extend(self.rpc_limits.iter().map(|(name, value)| match name.starts_with("console-") {
            true => format!("--{name}={value}").into(),
            false => format!("--rpc-{name}={value}").into(),
        }));
        v
    }
}

/// What the frontend binary itself may be: executed and read.
pub fn exe_access() -> BitFlags<AccessFs> {
    AccessFs::Execute | AccessFs::ReadFile
}

/// Every path rule of the frontend's Landlock domain, beside its own binary: read what it
/// needs to run, read-write its state dir, make sockets in its console dir. Everything else
/// (the rest of the file system, the broker's run dir and journal, images) is denied, and so
/// are TCP binds and connects; abstract Unix sockets and signals are scoped to the domain.
pub fn landlock_rules(state_dir: &str, console_dir: &str) -> Vec<Rule> {
    let rule = |path: &str, access, optional| Rule { path: path.to_string(), access, optional };
    let mut v = Vec::new();
    for p in LIB_PATHS {
        let access =
            if p.ends_with(".cache") { AccessFs::ReadFile.into() } else { AccessFs::ReadFile | AccessFs::ReadDir };
        v.push(rule(p, access, true));
    }
    for p in LOADERS {
        v.push(rule(p, AccessFs::Execute | AccessFs::ReadFile, true));
    }
    let state = AccessFs::ReadFile
        | AccessFs::WriteFile
        | AccessFs::ReadDir
        | AccessFs::MakeReg
        | AccessFs::RemoveFile
        | AccessFs::Truncate
        | AccessFs::MakeDir;
    v.push(rule(state_dir, state, false));
    v.push(rule(console_dir, AccessFs::ReadDir | AccessFs::MakeSock | AccessFs::RemoveFile, false));
    v
}

/// ioctls: FIONBIO (std sets sockets non-blocking with it) and TCGETS (is stderr a terminal).
const FRONTEND_IOCTLS: &[u64] = &[0x5421, 0x5401];
/// socketpair(2)'s type (tokio's signal driver): a connected stream pair, which can reach no
/// address. No datagram socket can be made at all, so none can send to a socket path.
const STREAM_PAIR: &[u64] = &[
    (libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64,
    (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64,
];
/// socket(2)'s type for the console listeners: a Unix stream socket, bound (where Landlock
/// allows: the console dir) and listened on, never connected.
const STREAM_SOCKET: &[u64] = &[
    (libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64,
    (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64,
];
/// clone(2)'s flags (the kernel reads only their low 32 bits), exactly as glibc passes them:
/// a thread (pthread_create), and a process (fork). No namespace flag, no vfork, no
/// CLONE_PARENT: anything else kills.
pub const CLONE_FLAGS: &[u64] = &[
    (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_SETTLS
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID) as u64,
    (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64,
];

/// The frontend's allow-list, written from `strace -f` of the real frontend through the
/// lifecycle and VM-record tests (the launcher's exec, the dynamic loader, Rust's runtime,
/// tokio, the RPC server, the state store, the VMM event readers), plus what a rarer path of
/// the same code makes (a thread's exit, a sleep, realloc's mremap, abort's tgkill, reaping
/// a forked child). Everything else kills: every namespace flag, unshare, setns, mount,
/// ptrace, bpf, io_uring, keys, execve (only the launcher's execveat of the pinned binary,
/// which Landlock confines to that binary), socket and connect (the frontend makes no socket
/// and reaches nothing by address: every channel is an fd it was given), identity changes,
/// kexec, modules, perf and userfaultfd.
pub fn allow_list() -> Vec<Allow> {
    let mut v = Vec::new();
    // The launcher's exec of the frontend, the dynamic loader and libc start-up.
    v.extend(sys!(SYS_execveat, SYS_arch_prctl, SYS_set_tid_address, SYS_set_robust_list, SYS_rseq, SYS_access));
    // Memory, threads, time and signals (tokio's workers and blocking pool).
    v.extend(sys!(
        SYS_brk,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        SYS_futex,
        SYS_exit,
        SYS_exit_group,
        SYS_getpid,
        SYS_gettid,
        SYS_tgkill,
        SYS_wait4,
        SYS_prlimit64,
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_restart_syscall,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_getrandom,
        SYS_eventfd2,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_poll,
    ));
    // Threads and forks, never namespaces; clone3 is answered ENOSYS by the stacked second
    // filter, so that libc falls back to clone, whose flags this one checks.
    v.push(only!(SYS_clone, 0, CLONE_FLAGS));
    v.extend(sys!(SYS_clone3));
    v.push(only!(SYS_prctl, 0, &[libc::PR_SET_NAME as u64]));
    v.push(only!(SYS_ioctl, 1, FRONTEND_IOCTLS));
    // Files (Landlock decides which): the state dir, the VMM event files and logs it was given.
    v.extend(sys!(
        SYS_openat,
        SYS_close,
        SYS_read,
        SYS_write,
        SYS_writev,
        SYS_pread64,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_fsync,
        SYS_fcntl,
        SYS_getdents64,
        SYS_rename,
        SYS_unlink,
        // The serial logs' dir below the state dir, and the console sockets' mode.
        SYS_mkdir,
        SYS_mkdirat,
        SYS_chmod,
        SYS_fchmodat,
    ));
    // Sockets: the RPC listener and the broker channel are inherited, VMM sockets arrive as
    // fds. Clients' credentials are read with SO_PEERCRED.
    v.push(only!(SYS_socketpair, 1, STREAM_PAIR));
    // The console sockets: Unix stream listeners, made in the console dir (Landlock).
    v.push(Allow {
        nr: libc::SYS_socket,
        name: "socket",
        when: When::ArgEqAndIn { first: 0, value: libc::AF_UNIX as u64, arg: 1, values: STREAM_SOCKET },
    });
    v.extend(sys!(SYS_bind, SYS_listen));
    v.extend(sys!(SYS_accept4, SYS_shutdown, SYS_sendmsg, SYS_recvmsg, SYS_sendto, SYS_recvfrom, SYS_getsockopt,));
    v
}

/// The second, stacked filter: clone3 fails with ENOSYS, so that libc falls back to clone,
/// whose flags the first filter checks (clone3's sit in memory, out of a filter's reach).
/// Everything else passes on to the first filter.
pub fn clone3_filter() -> Result<BpfProgram, seccompiler::BackendError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| seccompiler::BackendError::InvalidTargetArch(std::env::consts::ARCH.into()))?;
    let rules = std::collections::BTreeMap::from([(libc::SYS_clone3, vec![])]);
    SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)?.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seccomp::{CLONE_NAMESPACE_FLAGS, compile};

    #[test]
    fn the_keep_list_places_each_fd_at_its_number() {
        let keep = keep_list(70, 71, 72);
        assert_eq!(keep, vec![(1, 1), (2, 2), (70, LISTEN_FD), (71, BROKER_FD), (72, EXE_FD)]);
        let mut targets: Vec<i32> = keep.iter().map(|k| k.1).chain([REPORT_FD]).collect();
        targets.sort();
        targets.dedup();
        assert_eq!(targets.len(), 6, "no two fds share a number, the report pipe's included");
    }

    #[test]
    fn the_list_compiles_once_per_syscall() {
        let list = allow_list();
        assert!(!compile(&list, Mode::Kill).unwrap().is_empty());
        let mut nrs: Vec<i64> = list.iter().map(|a| a.nr).collect();
        nrs.sort();
        nrs.dedup();
        assert_eq!(nrs.len(), list.len(), "no syscall is listed twice");
    }

    #[test]
    fn escapes_are_absent() {
        let nrs: Vec<i64> = allow_list().iter().map(|a| a.nr).collect();
        for forbidden in [
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_bpf,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_execve,
            libc::SYS_connect,
            libc::SYS_kill,
            libc::SYS_setuid,
            libc::SYS_setresuid,
            libc::SYS_setgid,
            libc::SYS_setgroups,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_open_by_handle_at,
            libc::SYS_fsopen,
            libc::SYS_open_tree,
            libc::SYS_move_mount,
        ] {
            assert!(!nrs.contains(&forbidden), "the frontend must not be allowed syscall {forbidden}");
        }
        let clone = allow_list().into_iter().find(|a| a.nr == libc::SYS_clone).unwrap();
        assert!(matches!(clone.when, When::ArgIn { arg: 0, values: CLONE_FLAGS }));
        for flags in CLONE_FLAGS {
            assert_eq!(flags & (CLONE_NAMESPACE_FLAGS | libc::CLONE_PARENT as u64 | libc::CLONE_VFORK as u64), 0);
        }
        assert_eq!(NAMESPACES & !CLONE_NAMESPACE_FLAGS, 0);
        assert!(!clone3_filter().unwrap().is_empty());
        let pair = allow_list().into_iter().find(|a| a.nr == libc::SYS_socketpair).unwrap();
        assert!(matches!(pair.when, When::ArgIn { arg: 1, values: STREAM_PAIR }));
        assert!(STREAM_PAIR.iter().all(|t| t & 0xf == libc::SOCK_STREAM as u64), "stream pairs only");
        // Sockets: Unix streams only, so none can send a datagram to a path or reach a port.
        let socket = allow_list().into_iter().find(|a| a.nr == libc::SYS_socket).unwrap();
        assert!(matches!(
            socket.when,
            When::ArgEqAndIn { first: 0, value, arg: 1, values: STREAM_SOCKET } if value == libc::AF_UNIX as u64
        ));
        assert!(STREAM_SOCKET.iter().all(|t| t & 0xf == libc::SOCK_STREAM as u64), "stream sockets only");
    }

    #[test]
    fn the_launcher_gets_its_flags_then_the_frontends_argv() {
        let roots = [PathBuf::from("/img")];
        let limits =
            [("max-line-bytes".to_string(), "256".to_string()), ("console-log-bytes".to_string(), "65536".to_string())];
        let plan = FrontendPlan {
            frontend_bin: Path::new("/bin/fe"),
            state_dir: Path::new("/s"),
            console_dir: Path::new("/c"),
            image_roots: &roots,
            log_format: "json",
            rpc_limits: &limits,
            seccomp: Mode::Log,
            landlock_best_effort: true,
        };
        let argv = plan.launcher_argv(Path::new("/bin/launcher")).unwrap();
        let args: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args.join(" "),
            "/bin/launcher --state-dir /s --console-dir /c --seccomp log --landlock-best-effort -- /bin/fe --listen-fd 3 \
             --broker-fd 4 --state-dir /s --console-dir /c --log-format json --image-root /img \
             --rpc-max-line-bytes=256 --console-log-bytes=65536"
        );
        let bad = [PathBuf::from("/img\0x")];
        assert!(FrontendPlan { image_roots: &bad, ..plan }.launcher_argv(Path::new("/l")).is_err(), "NUL is refused");
    }

    #[test]
    fn landlock_grants_no_more_than_it_says() {
        let rules = landlock_rules("/run/x/vms", "/run/x/console");
        let exec: Vec<&str> =
            rules.iter().filter(|r| r.access.contains(AccessFs::Execute)).map(|r| r.path.as_str()).collect();
        assert_eq!(exec, LOADERS, "only the ELF loaders are executable beside the binary");
        let writable: Vec<&str> = rules
            .iter()
            .filter(|r| r.access.intersects(AccessFs::WriteFile | AccessFs::MakeReg))
            .map(|r| r.path.as_str())
            .collect();
        assert_eq!(writable, ["/run/x/vms"]);
        let socks: Vec<&str> =
            rules.iter().filter(|r| r.access.contains(AccessFs::MakeSock)).map(|r| r.path.as_str()).collect();
        assert_eq!(socks, ["/run/x/console"]);
        assert!(rules.iter().all(|r| !r.path.starts_with("/etc/") || r.path == "/etc/ld.so.cache"));
    }
}
