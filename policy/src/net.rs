//! The tap ioctls the broker issues, as data: request numbers, flags and the layout of
//! `struct ifreq`. The broker's seccomp filter allows exactly these request numbers.

pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
pub const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
pub const SIOCBRADDIF: libc::c_ulong = 0x89a2;
/// A tap, without packet information, with virtio-net headers (what cloud-hypervisor uses).
pub const TAP_FLAGS: i16 = 0x0002 | 0x1000 | 0x4000; // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR

/// asm-generic/socket.h (Linux 6.16); not in the libc crate yet. The broker turns it off on
/// each frontend channel, so that no fd can come with a request.
pub const SO_PASSRIGHTS: i32 = 83;

/// `struct ifreq`: a name, then a 24-byte union of which the short and int members are used.
#[repr(C)]
pub struct IfReq {
    pub name: [u8; libc::IFNAMSIZ],
    pub data: [u8; 24],
}

impl IfReq {
    /// `name` must be a checked interface name (at most 15 bytes); a longer one is cut.
    pub fn new(name: &str) -> IfReq {
        let mut r = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }
    pub fn with_int(name: &str, v: i32) -> IfReq {
        let mut r = IfReq::new(name);
        r.data[..4].copy_from_slice(&v.to_ne_bytes());
        r
    }
    pub fn with_short(name: &str, v: i16) -> IfReq {
        let mut r = IfReq::new(name);
        r.data[..2].copy_from_slice(&v.to_ne_bytes());
        r
    }
    pub fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
    pub fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }
    pub fn name(&self) -> String {
        String::from_utf8_lossy(&self.name).trim_end_matches('\0').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_lays_out_a_name_then_the_union() {
        assert_eq!(size_of::<IfReq>(), 40, "struct ifreq on Linux");
        let r = IfReq::with_int("tap62600-0", 1500);
        assert_eq!(r.name(), "tap62600-0");
        assert_eq!(r.name[10], 0, "NUL-terminated");
        assert_eq!((r.int(), &r.data[4..]), (1500, &[0u8; 20][..]));
        let flags = IfReq::with_short("t", TAP_FLAGS);
        assert_eq!(flags.short(), 0x5002);
        assert_eq!(IfReq::new("a-name-longer-than-fifteen").name.last(), Some(&0), "always terminated");
    }
}
