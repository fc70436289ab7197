//! The capabilities each root process of the daemon keeps (docs/adr/0002-broker.md gives the
//! reasons); every other one is cleared from every set, the bounding set included.

use caps::Capability;

/// The broker: chown of disks and VM dirs; reaching VM-owned dirs and sockets; ACLs on
/// images it does not own; signals to the frontend and VMMs; taps.
pub const BROKER_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_KILL,
    Capability::CAP_NET_ADMIN,
];

/// The spawn helper: become another uid with no capabilities, and build the VMM's
/// namespaces.
pub const SPAWNER_CAPS: &[Capability] = &[
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_SETPCAP,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_MKNOD,
    Capability::CAP_CHOWN,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neither_root_process_keeps_a_capability_it_does_not_need() {
        for cap in [Capability::CAP_SYS_PTRACE, Capability::CAP_SYS_MODULE, Capability::CAP_SETFCAP] {
            assert!(!BROKER_CAPS.contains(&cap) && !SPAWNER_CAPS.contains(&cap), "{cap:?}");
        }
        assert!(!BROKER_CAPS.contains(&Capability::CAP_SYS_ADMIN), "the broker mounts nothing itself");
        assert!(!BROKER_CAPS.contains(&Capability::CAP_SETUID), "the broker becomes no other uid");
        assert!(!SPAWNER_CAPS.contains(&Capability::CAP_NET_ADMIN), "the spawn helper makes no tap");
        assert_eq!((BROKER_CAPS.len(), SPAWNER_CAPS.len()), (5, 6));
    }
}
