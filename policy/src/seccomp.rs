//! seccomp allow-lists, as data. Nothing here installs a filter: the broker and the VMM
//! launcher compile these lists and apply them to themselves.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// What happens on a syscall outside the list. `Kill` in production; `Log` (allow and log to
/// the kernel audit log) serves debugging a missing entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Kill,
    Log,
}

/// A syscall allowed outright, or only when argument `arg` equals one of `values`.
pub enum Allow {
    Any(i64),
    ArgIn { nr: i64, arg: u8, values: &'static [u64] },
}

/// The ioctls the broker issues: the KVM check, and tap set-up (linux/kvm.h, if_tun.h,
/// sockios.h).
const BROKER_IOCTLS: &[u64] = &[
    0xAE00,      // KVM_GET_API_VERSION
    0xAE03,      // KVM_CHECK_EXTENSION
    0x4004_54ca, // TUNSETIFF
    0x8913,      // SIOCGIFFLAGS
    0x8914,      // SIOCSIFFLAGS
    0x8922,      // SIOCSIFMTU
    0x8933,      // SIOCGIFINDEX
    0x89a2,      // SIOCBRADDIF
];

/// The broker after start-up: it serves requests in one thread and never forks or execs
/// (the spawn helper, forked before this filter goes on, does that).
pub fn broker_allow_list() -> Vec<Allow> {
    use Allow::*;
    vec![
        // Memory and the Rust runtime.
        Any(libc::SYS_brk),
        Any(libc::SYS_mmap),
        Any(libc::SYS_munmap),
        Any(libc::SYS_mremap),
        Any(libc::SYS_mprotect),
        Any(libc::SYS_madvise),
        Any(libc::SYS_futex),
        Any(libc::SYS_getrandom),
        Any(libc::SYS_sigaltstack),
        Any(libc::SYS_rt_sigaction),
        Any(libc::SYS_rt_sigprocmask),
        Any(libc::SYS_rt_sigreturn),
        Any(libc::SYS_exit),
        Any(libc::SYS_exit_group),
        Any(libc::SYS_getpid),
        Any(libc::SYS_gettid),
        Any(libc::SYS_clock_gettime),
        Any(libc::SYS_clock_nanosleep),
        // The main loop: signalfd, poll, the channels and the logs.
        Any(libc::SYS_poll),
        Any(libc::SYS_ppoll),
        Any(libc::SYS_read),
        Any(libc::SYS_write),
        Any(libc::SYS_writev),
        Any(libc::SYS_close),
        Any(libc::SYS_fcntl),
        Any(libc::SYS_recvmsg),
        Any(libc::SYS_sendmsg),
        Any(libc::SYS_signalfd4),
        Any(libc::SYS_wait4),
        Any(libc::SYS_waitid),
        // Files: images, runtime dirs, the journal.
        Any(libc::SYS_openat),
        Any(libc::SYS_openat2),
        Any(libc::SYS_fstat),
        Any(libc::SYS_newfstatat),
        Any(libc::SYS_statx),
        Any(libc::SYS_lseek),
        Any(libc::SYS_getdents64),
        Any(libc::SYS_mkdirat),
        Any(libc::SYS_unlinkat),
        Any(libc::SYS_renameat2),
        Any(libc::SYS_rename),
        Any(libc::SYS_fchown),
        Any(libc::SYS_fchownat),
        Any(libc::SYS_fchmod),
        Any(libc::SYS_fsync),
        Any(libc::SYS_fgetxattr),
        Any(libc::SYS_fsetxattr),
        Any(libc::SYS_fremovexattr),
        Any(libc::SYS_readlink),
        Any(libc::SYS_readlinkat),
        // Sockets: Unix only (VMM sockets, the ioctl control socket).
        ArgIn { nr: libc::SYS_socket, arg: 0, values: &[libc::AF_UNIX as u64] },
        ArgIn { nr: libc::SYS_socketpair, arg: 0, values: &[libc::AF_UNIX as u64] },
        Any(libc::SYS_connect),
        Any(libc::SYS_bind),
        Any(libc::SYS_listen),
        // Processes the broker spawned: pidfds and signals.
        Any(libc::SYS_pidfd_open),
        Any(libc::SYS_pidfd_send_signal),
        Any(libc::SYS_kill),
        ArgIn { nr: libc::SYS_ioctl, arg: 1, values: BROKER_IOCTLS },
    ]
}

/// Compiles an allow-list for x86_64 or aarch64; anything else gets `mode`'s action.
pub fn compile(list: &[Allow], mode: Mode) -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in list {
        match a {
            Allow::Any(nr) => {
                rules.insert(*nr, vec![]);
            }
            Allow::ArgIn { nr, arg, values } => {
                let r: Result<Vec<_>, _> = values
                    .iter()
                    .map(|v| {
                        SeccompRule::new(vec![SeccompCondition::new(
                            *arg,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::Eq,
                            *v,
                        )?])
                    })
                    .collect();
                rules.insert(*nr, r?);
            }
        }
    }
    let mismatch = match mode {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| seccompiler::BackendError::InvalidTargetArch(std::env::consts::ARCH.into()))?;
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_filter_compiles_and_has_no_spawn_syscalls() {
        let list = broker_allow_list();
        assert!(!compile(&list, Mode::Kill).unwrap().is_empty());
        let nrs: Vec<i64> = list
            .iter()
            .map(|a| match a {
                Allow::Any(n) | Allow::ArgIn { nr: n, .. } => *n,
            })
            .collect();
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
            assert!(!nrs.contains(&forbidden), "syscall {forbidden} must not be allowed");
        }
    }
}
