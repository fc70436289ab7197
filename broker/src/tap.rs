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

/// Deletes tap `name` explicitly: clears its persist flag through the broker's fd (a VMM
/// could have set it), closes that fd, and checks that the interface is gone. If it is not,
/// another process still holds an fd of it.
pub fn delete(name: &str, fd: OwnedFd) -> Result<(), String> {
    // SAFETY: TUNSETPERSIST takes an integer argument.
    crate::unpriv::sys("TUNSETPERSIST 0", unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 0) }.into())
        .map_err(|e| format!("{name}: {e}"))?;
    drop(fd);
    let ctl = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("control socket: {e}"))?;
    // SAFETY: SIOCGIFINDEX reads and writes one `struct ifreq`, which IfReq lays out.
    let found = unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFINDEX, &mut IfReq::new(name) as *mut IfReq) };
    match std::io::Error::last_os_error().raw_os_error() {
        _ if found == 0 => Err(format!("tap {name} still exists after release: another process holds it")),
        Some(libc::ENODEV) => Ok(()),
        e => Err(format!("SIOCGIFINDEX on {name}: {}", std::io::Error::from_raw_os_error(e.unwrap_or(0)))),
    }
}

/// Creates tap `name` (already validated, at most 15 bytes), sets its MTU, attaches it to
/// `bridge` and brings it up. Returns the tap's fd.
pub fn create(name: &str, mtu: Option<u32>, bridge: Option<&str>) -> Result<OwnedFd, String> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    let tun = OwnedFd::from(tun);
    let mut ifr = IfReq::new(name);
    ifr.set_short(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    ioctl(&tun, TUNSETIFF, &mut ifr, "TUNSETIFF")?;
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
        let mut b = IfReq::new(bridge);
        b.data[..4].copy_from_slice(&r.data[..4]); // the tap's index
        ioctl(&ctl, SIOCBRADDIF, &mut b, "SIOCBRADDIF")?;
    }
    let mut r = IfReq::new(name);
    ioctl(&ctl, libc::SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS")?;
    let up = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
    r.set_short(up);
    ioctl(&ctl, libc::SIOCSIFFLAGS, &mut r, "SIOCSIFFLAGS")?;
    Ok(tun)
}
