//! The VMM's second, stacked seccomp filter, as a small hand-built BPF program (seccompiler
//! has one match action per filter; this one needs three answers). It never kills: the
//! first filter (`seccomp::vmm_allow_list`) lists every call named here, so these answers win
//! (the kernel takes the strictest action of all filters, and an errno beats allow and log).
//!
//! - `clone3` -> ENOSYS: its flags sit in memory, out of a filter's reach; libc falls back to
//!   `clone`, whose flags the first filter checks.
//! - `io_uring_setup`, `io_uring_enter`, `io_uring_register` -> ENOSYS: `IORING_OP_SOCKET`
//!   would get around the socket-family check. cloud-hypervisor falls back to AIO.
//! - `ioctl` with a request outside [`VMM_IOCTLS`] and not a KVM request -> ENOTTY (what the
//!   kernel answers an ioctl a file does not know), or, under `--vmm-seccomp log`, allowed and
//!   logged, to check the list against a real cloud-hypervisor. Landlock's IoctlDev right
//!   covers only files opened inside the sandbox, not the tap fds the broker passes.

use seccompiler::{BpfProgram, SeccompAction, sock_filter};

use crate::seccomp::Mode;

/// The ioctl type byte of every KVM request (linux/kvm.h: `_IO(KVMIO, …)`, KVMIO 0xAE).
pub const KVM_IOCTL_TYPE: u32 = 0xAE;

/// The non-KVM ioctl requests a VMM may make (if_tun.h, sockios.h, ioctls.h).
/// cloud-hypervisor calls TUNSETIFF on the tap fd it is passed and ignores EEXIST.
pub const VMM_IOCTLS: &[(&str, u32)] = &[
    ("TUNGETIFF", 0x8004_54d2),
    ("TUNSETIFF", 0x4004_54ca),
    ("TUNSETVNETHDRSZ", 0x4004_54d8),
    ("TUNSETOFFLOAD", 0x4004_54d0),
    ("SIOCGIFMTU", 0x8921),
    ("FIONBIO", 0x5421),
    ("TCGETS", 0x5401),
];

/// Requests the VMM must never make, named in the report; refused because they are not in
/// [`VMM_IOCTLS`] (the filter is an allow-list).
pub const REFUSED_IOCTLS: &[(&str, u32)] = &[
    ("SIOCSIFHWADDR", 0x8924),
    ("TUNSETPERSIST", 0x4004_54cb),
    ("TUNSETOWNER", 0x4004_54cc),
    ("TUNSETLINK", 0x4004_54cd),
    ("TUNSETGROUP", 0x4004_54ce),
    ("TUNATTACHFILTER", 0x4010_54d5),
    ("TUNDETACHFILTER", 0x4010_54d6),
    ("TUNGETFILTER", 0x8010_54db),
    ("TUNSETSTEERINGEBPF", 0x8004_54e0),
    ("TUNSETFILTEREBPF", 0x8004_54e1),
];

/// The calls the filter answers ENOSYS.
pub const ENOSYS_CALLS: &[(&str, i64)] = &[
    ("clone3", libc::SYS_clone3),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
];

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

// struct seccomp_data: nr at 0, arch at 4, args from 16 (8 bytes each); the request is the
// low 32 bits of args[1] (the kernel takes it as an unsigned int).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
#[cfg(target_endian = "little")]
const DATA_ARG1_LOW: u32 = 24;
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_AND_K: u16 = 0x54;
const BPF_RET_K: u16 = 0x06;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jeq(k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code: BPF_JEQ_K, jt, jf, k }
}

/// What an unlisted ioctl gets in `mode`.
pub fn refused_ioctl_action(mode: Mode) -> SeccompAction {
    match mode {
        Mode::Log => SeccompAction::Log,
        Mode::Kill | Mode::Errno => SeccompAction::Errno(libc::ENOTTY as u32),
    }
}

/// The second filter. Another architecture's calls pass to the first filter, which kills
/// them.
pub fn vmm_second_filter(mode: Mode) -> BpfProgram {
    let allow = u32::from(SeccompAction::Allow);
    let mut p = vec![stmt(BPF_LD_W_ABS, DATA_ARCH), jeq(AUDIT_ARCH, 1, 0), stmt(BPF_RET_K, allow)];
    p.push(stmt(BPF_LD_W_ABS, DATA_NR));
    for (_, nr) in ENOSYS_CALLS {
        p.push(jeq(*nr as u32, 0, 1));
        p.push(stmt(BPF_RET_K, u32::from(SeccompAction::Errno(libc::ENOSYS as u32))));
    }
    p.push(jeq(libc::SYS_ioctl as u32, 1, 0));
    p.push(stmt(BPF_RET_K, allow));
    p.push(stmt(BPF_LD_W_ABS, DATA_ARG1_LOW));
    // Each listed request jumps to the final allow: past the rest of the list, the type
    // check (and, jeq) and the refusal.
    let n = VMM_IOCTLS.len();
    for (i, (_, req)) in VMM_IOCTLS.iter().enumerate() {
        p.push(jeq(*req, (n - i + 2) as u8, 0));
    }
    p.push(stmt(BPF_AND_K, 0xff00));
    p.push(jeq(KVM_IOCTL_TYPE << 8, 1, 0));
    p.push(stmt(BPF_RET_K, u32::from(refused_ioctl_action(mode))));
    p.push(stmt(BPF_RET_K, allow));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on (nr, request) as the kernel would; only the opcodes it uses.
    fn run(p: &BpfProgram, arch: u32, nr: i64, req: u64) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &p[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    acc = match i.k {
                        DATA_NR => nr as u32,
                        DATA_ARCH => arch,
                        DATA_ARG1_LOW => req as u32,
                        k => panic!("load of {k}"),
                    }
                }
                BPF_JEQ_K => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
                BPF_AND_K => acc &= i.k,
                BPF_RET_K => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn answers() {
        let allow = u32::from(SeccompAction::Allow);
        let enosys = u32::from(SeccompAction::Errno(libc::ENOSYS as u32));
        let enotty = u32::from(SeccompAction::Errno(libc::ENOTTY as u32));
        let p = vmm_second_filter(Mode::Kill);
        for (_, nr) in ENOSYS_CALLS {
            assert_eq!(run(&p, AUDIT_ARCH, *nr, 0), enosys);
        }
        for (name, req) in VMM_IOCTLS {
            assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_ioctl, u64::from(*req)), allow, "{name}");
            // The high half of the argument is ignored, as the kernel does.
            assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_ioctl, 0xffff_ffff_0000_0000 | u64::from(*req)), allow);
        }
        for kvm in [0xAE01u64, 0xAE80, 0x4020_AE46, 0xC008_AE05] {
            assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_ioctl, kvm), allow, "{kvm:#x}");
        }
        for (name, req) in REFUSED_IOCTLS {
            assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_ioctl, u64::from(*req)), enotty, "{name}");
            assert!(!VMM_IOCTLS.iter().any(|(_, r)| r == req), "{name}");
        }
        for other in [libc::SYS_read, libc::SYS_clone, libc::SYS_openat] {
            assert_eq!(run(&p, AUDIT_ARCH, other, 0), allow);
        }
        assert_eq!(run(&p, 0x4000_0003, libc::SYS_clone3, 0), allow, "another arch goes to filter 1");
        let log = vmm_second_filter(Mode::Log);
        assert_eq!(run(&log, AUDIT_ARCH, libc::SYS_ioctl, 0x4004_54cb), u32::from(SeccompAction::Log));
        assert_eq!(run(&log, AUDIT_ARCH, libc::SYS_io_uring_setup, 0), enosys);
    }

    #[test]
    fn the_first_filter_lets_every_answered_call_through() {
        let first = crate::seccomp::vmm_allow_list();
        for (name, nr) in ENOSYS_CALLS.iter().copied().chain([("ioctl", libc::SYS_ioctl)]) {
            assert!(first.iter().any(|a| a.nr == nr), "{name} must be in the first filter, or it kills");
        }
    }

    #[test]
    fn named_numbers_match_the_kernel_headers() {
        assert_eq!(VMM_IOCTLS[1].1 as u64, libc::TUNSETIFF);
        assert_eq!(REFUSED_IOCTLS[1].1 as u64, libc::TUNSETPERSIST);
        assert_eq!(REFUSED_IOCTLS[0].1 as u64, libc::SIOCSIFHWADDR);
        assert_eq!(VMM_IOCTLS[5].1 as u64, libc::FIONBIO);
    }
}
