//! Tap devices by plain ioctls: TUNSETIFF on /dev/net/tun, then SIOCSIFMTU, SIOCBRADDIF and
//! SIOCSIFFLAGS on a control socket. No netlink, no async runtime. The tap is not persistent:
//! it goes away with the last fd, which the broker and then the VMM hold. Release does not
//! trust that alone (a tap can be made persistent): `delete` clears the flag and checks.

use std::os::fd::{AsRawFd, OwnedFd};

use my_hypervisor_policy::net::{IfReq, SIOCBRADDIF, TAP_FLAGS, TUNSETIFF, TUNSETPERSIST};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

fn control_socket() -> Result<OwnedFd, String> {
    socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("control socket: {e}"))
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, ifr: &mut IfReq, what: &str) -> Result<(), String> {
    // SAFETY: every request used here reads or writes one `struct ifreq`, which IfReq lays out.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, ifr as *mut IfReq) } < 0 {
        return Err(format!("{what} on {}: {}", ifr.name(), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Deletes tap `name` explicitly: clears its persist flag through the broker's fd (a VMM
/// could have set it), closes that fd, and checks that the interface is gone. If it is not,
/// another process still holds an fd of it. Without an fd (a tap taken up from the journal),
/// a tap that still exists is attached by name first.
pub fn delete(name: &str, fd: Option<OwnedFd>) -> Result<(), String> {
    let fd = match fd {
        Some(fd) => fd,
        None if !exists(name)? => return Ok(()),
        None => attach(name)?,
    };
    // SAFETY: TUNSETPERSIST takes an integer argument.
    crate::unpriv::sys("TUNSETPERSIST 0", unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 0) }.into())
        .map_err(|e| format!("{name}: {e}"))?;
    drop(fd);
    match exists(name)? {
        true => Err(format!("tap {name} still exists after release: another process holds it")),
        false => Ok(()),
    }
}

fn exists(name: &str) -> Result<bool, String> {
    let ctl = control_socket()?;
    // SAFETY: SIOCGIFINDEX reads and writes one `struct ifreq`, which IfReq lays out.
    let found = unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFINDEX, &mut IfReq::new(name) as *mut IfReq) };
    match std::io::Error::last_os_error().raw_os_error() {
        _ if found == 0 => Ok(true),
        Some(libc::ENODEV) => Ok(false),
        e => Err(format!("SIOCGIFINDEX on {name}: {}", std::io::Error::from_raw_os_error(e.unwrap_or(0)))),
    }
}

/// A new fd on the existing tap `name` (TUNSETIFF attaches to it while no one else does).
fn attach(name: &str) -> Result<OwnedFd, String> {
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun");
    let tun = OwnedFd::from(tun.map_err(|e| format!("/dev/net/tun: {e}"))?);
    ioctl(&tun, TUNSETIFF, &mut IfReq::with_short(name, TAP_FLAGS), "TUNSETIFF")?;
    Ok(tun)
}

/// Creates tap `name` (already validated, at most 15 bytes), sets its MTU, attaches it to
/// `bridge` and brings it up. Returns the tap's fd.
pub fn create(name: &str, mtu: Option<u32>, bridge: Option<&str>) -> Result<OwnedFd, String> {
    let tun = attach(name)?;
    let ctl = control_socket()?;
    if let Some(mtu) = mtu {
        ioctl(&ctl, libc::SIOCSIFMTU, &mut IfReq::with_int(name, mtu as i32), "SIOCSIFMTU")?;
    }
    if let Some(bridge) = bridge {
        let mut r = IfReq::new(name);
        ioctl(&ctl, libc::SIOCGIFINDEX, &mut r, "SIOCGIFINDEX")?;
        ioctl(&ctl, SIOCBRADDIF, &mut IfReq::with_int(bridge, r.int()), "SIOCBRADDIF")?;
    }
    let mut r = IfReq::new(name);
    ioctl(&ctl, libc::SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS")?;
    ioctl(&ctl, libc::SIOCSIFFLAGS, &mut IfReq::with_short(name, r.short() | libc::IFF_UP as i16), "SIOCSIFFLAGS")?;
    Ok(tun)
}
