//! The stateless half of the broker's validation table: every field of every request is
//! checked here before the broker looks at its own records. The stateful half (is the VM
//! prepared, spawned, alive; is a disk held elsewhere) is in broker/src/table.rs.

use my_hypervisor_broker_proto::{ImageRole, Request, decode};

use crate::check_path_text;
use crate::names::check_vm_id;
use crate::vmm::{
    FieldError, MAX_DISKS, MAX_MEMORY_MIB, MAX_MTU, MAX_VCPUS, MIN_MTU, check_cmdline, check_ifname, check_mac,
    check_range,
};

/// Kernel, initramfs and firmware, beside the disks.
pub const MAX_IMAGES: usize = MAX_DISKS + 3;

pub fn check(req: &Request) -> Result<(), FieldError> {
    match req {
        Request::KvmCheck | Request::Inventory => Ok(()),
        Request::Prepare { vm, images } => {
            check_vm_id(vm)?;
            check_range("images", images.len() as u64, 1, MAX_IMAGES as u64)?;
            let disks = images.iter().filter(|i| matches!(i.role, ImageRole::Disk { .. })).count();
            check_range("disks", disks as u64, 0, MAX_DISKS as u64)?;
            for role in [ImageRole::Kernel, ImageRole::Initramfs, ImageRole::Firmware] {
                if images.iter().filter(|i| i.role == role).count() > 1 {
                    return Err(FieldError::Invalid {
                        field: "images",
                        reason: format!("more than one {role:?} image"),
                    });
                }
            }
            images.iter().try_for_each(|i| check_path_text(&i.path).map_err(FieldError::from))
        }
        Request::CreateTap { vm, mac, mtu, bridge } => {
            check_vm_id(vm)?;
            mac.as_deref().map(check_mac).transpose()?;
            mtu.map(|m| check_range("mtu", m.into(), MIN_MTU.into(), MAX_MTU.into())).transpose()?;
            bridge.as_deref().map(check_ifname).transpose()?;
            Ok(())
        }
        Request::Spawn { vm, config } => {
            check_vm_id(vm)?;
            check_range("vcpus", config.vcpus.into(), 1, MAX_VCPUS.into())?;
            check_range("memory_mib", config.memory_mib.into(), 1, MAX_MEMORY_MIB.into())?;
            config.cmdline.as_deref().map(check_cmdline).transpose()?;
            Ok(())
        }
        Request::Connect { vm, .. }
        | Request::OpenOutputs { vm }
        | Request::Signal { vm, .. }
        | Request::Release { vm } => Ok(check_vm_id(vm)?),
    }
}

/// Decode and check, as the broker does for every datagram: the fuzz target's entry point.
/// Requests never carry fds.
pub fn decode_and_check(bytes: &[u8]) -> Result<Request, String> {
    let env = decode::<Request>(bytes, 0).map_err(|e| e.to_string())?;
    check(&env.body).map_err(|e| e.to_string())?;
    Ok(env.body)
}

#[cfg(test)]
mod tests {
    use my_hypervisor_broker_proto::{Envelope, Image, PROTOCOL_VERSION, VmmConfig, encode};

    use super::*;

    fn bytes(body: Request) -> Vec<u8> {
        encode(&Envelope { version: PROTOCOL_VERSION, id: 1, fds: 0, body }).unwrap()
    }

    fn samples() -> Vec<Request> {
        let img = |p: &str, role| Image { path: p.into(), role };
        vec![
            Request::KvmCheck,
            Request::Prepare {
                vm: "a".into(),
                images: vec![img("/i/k", ImageRole::Kernel), img("/i/d", ImageRole::Disk { readonly: false })],
            },
            Request::CreateTap {
                vm: "a".into(),
                mac: Some("52:54:00:00:00:01".into()),
                mtu: Some(1500),
                bridge: Some("br0".into()),
            },
            Request::Spawn {
                vm: "a".into(),
                config: VmmConfig { vcpus: 1, memory_mib: 64, cmdline: None, vsock: true },
            },
            Request::Release { vm: "a".into() },
        ]
    }

    #[test]
    fn valid_requests_pass() {
        for r in samples() {
            assert_eq!(decode_and_check(&bytes(r.clone())), Ok(r));
        }
    }

    #[test]
    fn each_field_is_checked() {
        let bad = [
            Request::Release { vm: "A".into() },
            Request::Prepare { vm: "a".into(), images: vec![] },
            Request::Prepare {
                vm: "a".into(),
                images: vec![Image { path: "/i/../k".into(), role: ImageRole::Kernel }],
            },
            Request::Prepare {
                vm: "a".into(),
                images: vec![
                    Image { path: "/i/k".into(), role: ImageRole::Kernel },
                    Image { path: "/i/k2".into(), role: ImageRole::Kernel },
                ],
            },
            Request::CreateTap { vm: "a".into(), mac: Some("ff:ff:ff:ff:ff:ff".into()), mtu: None, bridge: None },
            Request::CreateTap { vm: "a".into(), mac: None, mtu: Some(10), bridge: None },
            Request::CreateTap { vm: "a".into(), mac: None, mtu: None, bridge: Some("bad name".into()) },
            Request::Spawn {
                vm: "a".into(),
                config: VmmConfig { vcpus: 0, memory_mib: 64, cmdline: None, vsock: false },
            },
            Request::Spawn {
                vm: "a".into(),
                config: VmmConfig { vcpus: 1, memory_mib: 64, cmdline: Some("\u{7}".into()), vsock: false },
            },
        ];
        for r in bad {
            assert!(decode_and_check(&bytes(r.clone())).is_err(), "{r:?}");
        }
    }

    /// A deterministic stand-in for the fuzzer on stable: every single-byte mutation and
    /// truncation of valid requests, plus pseudo-random bytes, must decode or be refused,
    /// never panic.
    #[test]
    fn mutations_never_panic() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for r in samples() {
            let b = bytes(r);
            for i in 0..b.len() {
                let _ = decode_and_check(&b[..i]);
                for v in [0u8, 1, 0x7f, 0x80, 0xff, next() as u8] {
                    let mut m = b.clone();
                    m[i] = v;
                    let _ = decode_and_check(&m);
                }
            }
        }
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode_and_check(&buf);
        }
    }
}
