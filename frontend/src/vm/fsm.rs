//! The VM state machine. [`TRANSITIONS`] is the whole table (docs/fsm.md shows the same table,
//! and a test keeps the two equal); [`check`] is the one place that enforces it.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::VmError;

/// The nine lifecycle states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Recorded by create; nothing is held for it.
    Pending,
    /// The broker is preparing its uid, runtime dir, image grants and taps.
    Provisioning,
    /// Its resources are ready; no VMM yet.
    Configured,
    /// The VMM is spawned and the guest is booting.
    Starting,
    /// The guest runs (and its agent answers, when `agent`).
    Running,
    /// A start failed; everything it took was released.
    StartFailed,
    /// A stop is in progress.
    Stopping,
    /// Stopped, and its resources released.
    Stopped,
    /// The VMM died unexpectedly or an unrecoverable error happened; something may be left.
    Failed,
}

impl VmState {
    pub const ALL: [VmState; 9] = [
        VmState::Pending,
        VmState::Provisioning,
        VmState::Configured,
        VmState::Starting,
        VmState::Running,
        VmState::StartFailed,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::Provisioning => "provisioning",
            VmState::Configured => "configured",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::StartFailed => "start_failed",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }

    /// States in which `compute.vm.remove` is allowed: no VMM can be alive (in `failed` the
    /// remove first releases whatever is left).
    pub fn removable(self) -> bool {
        matches!(self, VmState::Pending | VmState::Stopped | VmState::StartFailed | VmState::Failed)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

use VmState::*;

/// Every legal transition, with when it happens. Anything else is refused by [`check`].
pub const TRANSITIONS: &[(VmState, VmState, &str)] = &[
    (Pending, Provisioning, "start: the broker prepares uid, runtime dir, image grants and taps"),
    (Stopped, Provisioning, "start again; stop released everything, so start provisions again"),
    (StartFailed, Provisioning, "start again after a failed start"),
    (Failed, Provisioning, "start again; whatever was left is released first"),
    (Provisioning, Configured, "resources ready"),
    (Provisioning, StartFailed, "provisioning failed; what it took is released"),
    (Provisioning, Failed, "provisioning failed and releasing failed too: something may be left"),
    (Configured, Starting, "the VMM is spawned and boots the guest"),
    (Configured, StartFailed, "spawning the VMM failed; resources released"),
    (Configured, Failed, "spawning failed and releasing failed too: something may be left"),
    (Starting, Running, "the VM runs (and the guest agent answers, when `agent`)"),
    (Starting, StartFailed, "boot failed or timed out; VMM and resources released"),
    (Starting, Stopping, "stop while starting: the start is abandoned"),
    (Starting, Failed, "boot failed and releasing failed too: something may be left"),
    (Running, Running, "recorded without a change of state: the guest rebooted"),
    (Running, Stopping, "stop"),
    (Running, Stopped, "the guest shut itself down (VMM exited 0, no stop in progress); resources released"),
    (Running, Failed, "the VMM died unexpectedly, a guest panic, or an unrecoverable error"),
    (Failed, Stopping, "stop of a failed VM whose VMM may still run (after a guest panic, say)"),
    (Stopping, Stopped, "the VMM is gone and resources are released"),
    (Stopping, Failed, "the stop could not complete"),
];

/// The transition create records: from nothing (`null`) to `pending`. It is the only one
/// without a `from`, and [`check`] never sees it.
pub const CREATE: (Option<VmState>, VmState, &str) = (None, Pending, "create: the VM is recorded");

pub fn allowed(from: VmState, to: VmState) -> bool {
    TRANSITIONS.iter().any(|&(f, t, _)| f == from && t == to)
}

/// The one check every transition goes through.
pub fn check(vm_id: &str, from: VmState, to: VmState) -> Result<(), VmError> {
    if allowed(from, to) {
        Ok(())
    } else {
        Err(VmError::IllegalTransition { vm_id: vm_id.to_string(), from: from.to_string(), to: to.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn every_pair_is_legal_exactly_when_listed() {
        let listed: BTreeSet<(VmState, VmState)> = TRANSITIONS.iter().map(|&(f, t, _)| (f, t)).collect();
        assert_eq!(listed.len(), TRANSITIONS.len(), "duplicate rows");
        let mut illegal = 0;
        for from in VmState::ALL {
            for to in VmState::ALL {
                let r = check("vm", from, to);
                if listed.contains(&(from, to)) {
                    assert_eq!(r, Ok(()), "{from} -> {to}");
                } else {
                    illegal += 1;
                    let e = r.expect_err(&format!("{from} -> {to} must be refused"));
                    assert!(matches!(e, VmError::IllegalTransition { .. }), "{e}");
                    assert!(e.to_string().contains(&format!("from {from} to {to}")), "{e}");
                }
            }
        }
        assert_eq!(illegal, 81 - TRANSITIONS.len());
    }

    #[test]
    fn the_issue_requires_these() {
        for (f, t) in [
            (Pending, Provisioning),
            (Provisioning, Configured),
            (Configured, Starting),
            (Starting, Running),
            (Starting, StartFailed),
            (Running, Stopping),
            (Stopping, Stopped),
            (Stopping, Failed),
            (Starting, Failed),
            (Running, Failed),
            (Stopped, Provisioning),
            (StartFailed, Provisioning),
            (Failed, Provisioning),
            (Starting, Stopping),
        ] {
            assert!(allowed(f, t), "{f} -> {t}");
        }
        // No way back to pending, and nothing skips provisioning.
        for s in VmState::ALL {
            assert!(!allowed(s, Pending), "{s} -> pending");
            assert!(!allowed(s, Configured) || s == Provisioning);
        }
    }

    /// docs/fsm.md's table lists exactly [`TRANSITIONS`].
    #[test]
    fn docs_table_matches_code() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/fsm.md")).unwrap();
        let mut documented = BTreeSet::new();
        for line in doc.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() < 4 {
                continue;
            }
            let parse = |c: &str| VmState::ALL.into_iter().find(|s| c == format!("`{s}`"));
            let from = if cells[1] == "`null`" { Some(None) } else { parse(cells[1]).map(Some) };
            if let (Some(f), Some(t)) = (from, parse(cells[2])) {
                documented.insert((f, t));
            }
        }
        let mut code: BTreeSet<(Option<VmState>, VmState)> =
            TRANSITIONS.iter().map(|&(f, t, _)| (Some(f), t)).collect();
        code.insert((CREATE.0, CREATE.1));
        assert_eq!(documented, code, "docs/fsm.md and fsm::TRANSITIONS differ");
        for s in VmState::ALL {
            assert!(doc.contains(&format!("`{s}`")), "docs/fsm.md does not name {s}");
        }
    }
}
