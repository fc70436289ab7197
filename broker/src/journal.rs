//! The broker's journal: what it holds for each VM (uid, VMM pid and start time, binary,
//! taps, grants), rewritten atomically after every change, so that a restarted daemon can
//! adopt the VMMs again and still undo everything they hold (`adopt`).
//! Root-owned, 0600, in the run dir. While it cannot be written the broker fails closed
//! (`table::serve`).

use std::io::Write;

use my_hypervisor_policy::journal::Entry;
pub use my_hypervisor_policy::journal::FILE;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

use crate::table::{Broker, Vmm};

/// Saves the journal and records whether that worked.
pub fn commit(b: &mut Broker) -> Result<(), String> {
    let r = save(b);
    b.journal_failed = r.is_err();
    r
}

pub fn save(b: &Broker) -> Result<(), String> {
    let mut entries: Vec<Entry> = Vec::new();
    for (id, v) in &b.vms {
        let (pid, exe, start_time) = match &v.vmm {
            Vmm::Alive { pid, exe, start_time, .. } => (Some(*pid), Some(exe.clone()), *start_time),
            _ => (None, None, None),
        };
        let taps = v.taps.iter().map(|t| t.name.clone()).collect();
        let grants = v.grants.iter().map(|g| g.record()).collect();
        entries.push(Entry { vm: id.clone(), uid: v.uid, pid, start_time, exe, taps, grants });
    }
    let bytes = postcard::to_stdvec(&entries).map_err(|e| e.to_string())?;
    let tmp = b.run_dir.join(format!("{FILE}.tmp"));
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = open(&tmp, flags, Mode::from_bits_truncate(0o600)).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(|e| format!("write journal: {e}"))?;
    std::fs::rename(&tmp, b.run_dir.join(FILE)).map_err(|e| format!("rename journal: {e}"))?;
    std::fs::File::open(&b.run_dir).and_then(|d| d.sync_all()).map_err(|e| format!("sync run dir: {e}"))
}
