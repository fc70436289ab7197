//! Steps that run in a forked child just before it execs an unprivileged program: put the
//! kept fds in place, then shed every privilege for good. Used for the frontend, and for the
//! VMM launcher after its namespaces are set up.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use caps::CapSet;
use my_hypervisor_policy::layout::Ids;
use my_hypervisor_policy::sandbox::{COVERED_DIRS, DEV_NODES, hidden_in_vmm, run_dir_tmpfs_options};
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
        let t = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, SCRATCH) };
        if t < 0 {
            return Err(io::Error::last_os_error());
        }
        tmp.push((t, target));
    }
    let first_free = fds.iter().map(|f| f.1 + 1).max().unwrap_or(3).max(3);
    // SAFETY: only marks fds close-on-exec; no fd is closed under anyone's feet.
    if unsafe { libc::close_range(first_free as u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) } < 0 {
        return Err(io::Error::last_os_error());
    }
    for (t, target) in tmp {
        // SAFETY: dup2 onto a number the keep-list reserves; the scratch fd is CLOEXEC.
        if unsafe { libc::dup2(t, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Gives the new program default signal handling: nothing blocked (the broker blocks the
/// signals it reads from a signalfd) and nothing ignored (ignored signals survive exec).
pub fn reset_signals() -> io::Result<()> {
    for sig in nix::sys::signal::Signal::iterator() {
        if matches!(sig, nix::sys::signal::Signal::SIGKILL | nix::sys::signal::Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL involves no handler code.
        unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) }.map_err(io::Error::from)?;
    }
    nix::sys::signal::SigSet::empty().thread_set_mask().map_err(io::Error::from)
}

/// The VMM's box, built as root in the child (already PID 1 of its own PID namespace, with
/// fresh IPC and UTS namespaces) before it becomes the VM's uid: a new mount namespace with /
/// made private, a fresh /proc, a neutral hostname, a fresh /dev holding only what `DEV_NODES` lists (made
/// with mknod: bind mounts would change the host's nodes), empty tmpfs over `COVERED_DIRS`
/// with the VM's runtime dir bind-mounted back, and a new, empty network namespace.
pub fn enter_vmm_namespaces(uid: u32, run_dir: &str) -> io::Result<()> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let step = |what: &'static str| move |e: nix::errno::Errno| io_err(what, e);
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET)
        .map_err(step("unshare mount and network namespaces"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(step("make / private"))?;
    // A procfs of the new PID namespace (this process is its PID 1): it lists only the VMM's
    // own processes, and nothing but them (subset=pid).
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), proc_flags, Some("hidepid=invisible,subset=pid"))
        .map_err(step("mount a fresh /proc"))?;
    // SAFETY: sethostname reads exactly `len` bytes from a static string.
    if unsafe { libc::sethostname(c"vmm".as_ptr(), 3) } != 0 {
        return Err(io_err("set the hostname", io::Error::last_os_error()));
    }
    // Opened inside the new namespace, before /run is covered, to bind it back afterwards.
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = nix::fcntl::open(run_dir, flags, Mode::empty()).map_err(step("open runtime dir"))?;
    let tmpfs = |at: &str, flags: MsFlags, opts: &str| {
        mount(Some("tmpfs"), at, Some("tmpfs"), flags | MsFlags::MS_NOSUID, Some(opts)).map_err(step("mount tmpfs"))
    };
    tmpfs("/dev", MsFlags::MS_NOEXEC, "mode=0755,size=64k")?;
    for (name, major, minor) in DEV_NODES {
        let node = format!("/dev/{name}");
        let dev = makedev((*major).into(), (*minor).into());
        mknod(node.as_str(), SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), dev).map_err(step("mknod"))?;
        nix::unistd::chown(node.as_str(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)))
            .map_err(step("chown dev node"))?;
    }
    std::fs::create_dir("/dev/shm").map_err(|e| io_err("create /dev/shm", e))?;
    for covered in COVERED_DIRS {
        if std::path::Path::new(covered).exists() {
            tmpfs(covered, MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, "mode=0755,size=1m")?;
        }
    }
    if hidden_in_vmm(run_dir) {
        let mkdir = std::fs::DirBuilder::new().recursive(true).create(run_dir);
        mkdir.map_err(|e| io_err("create the runtime dir's mount point", e))?;
        let src = format!("/proc/self/fd/{}", dir.as_raw_fd());
        mount(Some(src.as_str()), run_dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(step("bind-mount the runtime dir"))?;
    }
    Ok(())
}

/// In the spawn helper: mounts a VM's run dir tmpfs, owned by `uid`, over the directory `dir`
/// names; or, with no uid, lazily unmounts the tmpfs at `dir` (the broker and the frontend
/// may still hold files of it; it is freed when they close them).
pub fn run_dir_tmpfs(uid: Option<u32>, dir: &OwnedFd) -> Result<(), String> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let at = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match uid {
        Some(uid) => mount(Some("tmpfs"), at.as_str(), Some("tmpfs"), flags, Some(run_dir_tmpfs_options(uid).as_str()))
            .map_err(|e| format!("mount the run dir's tmpfs: {e}")),
        None => umount2(at.as_str(), MntFlags::MNT_DETACH).map_err(|e| format!("unmount the run dir's tmpfs: {e}")),
    }
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
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io_err("no_new_privs", io::Error::last_os_error()));
    }
    Ok(())
}
