//! What PID 1 does to the system: mounts, namespaces (test mode), hostname, the loopback
//! and NIC MTUs, and power-off. Each step logs its failure and the boot goes on.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

fn log(what: &str, e: impl std::fmt::Display) {
    log!("my_hypervisor-init: {what}: {e}");
}

fn mount_one(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    if let Err(e) = std::fs::create_dir_all(target) {
        return log(&format!("mkdir {target}"), e);
    }
    if let Err(e) = mount(Some(source), target, Some(fstype), flags, data) {
        log(&format!("mount {fstype} on {target}"), e);
    }
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

/// The guest's mounts: /proc, /sys, /dev, /dev/pts, /run and /tmp.
pub fn guest_mounts() {
    mount_one("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, None);
    mount_one("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, None);
    mount_one("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"));
    mount_one(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=0620,ptmxmode=0666"),
    );
    mount_one("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"));
    mount_one("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"));
}

/// Test mode: new mount, UTS and network namespaces, `/` made private, then /proc, /sys,
/// /dev, /run and /tmp. Returns whether the namespaces exist: without them nothing is mounted and
/// no hostname or interface is touched, so nothing reaches the host.
pub fn test_namespaces() -> bool {
    let flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWNET;
    if let Err(e) = unshare(flags) {
        log("unshare mount, UTS and network namespaces (skipping mounts, hostname, network)", e);
        return false;
    }
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>) {
        log("making / private (skipping mounts)", e);
        return true;
    }
    mount_one("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, None);
    // sysfs shows the network namespace of its mounter: this one.
    mount_one("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, None);
    // devtmpfs has one superblock, the host's /dev too: no options, which would remount it.
    mount_one("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None);
    mount_one("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"));
    mount_one("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"));
    true
}

pub fn set_hostname(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        log("sethostname", e);
    }
}

/// An `ifreq` with the interface name filled in; None for a name that does not fit.
fn ifreq(name: &str) -> Option<libc::ifreq> {
    // SAFETY: ifreq is plain data (a name array and a union of integers); all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains('\0') {
        return None;
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Some(req)
}

fn ioctl_sock() -> Option<OwnedFd> {
    socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| log("socket for interface ioctls", e))
        .ok()
}

/// Brings `name` up (sets IFF_UP).
pub fn link_up(name: &str) {
    let (Some(sock), Some(mut req)) = (ioctl_sock(), ifreq(name)) else { return };
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write the ifreq we own, which outlives
    // both calls; the union's flags member is the one these requests use.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return log(&format!("SIOCGIFFLAGS {name}"), std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            log(&format!("SIOCSIFFLAGS {name}"), std::io::Error::last_os_error());
        }
    }
}

pub fn set_mtu(name: &str, mtu: u32) {
    let (Some(sock), Some(mut req)) = (ioctl_sock(), ifreq(name)) else { return };
    req.ifr_ifru.ifru_mtu = mtu.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: SIOCSIFMTU reads the ifreq we own for the duration of the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &req) } < 0 {
        log(&format!("MTU {mtu} on {name}"), std::io::Error::last_os_error());
    }
}

/// The MTU of `name`, for the test-mode check.
pub fn mtu_of(name: &str) -> Option<u32> {
    let (sock, mut req) = (ioctl_sock()?, ifreq(name)?);
    // SAFETY: SIOCGIFMTU writes the ifreq we own for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
    if rc != 0 {
        return None;
    }
    // SAFETY: after SIOCGIFMTU succeeded, the union holds the MTU.
    Some(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// Our pid in each PID namespace, outermost first, from a `/proc/self/status` text.
pub fn nspids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_ascii_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// True only when `/proc/self/status` proves we are PID 1 of a child PID namespace: there
/// `reboot()` ends the namespace; on the host it would power the machine off. Must be read
/// before this process mounts a /proc of its own namespace (which would show one entry).
pub fn pid1_of_child_namespace() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let ids = nspids(&status);
    ids.len() >= 2 && ids.last() == Some(&1)
}

/// sync, then power off. Returns only if the kernel refused.
pub fn power_off() {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    log("power off", e);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nspid_is_read_outermost_first() {
        assert_eq!(nspids("Name:\tx\nNSpid:\t4242\t1\nNSpgid:\t1\n"), [4242, 1]);
        assert_eq!(nspids("NSpid:\t1\n"), [1]);
        assert!(nspids("Name:\tx\n").is_empty());
    }

    #[test]
    fn ifreq_refuses_names_that_do_not_fit() {
        assert!(ifreq("lo").is_some());
        assert!(ifreq("").is_none());
        assert!(ifreq("sixteen-bytes-xx").is_none());
    }
}
