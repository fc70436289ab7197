//! The broker's request table, in the manner of OpenSSH's monitor.c: one row per request
//! ([`TABLE`]) says the VM state it requires, whether it changes the journal, how many fds
//! its reply carries and whether it may repeat; [`admit`] enforces a row against the
//! broker's records before any handler runs. [`check`] checks every field of every request
//! before that. What a handler checks beyond the row (an image's file, a bridge) is in
//! broker/src/images.rs and broker/src/table.rs. docs/adr/0002-broker.md shows [`TABLE`] as
//! [`render_table`] prints it, and a test keeps the two the same.

use my_hypervisor_broker_proto::{ImageRole, Request, decode};

use crate::check_path_text;
use crate::names::check_vm_id;
use crate::vmm::{
    FieldError, MAX_DISKS, MAX_MEMORY_MIB, MAX_MTU, MAX_VCPUS, MIN_MTU, check_cmdline, check_ifname, check_mac,
    check_range,
};

/// Kernel, initramfs and firmware, beside the disks.
pub const MAX_IMAGES: usize = MAX_DISKS + 3;

/// What a request needs of the VM it names, in the broker's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requires {
    /// Any state, or no VM at all.
    Nothing,
    /// The broker does not hold the VM.
    Unknown,
    /// Prepared, and its VMM not yet spawned.
    Prepared,
    /// Its VMM spawned and not yet reaped.
    Alive,
    /// Its VMM spawned, alive or exited.
    Spawned,
}

/// A VM as the broker's records show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Unknown,
    Prepared,
    Alive,
    Exited,
}

/// One row of the request table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub request: &'static str,
    pub requires: Requires,
    /// Whether an allowed request changes what the journal records (it is rewritten after
    /// it, and refused while the journal cannot be written, Release aside).
    pub journal: bool,
    /// How many fds an allowed reply carries.
    pub reply_fds: u8,
    /// Whether the same request may be allowed again for the same VM.
    pub repeats: bool,
}

const fn row(request: &'static str, requires: Requires, journal: bool, reply_fds: u8, repeats: bool) -> Row {
    Row { request, requires, journal, reply_fds, repeats }
}

/// Every request the broker serves. Nothing else reaches it: [`Request`] is a closed enum.
pub const TABLE: &[Row] = &[
    row("KvmCheck", Requires::Nothing, false, 0, true),
    row("Prepare", Requires::Unknown, true, 0, false),
    row("CreateTap", Requires::Prepared, true, 0, true),
    row("Spawn", Requires::Prepared, true, 2, false),
    row("Connect", Requires::Alive, false, 1, true),
    row("OpenOutputs", Requires::Spawned, false, 2, true),
    row("Signal", Requires::Alive, false, 0, true),
    row("Release", Requires::Nothing, true, 0, true),
    row("Inventory", Requires::Nothing, false, 0, true),
    row("TrimLog", Requires::Alive, false, 0, true),
    row("Sandbox", Requires::Alive, false, 0, true),
    row("Serving", Requires::Nothing, false, 0, true),
];

/// The request's row, and the VM it names. Every variant has its row by construction
/// (`tests::every_request_has_a_row` checks that each index names its variant).
pub fn row_of(req: &Request) -> (&'static Row, Option<&str>) {
    let (i, vm) = match req {
        Request::KvmCheck => (0, None),
        Request::Prepare { vm, .. } => (1, Some(vm)),
        Request::CreateTap { vm, .. } => (2, Some(vm)),
        Request::Spawn { vm, .. } => (3, Some(vm)),
        Request::Connect { vm, .. } => (4, Some(vm)),
        Request::OpenOutputs { vm } => (5, Some(vm)),
        Request::Signal { vm, .. } => (6, Some(vm)),
        Request::Release { vm } => (7, Some(vm)),
        Request::Inventory => (8, None),
        Request::TrimLog { vm } => (9, Some(vm)),
        Request::Sandbox { vm } => (10, Some(vm)),
        Request::Serving => (11, None),
    };
    (&TABLE[i], vm.map(String::as_str))
}

/// A request the VM's state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("VM {0} was never prepared")]
    NotPrepared(String),
    #[error("VM {0} is already prepared")]
    AlreadyPrepared(String),
    #[error("VM {0} was already spawned; a VM is spawned at most once per prepare")]
    AlreadySpawned(String),
    #[error("VM {0} has no VMM: it was never spawned")]
    NeverSpawned(String),
    #[error("the VMM of VM {0} has exited")]
    Exited(String),
}

/// Enforces a row's required state on the VM `vm`, which the records show as `held`.
pub fn admit(row: &Row, vm: &str, held: Held) -> Result<(), StateError> {
    let vm = vm.to_string();
    match (row.requires, held) {
        (Requires::Nothing, _)
        | (Requires::Unknown, Held::Unknown)
        | (Requires::Prepared, Held::Prepared)
        | (Requires::Alive, Held::Alive)
        | (Requires::Spawned, Held::Alive | Held::Exited) => Ok(()),
        (Requires::Unknown, _) => Err(StateError::AlreadyPrepared(vm)),
        (_, Held::Unknown) => Err(StateError::NotPrepared(vm)),
        (Requires::Prepared, _) => Err(StateError::AlreadySpawned(vm)),
        (_, Held::Prepared) => Err(StateError::NeverSpawned(vm)),
        (_, _) => Err(StateError::Exited(vm)),
    }
}

/// [`TABLE`] as the Markdown table docs/adr/0002-broker.md shows.
pub fn render_table() -> String {
    let mut s =
        String::from("| request | requires | changes the journal | reply fds | may repeat |\n|---|---|---|---|---|\n");
    for r in TABLE {
        let requires = match r.requires {
            Requires::Nothing => "—",
            Requires::Unknown => "VM unknown",
            Requires::Prepared => "VM prepared, VMM not spawned",
            Requires::Alive => "VMM alive",
            Requires::Spawned => "VMM spawned (alive or exited)",
        };
        let yes = |b: bool| if b { "yes" } else { "no" };
        s += &format!("| `{}` | {requires} | {} | {} | {} |\n", r.request, yes(r.journal), r.reply_fds, yes(r.repeats));
    }
    s
}

pub fn check(req: &Request) -> Result<(), FieldError> {
    match req {
        Request::KvmCheck | Request::Inventory | Request::Serving => Ok(()),
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
        | Request::Release { vm }
        | Request::TrimLog { vm }
        | Request::Sandbox { vm } => Ok(check_vm_id(vm)?),
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
            Request::Connect { vm: "a".into(), role: my_hypervisor_broker_proto::SocketRole::Api },
            Request::OpenOutputs { vm: "a".into() },
            Request::Signal { vm: "a".into(), signal: my_hypervisor_broker_proto::VmmSignal::Term },
            Request::Release { vm: "a".into() },
            Request::Inventory,
            Request::TrimLog { vm: "a".into() },
            Request::Sandbox { vm: "a".into() },
            Request::Serving,
        ]
    }

    /// Every `Request` variant has its own row, and the table has no other.
    #[test]
    fn every_request_has_a_row() {
        let mut seen = std::collections::BTreeSet::new();
        for r in samples() {
            // Exhaustive on purpose: a new variant fails to compile here until it is named.
            let name = match &r {
                Request::KvmCheck => "KvmCheck",
                Request::Prepare { .. } => "Prepare",
                Request::CreateTap { .. } => "CreateTap",
                Request::Spawn { .. } => "Spawn",
                Request::Connect { .. } => "Connect",
                Request::OpenOutputs { .. } => "OpenOutputs",
                Request::Signal { .. } => "Signal",
                Request::Release { .. } => "Release",
                Request::Inventory => "Inventory",
                Request::TrimLog { .. } => "TrimLog",
                Request::Sandbox { .. } => "Sandbox",
                Request::Serving => "Serving",
            };
            assert_eq!(row_of(&r).0.request, name, "{r:?} has another variant's row");
            seen.insert(name);
        }
        assert_eq!(seen.len(), 12, "samples() holds one request of each variant");
        assert_eq!(TABLE.len(), seen.len(), "one row per variant, no other");
    }

    #[test]
    fn rows_are_enforced() {
        let r = |name| TABLE.iter().find(|r| r.request == name).unwrap();
        assert_eq!(admit(r("Prepare"), "a", Held::Prepared), Err(StateError::AlreadyPrepared("a".into())));
        assert_eq!(admit(r("Spawn"), "a", Held::Unknown), Err(StateError::NotPrepared("a".into())));
        assert_eq!(admit(r("Spawn"), "a", Held::Exited), Err(StateError::AlreadySpawned("a".into())));
        assert_eq!(admit(r("Connect"), "a", Held::Prepared), Err(StateError::NeverSpawned("a".into())));
        assert_eq!(admit(r("Signal"), "a", Held::Exited), Err(StateError::Exited("a".into())));
        assert_eq!(admit(r("OpenOutputs"), "a", Held::Exited), Ok(()));
        assert_eq!(admit(r("Release"), "a", Held::Unknown), Ok(()));
        // A request that may not repeat requires a state its own success leaves behind.
        for row in TABLE.iter().filter(|r| !r.repeats) {
            let after = match row.request {
                "Prepare" => Held::Prepared,
                "Spawn" => Held::Alive,
                other => panic!("{other} may not repeat: say here what it leaves behind"),
            };
            assert!(admit(row, "a", after).is_err(), "{} could repeat", row.request);
        }
    }

    /// docs/adr/0002-broker.md shows exactly [`TABLE`].
    #[test]
    fn docs_show_the_table() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/adr/0002-broker.md")).unwrap();
        assert!(doc.contains(&render_table()), "docs/adr/0002-broker.md must contain:\n{}", render_table());
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
