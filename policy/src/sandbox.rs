//! The box each cloud-hypervisor runs in, as data: what the broker's spawn path sets up
//! (namespaces, a private /dev, covered directories, the VM's uid), and what the launcher
//! applies before it execs CH (rlimits, Landlock, seccomp). [`SandboxSpec::report`] is the
//! text `my_hypervisor-vmm-launcher --explain` prints, and what the broker stores at spawn.

use std::ffi::{CString, OsStr};
use std::fmt::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use landlock::{ABI, AccessFs, BitFlags};
use serde::{Deserialize, Serialize};

use crate::elf;
use crate::layout::VM_RUN_DIR_MODE;
use crate::seccomp::{self, When};
use crate::vmm::{VMM_API_FD, VMM_EVENT_FD, VMM_FIRST_TAP_FD, VmmPlan};
use crate::vmm_filter;

/// The Landlock ABI the rules target (Linux 6.12): filesystem rights with IoctlDev (V5),
/// TCP bind and connect (V4), and scoping of abstract Unix sockets and signals (V6).
pub const LANDLOCK_ABI: ABI = ABI::V6;

/// The namespaces each VMM starts in from its clone: a new PID namespace, of which the VMM
/// is PID 1 (when it dies, the kernel kills everything left in it), and fresh IPC and UTS
/// namespaces. Mount and network namespaces follow in the child, before it drops root.
pub const VMM_CLONE_FLAGS: u64 = (libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) as u64;

/// Where the VMM's minimal root is built, on a fresh tmpfs mounted over this directory in
/// the VMM's own mount namespace, before pivot_root makes it `/`.
pub const ROOT_STAGE: &str = "/tmp";

/// Directories of the host's runtime state (sockets among them) where image roots may not
/// lie. The VMM sees none of them: its minimal root holds only what it needs (ADR 0003).
pub const COVERED_DIRS: &[&str] = &["/run", "/var/run", "/tmp", "/dev/shm"];

/// The VMM's /dev, a fresh tmpfs: (name, char major, minor), each owned by the VM uid.
pub const DEV_NODES: &[(&str, u32, u32)] = &[("kvm", 10, 232), ("urandom", 1, 9), ("null", 1, 3)];

/// (resource, soft = hard limit). No core dumps (guest memory), enough fds for CH (it grows
/// its fd table to 4096 at start), and a cap on tasks for the VM's own uid. RLIMIT_FSIZE is
/// left alone: it would also cap disk-image writes and kill CH with SIGXFSZ.
pub const RLIMITS: &[(&str, u64)] = &[("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", 4096), ("RLIMIT_NPROC", 1024)];

/// Everything that determines a VM's sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub vm: String,
    pub uid: u32,
    /// The cloud-hypervisor binary.
    pub cloud_hypervisor: String,
    /// Its ELF interpreter (PT_INTERP), if it is dynamically linked.
    #[serde(default)]
    pub interpreter: Option<String>,
    pub plan: VmmPlan,
    pub seccomp: seccomp::Mode,
    /// Landlock as a hard requirement (default), or best effort with a warning.
    pub landlock_best_effort: bool,
}

/// What a VMM's minimal root holds besides /dev: `files`, the programs' ELF closure (bound
/// read-only), and `binds`, (path, writable, fd) of the fds the broker holds for its images
/// and its runtime dir (bound noexec, read-only unless writable).
pub struct VmmRoot {
    pub files: Vec<String>,
    pub binds: Vec<(String, bool, std::os::fd::RawFd)>,
}

/// An argv for execve: `program`, then `args`; an argument with a NUL byte is refused.
pub fn c_argv(program: &OsStr, args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Result<Vec<CString>, String> {
    std::iter::once(program.to_owned())
        .chain(args.into_iter().map(|a| a.as_ref().to_owned()))
        .map(|a| CString::new(a.as_bytes()).map_err(|_| "NUL in an argument".to_string()))
        .collect()
}

/// The launcher's arguments: the VM's sandbox spec (JSON), then cloud-hypervisor's argv.
pub fn launcher_args(spec: String, ch_argv: Vec<String>) -> impl Iterator<Item = String> {
    ["--spec".to_string(), spec, "--".to_string()].into_iter().chain(ch_argv)
}

/// Where a VMM's fds go, as (fd, target) pairs: the first, its log, becomes stdout and
/// stderr, the rest its own fds from 3 up (`VMM_API_FD`...). `None` without a log fd.
pub fn vmm_keep_list(fds: &[i32]) -> Option<Vec<(i32, i32)>> {
    let (&log, own) = fds.split_first()?;
    Some([(log, 1), (log, 2)].into_iter().chain(own.iter().copied().zip(3..)).collect())
}

/// A VMM order's fds, laid out as the broker sends them: the VMM's own (`vmm_keep_list`),
/// then one per bind; returns the keep-list and the binds as (path, writable, fd).
pub type VmmFds = (Vec<(i32, i32)>, Vec<(String, bool, i32)>);
pub fn vmm_order_fds(fds: &[i32], binds: Vec<(String, bool)>) -> Result<VmmFds, &'static str> {
    let n = fds.len().checked_sub(binds.len()).ok_or("vmm order has fewer fds than binds")?;
    let keep = vmm_keep_list(&fds[..n]).ok_or("vmm order needs a log fd")?;
    Ok((keep, binds.into_iter().zip(fds[n..].iter().copied()).map(|((p, w), fd)| (p, w, fd)).collect()))
}

/// A keep-list of the spawn helper, whose own fds lie at `floor` and above: only stdio keeps
/// its own number, every other kept fd comes from above the floor and moves below it, so
/// that moving them into place never overwrites one the helper holds.
pub fn check_keep_list(keep: &[(i32, i32)], floor: i32) -> Result<(), String> {
    if keep.iter().any(|&(from, to)| to >= floor || (from < floor && from != to)) {
        return Err(format!("keep-list {keep:?} crosses fd {floor}"));
    }
    Ok(())
}

/// Debugging switches for every VMM's sandbox (flags of the daemon).
#[derive(Debug, Clone, Copy)]
pub struct SandboxOptions {
    pub seccomp: seccomp::Mode,
    pub landlock_best_effort: bool,
}

impl SandboxSpec {
    pub fn new(vm: &str, uid: u32, ch: String, interpreter: Option<String>, plan: VmmPlan, o: SandboxOptions) -> Self {
        let (seccomp, landlock_best_effort) = (o.seccomp, o.landlock_best_effort);
        SandboxSpec { vm: vm.to_string(), uid, cloud_hypervisor: ch, interpreter, plan, seccomp, landlock_best_effort }
    }

    /// cloud-hypervisor's argv: the binary, then the plan's arguments.
    pub fn ch_argv(&self) -> Vec<String> {
        std::iter::once(self.cloud_hypervisor.clone()).chain(self.plan.args()).collect()
    }
}

/// A Landlock rule: a path and the rights granted beneath it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub path: String,
    pub access: BitFlags<AccessFs>,
    /// System paths may be absent on a host (e.g. /lib64); the VM's own paths may not.
    pub optional: bool,
}

/// Each VM's run dir is its own tmpfs, so that a VMM's writes (its log, events and socket
/// nodes) stop at a limit instead of filling the host's /run. The size is above twice the
/// frontend's 64 MiB kill of a VMM whose log or events grow past it, so that backstop can
/// still fire; the inode count bounds the socket nodes a VMM can make.
pub const RUN_DIR_BYTES: u64 = 160 << 20;
pub const RUN_DIR_INODES: u32 = 64;

/// The mount options of a VM's run dir tmpfs (mounted nosuid, nodev, noexec), owned by `uid`.
pub fn run_dir_tmpfs_options(uid: u32) -> String {
    format!("size={RUN_DIR_BYTES},nr_inodes={RUN_DIR_INODES},mode={:o},uid={uid},gid={uid}", VM_RUN_DIR_MODE)
}

/// The real, effective, saved and filesystem uids on the `Uid:` line of a /proc/PID/status.
pub fn status_uids(status: &str) -> Vec<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or_default();
    line.split_whitespace().filter_map(|u| u.parse().ok()).collect()
}

/// True if `path` lies in a directory the VMM's namespace covers.
pub fn hidden_in_vmm(path: &str) -> bool {
    COVERED_DIRS.iter().any(|d| Path::new(path).starts_with(d))
}

impl SandboxSpec {
    /// The only files the VMM may touch, and how.
    pub fn landlock_rules(&self) -> Vec<Rule> {
        let read = BitFlags::from(AccessFs::ReadFile);
        let exec = AccessFs::Execute | AccessFs::ReadFile;
        let rule = |path: &str, access, optional| Rule { path: path.to_string(), access, optional };
        let mut v = vec![rule(&self.cloud_hypervisor, exec, false)];
        v.extend(self.interpreter.iter().map(|i| rule(i, exec, false)));
        // The minimal root holds only the libraries CH and the launcher need (elf::closure).
        v.extend(elf::LIB_DIRS.iter().map(|d| rule(d, read, true)));
        let p = &self.plan;
        for image in [&p.kernel, &p.initramfs, &p.firmware].into_iter().flatten() {
            v.push(rule(image, read, false));
        }
        for (disk, ro) in &p.disks {
            v.push(rule(disk, if *ro { read } else { read | AccessFs::WriteFile }, false));
        }
        let dir =
            AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::ReadDir | AccessFs::MakeSock | AccessFs::RemoveFile;
        v.push(rule(&p.run_dir, dir, false));
        v.push(rule("/dev/kvm", AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev, false));
        v.push(rule("/dev/urandom", read, false));
        v
    }

    /// The exact effective sandbox, as `--explain` prints it.
    pub fn report(&self) -> String {
        let mut r = String::new();
        let w = &mut r;
        let _ = writeln!(w, "sandbox of VM {}", self.vm);
        let _ = writeln!(w, "\n[identity]\nuid {0} gid {0}, no supplementary groups", self.uid);
        let _ = writeln!(w, "capabilities: effective, permitted, inheritable, ambient and bounding sets all empty");
        let _ = writeln!(w, "no_new_privs: set; new session; umask 077; empty environment");
        let _ = writeln!(w, "\n[namespaces]\npid: new; the VMM is its PID 1, and everything in it dies with the VMM");
        let _ = writeln!(w, "ipc, uts: new");
        let _ = writeln!(w, "mount: new, / made MS_REC|MS_PRIVATE");
        let _ = writeln!(w, "network: new and empty (taps arrive as fds)");
        let nodes: Vec<String> = DEV_NODES.iter().map(|(n, ma, mi)| format!("{n} (char {ma}:{mi})")).collect();
        let _ = writeln!(w, "/dev: fresh tmpfs holding only {}, owned by uid {}", nodes.join(", "), self.uid);
        let _ = writeln!(w, "root: pivot_root into a fresh tmpfs, then read-only, holding only:");
        let _ = writeln!(w, "  /dev (above)");
        let _ =
            writeln!(w, "  {} and the launcher's ELF interpreters and libraries (read-only)", self.cloud_hypervisor);
        let _ = writeln!(
            w,
            "  the runtime dir and images, bound from the broker's fds (noexec; disks read-only unless writable)"
        );
        let _ = writeln!(w, "/proc: absent");
        let _ = writeln!(
            w,
            "runtime dir: its own tmpfs of {} MiB and {RUN_DIR_INODES} inodes (nosuid, nodev, noexec)",
            RUN_DIR_BYTES >> 20
        );
        let mode = if self.landlock_best_effort { "best effort" } else { "hard requirement" };
        let _ = writeln!(w, "\n[landlock] ABI {} ({mode}); everything else denied", LANDLOCK_ABI as u32);
        for rule in self.landlock_rules() {
            let rights: Vec<String> = rule.access.iter().map(|a| format!("{a:?}")).collect();
            let opt = if rule.optional { " (if present)" } else { "" };
            let _ = writeln!(w, "{}{opt}: {}", rule.path, rights.join(" "));
        }
        let _ = writeln!(w, "network: TCP bind and connect denied");
        let _ = writeln!(w, "scoped: abstract Unix sockets, signals");
        let _ = writeln!(w, "\n[seccomp] default action: {:?}; architecture checked first", self.seccomp.action());
        let _ = writeln!(w, "filter 2 (stacked, never kills; every call it answers is allowed by filter 1):");
        for (name, _) in vmm_filter::ENOSYS_CALLS {
            let _ = writeln!(w, "  {name} -> ENOSYS");
        }
        let allowed: Vec<String> = vmm_filter::VMM_IOCTLS.iter().map(|(n, v)| format!("{n} ({v:#x})")).collect();
        let _ = writeln!(w, "  ioctl allowed: KVM (type {:#x}), {}", vmm_filter::KVM_IOCTL_TYPE, allowed.join(", "));
        let refused: Vec<&str> = vmm_filter::REFUSED_IOCTLS.iter().map(|r| r.0).collect();
        let answer = match self.seccomp {
            seccomp::Mode::Log => "allowed and logged (debugging)",
            seccomp::Mode::Kill | seccomp::Mode::Errno => "ENOTTY",
        };
        let _ = writeln!(w, "  any other ioctl -> {answer}, among them {}", refused.join(", "));
        let mut list = seccomp::vmm_allow_list();
        list.sort_by_key(|a| a.name);
        for a in list {
            let _ = match a.when {
                When::Always => writeln!(w, "allow {}", a.name),
                When::ArgIn { arg, values } => writeln!(w, "allow {} if arg{arg} in {values:#x?}", a.name),
                When::ArgEqAndIn { first, value, arg, values } => {
                    writeln!(w, "allow {} if arg{first} == {value:#x} and arg{arg} in {values:#x?}", a.name)
                }
                When::ArgMasked { arg, mask, value } => {
                    writeln!(w, "allow {} if arg{arg} & {mask:#x} == {value:#x}", a.name)
                }
            };
        }
        let _ = writeln!(w, "\n[rlimits]");
        for (name, v) in RLIMITS {
            let _ = writeln!(w, "{name} {v}");
        }
        let _ = writeln!(w, "\n[fds]\n0 /dev/null\n1, 2 {}/vmm.log (append)", self.plan.run_dir);
        let _ = writeln!(
            w,
            "{VMM_API_FD} api socket (listening)\n{VMM_EVENT_FD} {}/events.json (append)",
            self.plan.run_dir
        );
        for i in 0..self.plan.nets.len() {
            let _ = writeln!(w, "{} tap {i}", VMM_FIRST_TAP_FD + i as i32);
        }
        let _ = writeln!(w, "\n[exec]\n{} {}", self.cloud_hypervisor, self.plan.args().join(" "));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_gets_its_log_as_stdio_and_its_fds_from_3() {
        assert_eq!(vmm_keep_list(&[70, 71, 72, 73]), Some(vec![(70, 1), (70, 2), (71, 3), (72, 4), (73, 5)]));
        assert_eq!(vmm_keep_list(&[70]), Some(vec![(70, 1), (70, 2)]));
        assert_eq!(vmm_keep_list(&[]), None);
        let args: Vec<String> = launcher_args("{}".into(), vec!["/ch".into(), "--pvpanic".into()]).collect();
        assert_eq!(args, ["--spec", "{}", "--", "/ch", "--pvpanic"]);
    }

    #[test]
    fn a_vmm_order_ends_with_one_fd_per_bind() {
        let binds = || vec![("/img/disk".to_string(), true), ("/run/vm".to_string(), false)];
        let (keep, bound) = vmm_order_fds(&[70, 71, 72, 73], binds()).unwrap();
        assert_eq!(keep, [(70, 1), (70, 2), (71, 3)]);
        assert_eq!(bound, [("/img/disk".to_string(), true, 72), ("/run/vm".to_string(), false, 73)]);
        assert_eq!(vmm_order_fds(&[70, 71], binds()), Err("vmm order needs a log fd"));
        assert_eq!(vmm_order_fds(&[70], binds()), Err("vmm order has fewer fds than binds"));
        assert_eq!(vmm_order_fds(&[70], vec![]).unwrap(), (vec![(70, 1), (70, 2)], vec![]));
    }

    #[test]
    fn an_argv_is_the_program_then_its_args_and_refuses_nul() {
        let argv = c_argv(OsStr::new("/bin/launcher"), ["--spec", "{}"]).unwrap();
        assert_eq!(argv, [c"/bin/launcher", c"--spec", c"{}"]);
        assert_eq!(c_argv(OsStr::new("/p"), ["a\0b"]).unwrap_err(), "NUL in an argument");
    }

    #[test]
    fn a_keep_list_never_crosses_the_floor() {
        assert_eq!(check_keep_list(&[(1, 1), (2, 2), (64, 3), (65, 4)], 64), Ok(()));
        assert!(check_keep_list(&[(64, 64)], 64).is_err(), "to the floor");
        assert!(check_keep_list(&[(5, 3)], 64).is_err(), "from below the floor");
        assert!(check_keep_list(&[(3, 3)], 64).is_ok(), "kept in place");
    }
}
