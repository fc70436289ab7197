//! The broker's and the spawn helper's own confinement: keep only the capabilities each
//! uses (docs/adr/0002-broker.md lists them with reasons), and put the broker under
//! its seccomp filter.

use caps::{CapSet, Capability};
pub use my_hypervisor_policy::privileges::{BROKER_CAPS, SPAWNER_CAPS};
use my_hypervisor_policy::seccomp;

/// Keeps exactly `keep` in the effective and permitted sets; empties the bounding,
/// inheritable and ambient sets.
pub fn keep_only(keep: &[Capability]) -> Result<(), String> {
    let err = |what: &str, e: caps::errors::CapsError| format!("{what}: {e}");
    let keep: caps::CapsHashSet = keep.iter().copied().collect();
    // The bounding set can only shrink while CAP_SETPCAP is held, so it goes first.
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| err("drop from bounding set", e))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| err("clear ambient", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| err("clear inheritable", e))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| err("set effective", e))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| err("set permitted", e))
}

/// Puts the calling thread (the whole broker: it has one) under the broker's filter.
pub fn apply_broker_filter(mode: seccomp::Mode) -> Result<(), String> {
    let prog = seccomp::compile(&seccomp::broker_allow_list(), mode).map_err(|e| format!("compile filter: {e}"))?;
    // SAFETY: plain prctl with integer arguments; required to install a filter.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    crate::unpriv::sys("no_new_privs", r.into()).map_err(|e| e.to_string())?;
    seccompiler::apply_filter(&prog).map_err(|e| format!("install filter: {e}"))
}
