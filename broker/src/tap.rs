//! Tap devices by plain ioctls: TUNSETIFF on /dev/net/tun, then SIOCSIFMTU, SIOCBRADDIF and
//! SIOCSIFFLAGS on a control socket. No netlink, no async runtime. The tap is not persistent:
//! it goes away with the last fd, which the broker and then the VMM hold. Release does not
//! trust that alone (a tap can be made persistent): `delete` clears the flag and checks.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// `struct ifreq`: a name, then a 24-byte union of which we use the short and int members.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, ifr: &mut IfReq, what: &str) -> Result<(), String> {
    // SAFETY: every request used here reads or writes one `struct ifreq`, which IfReq lays out.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, ifr as *mut IfReq) } < 0 {
        return Err(format!(
            "{what} on {}: {}",
            String::from_utf8_lossy(&ifr.name).trim_end_matches('\0'),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Deletes tap `name`: clears its persist flag through the broker's fd and closes that fd;
/// if the interface is still there, attaches to it by name and clears the flag again. Fails
/// if it survives that too (then something else holds an fd of it).
pub fn delete(name: &str, fd: OwnedFd) -> Result<(), String> {
    let unpersist = |fd: OwnedFd| {
        // SAFETY: TUNSETPERSIST takes an integer argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 0) } < 0 {
            return Err(format!("TUNSETPERSIST 0 on {name}: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    };
    unpersist(fd)?;
    if exists(name)? {
        unpersist(attach(name)?)?;
        if exists(name)? {
            return Err(format!("tap {name} still exists after release: another process holds it"));
        }
    }
    Ok(())
}

fn exists(name: &str) -> Result<bool, String> {
    let ctl = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("control socket: {e}"))?;
    // SAFETY: SIOCGIFINDEX reads and writes one `struct ifreq`, which IfReq lays out.
    if unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFINDEX, &mut IfReq::new(name) as *mut IfReq) } == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
        e => Err(format!("SIOCGIFINDEX on {name}: {e}")),
    }
}

/// An fd on tap `name` (created if absent), from /dev/net/tun.
fn attach(name: &str) -> Result<OwnedFd, String> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    let tun = OwnedFd::from(tun);
    let mut ifr = IfReq::new(name);
    ifr.set_short(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    ioctl(&tun, TUNSETIFF, &mut ifr, "TUNSETIFF")?;
    Ok(tun)
}

/// Creates tap `name` (already validated, at most 15 bytes), sets its MTU, attaches it to
/// `bridge` and brings it up. Returns the tap's fd.
pub fn create(name: &str, mtu: Option<u32>, bridge: Option<&str>) -> Result<OwnedFd, String> {
    let tun = attach(name)?;
    let ctl = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("control socket: {e}"))?;
    if let Some(mtu) = mtu {
        let mut r = IfReq::new(name);
        r.set_int(mtu as i32);
        ioctl(&ctl, libc::SIOCSIFMTU, &mut r, "SIOCSIFMTU")?;
    }
    if let Some(bridge) = bridge {
        let mut r = IfReq::new(name);
        ioctl(&ctl, libc::SIOCGIFINDEX, &mut r, "SIOCGIFINDEX")?;
        let index = r.int();
        let mut b = IfReq::new(bridge);
        b.set_int(index);
        ioctl(&ctl, SIOCBRADDIF, &mut b, "SIOCBRADDIF")?;
    }
    let mut r = IfReq::new(name);
    ioctl(&ctl, libc::SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS")?;
    let up = r.short() | libc::IFF_UP as i16;
    r.set_short(up);
    ioctl(&ctl, libc::SIOCSIFFLAGS, &mut r, "SIOCSIFFLAGS")?;
    Ok(tun)
}
