//! seccomp allow-lists, as data. Nothing here installs a filter: the broker and the VMM
//! launcher compile these lists and apply them to themselves.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// What happens on a syscall outside the list. `Kill` in production; `Log` (allow and log to
/// the kernel audit log) and `Errno` (fail with EPERM) serve debugging a missing entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    Kill,
    Log,
    Errno,
}

impl Mode {
    pub fn action(self) -> SeccompAction {
        match self {
            Mode::Kill => SeccompAction::KillProcess,
            Mode::Log => SeccompAction::Log,
            Mode::Errno => SeccompAction::Errno(libc::EPERM as u32),
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "errno" => Ok(Mode::Errno),
            _ => Err(format!("{s:?} is not one of kill, log, errno")),
        }
    }
}

/// One allowed syscall, by number and name.
pub struct Allow {
    pub nr: i64,
    pub name: &'static str,
    pub when: When,
}

/// When an allowed syscall is allowed.
#[derive(Debug)]
pub enum When {
    Always,
    /// Argument `arg` equals one of `values`.
    ArgIn {
        arg: u8,
        values: &'static [u64],
    },
    /// Argument `first` equals `value`, and argument `arg` equals one of `values`.
    ArgEqAndIn {
        first: u8,
        value: u64,
        arg: u8,
        values: &'static [u64],
    },
    /// Argument `arg` masked with `mask` equals `value`.
    ArgMasked {
        arg: u8,
        mask: u64,
        value: u64,
    },
}

/// `sys!(SYS_read, SYS_write)`: those syscalls, allowed always.
macro_rules! sys {
    ($($name:ident),* $(,)?) => {
        vec![$(Allow { nr: libc::$name, name: &stringify!($name)[4..], when: When::Always }),*]
    };
}

/// `only!(SYS_socket, 0, [..])`: allowed when argument 0 is one of the values.
macro_rules! only {
    ($name:ident, $arg:expr, $values:expr) => {
        Allow { nr: libc::$name, name: &stringify!($name)[4..], when: When::ArgIn { arg: $arg, values: $values } }
    };
}
pub(crate) use {only, sys};

/// The ioctls the broker issues: the KVM check, and tap set-up and deletion (linux/kvm.h,
/// if_tun.h, sockios.h).
const BROKER_IOCTLS: &[u64] = &[
    crate::vmm::KVM_GET_API_VERSION,
    crate::vmm::KVM_CHECK_EXTENSION,
    crate::net::TUNSETIFF,
    crate::net::TUNSETPERSIST, // clearing it, at release
    libc::SIOCGIFFLAGS,
    libc::SIOCSIFFLAGS,
    libc::SIOCSIFMTU,
    libc::SIOCGIFINDEX,
    crate::net::SIOCBRADDIF,
];
const UNIX_ONLY: &[u64] = &[libc::AF_UNIX as u64];

/// The broker after start-up: it serves requests in one thread and never forks or execs
/// (the spawn helper, forked before this filter goes on, does that).
pub fn broker_allow_list() -> Vec<Allow> {
    let mut v = Vec::new();
    // Memory and the Rust runtime.
    v.extend(sys!(
        SYS_brk,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        SYS_futex,
        SYS_getrandom,
        SYS_sigaltstack,
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_exit,
        SYS_exit_group,
        SYS_getpid,
        SYS_gettid,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
    ));
    // The main loop: signalfd, poll, the channels and the logs.
    v.extend(sys!(
        SYS_poll,
        SYS_ppoll,
        SYS_read,
        SYS_write,
        SYS_writev,
        SYS_close,
        SYS_fcntl,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_signalfd4,
        SYS_wait4,
        SYS_waitid,
    ));
    // Files: images, runtime dirs, the journal; fallocate trims a VMM's log (TrimLog).
    v.extend(sys!(
        SYS_openat,
        SYS_openat2,
        SYS_fallocate,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_lseek,
        SYS_getdents64,
        SYS_mkdirat,
        SYS_unlinkat,
        SYS_renameat2,
        SYS_rename,
        SYS_fchown,
        SYS_fchownat,
        SYS_fchmod,
        SYS_fsync,
        SYS_fgetxattr,
        SYS_fsetxattr,
        SYS_fremovexattr,
        SYS_readlink,
        SYS_readlinkat,
    ));
    // Sockets: Unix only (VMM sockets, the api listener, the ioctl control socket).
    v.push(only!(SYS_socket, 0, UNIX_ONLY));
    v.push(only!(SYS_socketpair, 0, UNIX_ONLY));
    // SO_PASSRIGHTS (83) off on each new frontend channel: requests never carry fds.
    v.push(only!(SYS_setsockopt, 2, &[crate::net::SO_PASSRIGHTS as u64]));
    v.extend(sys!(SYS_connect, SYS_bind, SYS_listen));
    // Processes the broker spawned: pidfds and signals.
    v.extend(sys!(SYS_pidfd_open, SYS_pidfd_send_signal, SYS_kill));
    v.push(only!(SYS_ioctl, 1, BROKER_IOCTLS));
    v
}

/// Every namespace flag of clone(2): a VMM creates threads, never namespaces or processes.
pub const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64
    | 0x80; // CLONE_NEWTIME

/// prctl options cloud-hypervisor and the Rust runtime use: thread names, no_new_privs
/// (before CH installs its per-thread filters) and core scheduling (v52+ vCPU threads).
const VMM_PRCTL: &[u64] = &[
    libc::PR_SET_NAME as u64,
    libc::PR_GET_NAME as u64,
    libc::PR_SET_NO_NEW_PRIVS as u64,
    libc::PR_GET_NO_NEW_PRIVS as u64,
    62, // PR_SCHED_CORE
];
/// The clone flags a VMM's clone is checked on: CLONE_THREAD must be set, every namespace
/// flag clear.
pub const CLONE_THREAD_ONLY_MASK: u64 = CLONE_NAMESPACE_FLAGS | libc::CLONE_THREAD as u64;
const SOCKET_FAMILIES: &[u64] = &[libc::AF_UNIX as u64, libc::AF_INET as u64, libc::AF_INET6 as u64];

/// The VMM's allow-list: a superset of cloud-hypervisor v50+'s per-thread filters (its
/// `vmm/src/seccomp_filters.rs` and `virtio-devices/src/seccomp_filters.rs`), of what its
/// unfiltered main thread and the dynamic loader call, and of its boot-time probes. CH keeps
/// `--seccomp true` and stacks its own narrower per-thread filters on top. Namespaces,
/// ptrace, mount, kexec, bpf, modules, keys and identity changes are absent, so they kill.
pub fn vmm_allow_list() -> Vec<Allow> {
    let mut v = Vec::new();
    // The launcher's exec of cloud-hypervisor, then the dynamic loader and libc start-up.
    // Landlock allows executing the CH binary and nothing else.
    v.extend(sys!(
        SYS_execve,
        SYS_arch_prctl,
        SYS_set_tid_address,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_prlimit64,
        SYS_access,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        SYS_uname,
        SYS_sysinfo,
    ));
    // Memory, threads, time and signals (every CH thread).
    v.extend(sys!(
        SYS_brk,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        SYS_mbind,
        SYS_membarrier,
        SYS_futex,
        SYS_exit,
        SYS_exit_group,
        SYS_getpid,
        SYS_gettid,
        SYS_getpgid,
        SYS_getpgrp,
        SYS_setsid,
        SYS_kill,
        SYS_tgkill,
        SYS_tkill,
        SYS_wait4,
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_restart_syscall,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_sched_setaffinity,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_gettimeofday,
        SYS_getrandom,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_eventfd2,
        SYS_umask,
    ));
    // Threads only: clone must carry CLONE_THREAD (which the kernel accepts only with
    // CLONE_SIGHAND and CLONE_VM) and no namespace flag, so a VMM never forks. clone3 is
    // allowed here and answered ENOSYS by the second filter (its flags sit in memory, out
    // of a filter's reach), so that libc falls back to clone.
    v.push(Allow {
        nr: libc::SYS_clone,
        name: "clone",
        when: When::ArgMasked { arg: 0, mask: CLONE_THREAD_ONLY_MASK, value: libc::CLONE_THREAD as u64 },
    });
    v.extend(sys!(SYS_clone3));
    v.push(only!(SYS_prctl, 0, VMM_PRCTL));
    // Files: images, its runtime dir, /dev/kvm, /dev/urandom (Landlock decides which). ioctl
    // is listed here so it never kills; the second filter allows it by request number.
    v.extend(sys!(
        SYS_open,
        SYS_openat,
        SYS_close,
        SYS_close_range,
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_lseek,
        SYS_fstat,
        SYS_stat,
        SYS_newfstatat,
        SYS_statx,
        SYS_statfs,
        SYS_fstatfs,
        SYS_fallocate,
        SYS_ftruncate,
        SYS_fsync,
        SYS_fdatasync,
        SYS_fcntl,
        SYS_dup,
        SYS_dup2,
        SYS_dup3,
        SYS_pipe2,
        SYS_getdents64,
        SYS_getcwd,
        SYS_readlink,
        SYS_readlinkat,
        SYS_unlink,
        SYS_unlinkat,
        SYS_memfd_create,
        SYS_ioctl,
    ));
    // Event loops and sockets: the api, serial and vsock sockets. Inet sockets only ever see
    // an empty network namespace, and Landlock denies every TCP bind and connect.
    v.extend(sys!(
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_poll,
        SYS_ppoll,
        SYS_accept4,
        SYS_bind,
        SYS_listen,
        SYS_connect,
        SYS_shutdown,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_sendto,
        SYS_recvfrom,
        SYS_setsockopt,
        SYS_getsockopt,
        SYS_getsockname,
        SYS_socketpair,
    ));
    v.push(only!(SYS_socket, 0, SOCKET_FAMILIES));
    // Disk I/O back-ends CH probes at the first disk open. The io_uring calls are listed so
    // they never kill: the second filter answers them ENOSYS (IORING_OP_SOCKET would get
    // around the socket-family check), and CH falls back to AIO.
    v.extend(sys!(
        SYS_io_setup,
        SYS_io_destroy,
        SYS_io_submit,
        SYS_io_getevents,
        SYS_io_cancel,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
    ));
    // CH installs its own per-thread filters, and Landlock if asked to.
    v.extend(sys!(SYS_seccomp, SYS_landlock_create_ruleset, SYS_landlock_add_rule, SYS_landlock_restrict_self));
    v
}

pub(crate) fn arch() -> Result<seccompiler::TargetArch, seccompiler::BackendError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| seccompiler::BackendError::InvalidTargetArch(std::env::consts::ARCH.into()))
}

/// Compiles an allow-list for this machine's architecture (the filter checks the arch
/// first); anything else gets `mode`'s action.
pub fn compile(list: &[Allow], mode: Mode) -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in list {
        let r = match a.when {
            When::Always => vec![],
            When::ArgIn { arg, values } => values
                .iter()
                .map(|v| {
                    SeccompRule::new(vec![SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)?])
                })
                .collect::<Result<_, _>>()?,
            When::ArgEqAndIn { first, value, arg, values } => values
                .iter()
                .map(|v| {
                    SeccompRule::new(vec![
                        SeccompCondition::new(first, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?,
                        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)?,
                    ])
                })
                .collect::<Result<_, _>>()?,
            When::ArgMasked { arg, mask, value } => {
                let c = SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(mask), value)?;
                vec![SeccompRule::new(vec![c])?]
            }
        };
        rules.insert(a.nr, r);
    }
    SeccompFilter::new(rules, mode.action(), SeccompAction::Allow, arch()?)?.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nrs(list: &[Allow]) -> Vec<i64> {
        list.iter().map(|a| a.nr).collect()
    }

    #[test]
    fn filters_compile_and_names_match() {
        for list in [broker_allow_list(), vmm_allow_list()] {
            assert!(!compile(&list, Mode::Kill).unwrap().is_empty());
            let mut seen = nrs(&list);
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), list.len(), "no syscall is listed twice");
        }
        let v = vmm_allow_list();
        let read = v.iter().find(|a| a.nr == libc::SYS_read).unwrap();
        assert_eq!(read.name, "read");
    }

    #[test]
    fn dangerous_syscalls_are_absent() {
        let broker = nrs(&broker_allow_list());
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_setuid,
            libc::SYS_unshare,
            libc::SYS_mount,
            libc::SYS_ptrace,
        ] {
            assert!(!broker.contains(&forbidden), "broker must not allow syscall {forbidden}");
        }
        let vmm = nrs(&vmm_allow_list());
        for forbidden in [
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_setuid,
            libc::SYS_setresuid,
            libc::SYS_setgid,
            libc::SYS_setgroups,
            libc::SYS_chroot,
            libc::SYS_pivot_root,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_perf_event_open,
        ] {
            assert!(!vmm.contains(&forbidden), "VMM must not allow syscall {forbidden}");
        }
    }
}
