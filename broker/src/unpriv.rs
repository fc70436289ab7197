//! Steps that run in a forked child just before it execs an unprivileged program: put the
//! kept fds in place, then shed every privilege for good. Used for the frontend, and for the
//! VMM launcher after its namespaces are set up.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use caps::CapSet;
use my_hypervisor_policy::layout::Ids;
use my_hypervisor_policy::sandbox::{DEV_NODES, ROOT_STAGE, VmmRoot, run_dir_tmpfs_options};
use nix::fcntl::OFlag;
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

fn io_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Moves each `(source, target)` fd to its target number (without CLOEXEC) and marks every
/// other fd from 3 up close-on-exec, so that only the keep-list survives the exec.
pub fn place_fds(fds: &[(RawFd, RawFd)]) -> io::Result<()> {
    const SCRATCH: RawFd = 64;
    let mut tmp = Vec::with_capacity(fds.len());
    for &(src, target) in fds {
        assert!(target < SCRATCH, "fd targets are small numbers");
        // SAFETY: F_DUPFD_CLOEXEC only creates a new fd; `src` is owned by the caller.
        tmp.push((sys("dup a kept fd", unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, SCRATCH) }.into())?, target));
    }
    let first_free = fds.iter().map(|f| f.1 + 1).max().unwrap_or(3).max(3);
    // SAFETY: only marks fds close-on-exec; no fd is closed under anyone's feet.
    let cloexec = unsafe { libc::close_range(first_free as u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    sys("close_range", cloexec.into())?;
    for (t, target) in tmp {
        // SAFETY: dup2 onto a number the keep-list reserves; the scratch fd is CLOEXEC.
        sys("dup2", unsafe { libc::dup2(t as RawFd, target) }.into())?;
    }
    Ok(())
}

/// Gives the new program default signal handling: nothing blocked (the broker blocks the
/// signals it reads from a signalfd) and nothing ignored (ignored signals survive exec).
pub fn reset_signals() -> io::Result<()> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP)) {
        // SAFETY: installing SIG_DFL involves no handler code.
        unsafe { signal(sig, SigHandler::SigDfl) }.map_err(io::Error::from)?;
    }
    nix::sys::signal::SigSet::empty().thread_set_mask().map_err(io::Error::from)
}

/// A detached copy of the mount at `fd` (open_tree with OPEN_TREE_CLONE), made while still
/// in the mount namespace the fd belongs to; `move_mount` attaches it in the new one.
fn clone_mount(fd: RawFd) -> io::Result<OwnedFd> {
    let flags = 1 | libc::O_CLOEXEC | libc::AT_EMPTY_PATH; // OPEN_TREE_CLONE
    // SAFETY: open_tree takes an fd, an empty C string and flags; returns a new fd or -1.
    let r = sys("open_tree", unsafe { libc::syscall(libc::SYS_open_tree, fd, c"".as_ptr(), flags) })?;
    // SAFETY: the kernel just returned this new fd to us.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r as RawFd) })
}

/// A raw syscall's result, or the error with `what` failed.
pub fn sys(what: &str, r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 { Err(io_err(what, io::Error::last_os_error())) } else { Ok(r) }
}

/// The VMM's box, built as root in the child (already PID 1 of its own PID namespace, with
/// fresh IPC and UTS namespaces) before it becomes the VM's uid: new mount and network
/// namespaces, / made private, then a pivot_root into a fresh tmpfs that holds only what
/// `root` lists and a /dev of `DEV_NODES` (made with mknod: bind mounts would change the
/// host's nodes). Every bind is cloned from an fd, never by a path resolved later. No /proc.
pub fn enter_vmm_namespaces(uid: u32, root: &VmmRoot) -> io::Result<()> {
    use nix::mount::{MntFlags, MsFlags as F, mount, umount2};
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let step = |what: &'static str| move |e: nix::errno::Errno| io_err(what, e);
    // (path, detached mount, flags), cloned before the unshare: a mount of another
    // namespace cannot be the source of a bind.
    let mut mounts = Vec::new();
    for f in &root.files {
        let fd = nix::fcntl::open(f.as_str(), OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).map_err(step("open"))?;
        mounts.push((f, clone_mount(fd.as_raw_fd())?, F::MS_RDONLY));
    }
    for (path, writable, fd) in &root.binds {
        mounts.push((path, clone_mount(*fd)?, if *writable { F::MS_NOEXEC } else { F::MS_NOEXEC | F::MS_RDONLY }));
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS | nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(step("unshare mount and network namespaces"))?;
    mount(None::<&str>, "/", None::<&str>, F::MS_REC | F::MS_PRIVATE, None::<&str>).map_err(step("make / private"))?;
    let at = |p: &str| format!("{ROOT_STAGE}{p}");
    let tmpfs = |at: &str, flags: F, opts: &str| {
        mount(Some("tmpfs"), at, Some("tmpfs"), flags | F::MS_NOSUID, Some(opts)).map_err(step("mount tmpfs"))
    };
    tmpfs(ROOT_STAGE, F::MS_NODEV | F::MS_NOEXEC, "mode=0755,size=1m")?;
    std::fs::create_dir(at("/dev")).map_err(|e| io_err("create /dev", e))?;
    tmpfs(&at("/dev"), F::MS_NOEXEC, "mode=0755,size=64k")?;
    for (name, major, minor) in DEV_NODES {
        let node = at(&format!("/dev/{name}"));
        let dev = makedev((*major).into(), (*minor).into());
        mknod(node.as_str(), SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), dev).map_err(step("mknod"))?;
        nix::unistd::chown(node.as_str(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)))
            .map_err(step("chown dev node"))?;
    }
    for (path, mnt, flags) in mounts {
        let target = at(path);
        let parent = std::path::Path::new(&target).parent().ok_or_else(|| io_err(path, "no parent"))?;
        std::fs::create_dir_all(parent).map_err(|e| io_err("create a dir of the new root", e))?;
        let is_dir = nix::sys::stat::fstat(&mnt).map_err(step("fstat"))?.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let made = if is_dir { std::fs::create_dir(&target) } else { std::fs::File::create(&target).map(drop) };
        made.map_err(|e| io_err("create a mount point", e))?;
        let c_target = std::ffi::CString::new(target.as_str()).map_err(|e| io_err("mount point", e))?;
        let (src, dst, cwd, empty_path) = (mnt.as_raw_fd(), c_target.as_ptr(), libc::AT_FDCWD, 4); // MOVE_MOUNT_F_EMPTY_PATH
        // SAFETY: move_mount takes two (dirfd, C string) pairs and flags; both strings
        // outlive the call.
        sys("move_mount", unsafe { libc::syscall(libc::SYS_move_mount, src, c"".as_ptr(), cwd, dst, empty_path) })?;
        let flags = F::MS_BIND | F::MS_REMOUNT | F::MS_NOSUID | F::MS_NODEV | flags;
        mount(None::<&str>, target.as_str(), None::<&str>, flags, None::<&str>).map_err(step("remount a bind"))?;
    }
    nix::unistd::chdir(ROOT_STAGE).map_err(step("enter the new root"))?;
    nix::unistd::pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the old root"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    let ro = F::MS_REMOUNT | F::MS_RDONLY | F::MS_NOSUID | F::MS_NODEV | F::MS_NOEXEC;
    mount(None::<&str>, "/", None::<&str>, ro, None::<&str>).map_err(step("make the new root read-only"))?;
    // SAFETY: sethostname reads exactly `len` bytes from a static string.
    sys("sethostname", unsafe { libc::sethostname(c"vmm".as_ptr(), 3) }.into()).map(drop)
}

/// In the spawn helper: mounts a VM's run dir tmpfs, owned by `uid`, over the directory `dir`
/// names; or, with no uid, lazily unmounts the tmpfs at `dir` (the broker and the frontend
/// may still hold files of it; it is freed when they close them).
pub fn run_dir_tmpfs(uid: Option<u32>, dir: &OwnedFd) -> Result<(), String> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let at = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let r = match uid {
        Some(uid) => mount(Some("tmpfs"), at.as_str(), Some("tmpfs"), flags, Some(run_dir_tmpfs_options(uid).as_str())),
        None => umount2(at.as_str(), MntFlags::MNT_DETACH),
    };
    r.map_err(|e| format!("{} the run dir's tmpfs: {e}", if uid.is_some() { "mount" } else { "unmount" }))
}

/// Becomes `ids` with no supplementary groups, every capability set empty (bounding and
/// ambient included) and no_new_privs set. Fails if any set is not empty afterwards.
pub fn drop_privileges(ids: Ids) -> io::Result<()> {
    setgroups(&[]).map_err(|e| io_err("setgroups", e))?;
    // The bounding set can only be cut while CAP_SETPCAP is still held.
    caps::clear(None, CapSet::Bounding).map_err(|e| io_err("clear bounding set", e))?;
    caps::clear(None, CapSet::Ambient).map_err(|e| io_err("clear ambient set", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| io_err("clear inheritable set", e))?;
    let (g, u) = (Gid::from_raw(ids.gid), Uid::from_raw(ids.uid));
    setresgid(g, g, g).map_err(|e| io_err("setresgid", e))?;
    setresuid(u, u, u).map_err(|e| io_err("setresuid", e))?;
    for set in [CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).map_err(|e| io_err("clear capabilities", e))?;
    }
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable, CapSet::Ambient, CapSet::Bounding] {
        let held = caps::read(None, set).map_err(|e| io_err("read capabilities", e))?;
        if !held.is_empty() {
            return Err(io_err("drop capabilities", format!("{set:?} still holds {held:?}")));
        }
    }
    // SAFETY: plain prctl call with integer arguments.
    sys("no_new_privs", unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into()).map(drop)
}
