//! The broker's journal: what it holds for each VM (uid, VMM pid and start time, binary,
//! taps, grants), rewritten atomically after every change, so that a broker crash leaves a
//! record of everything it held; the daemon refuses to start while it lists VMs.
//! Root-owned, 0600, in the run dir. While it cannot be written the broker fails closed
//! (`table::serve`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};

use crate::images::Restore;
use crate::table::{Broker, Vmm};

pub const FILE: &str = "broker.journal";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub vm: String,
    pub uid: u32,
    pub pid: Option<u32>,
    /// Field 22 of /proc/PID/stat: with the pid, names the process across pid reuse.
    pub start_time: Option<u64>,
    pub exe: Option<String>,
    pub taps: Vec<String>,
    /// (path, writable, what restores the file as it was before the first grant)
    pub grants: Vec<(String, bool, Restore)>,
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count fields after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Saves the journal and records whether that worked.
pub fn commit(b: &mut Broker) -> Result<(), String> {
    let r = save(b);
    b.journal_failed = r.is_err();
    r
}

pub fn save(b: &Broker) -> Result<(), String> {
    let entries: Vec<Entry> = b
        .vms
        .iter()
        .map(|(id, v)| {
            let (pid, exe) = match &v.vmm {
                Vmm::Alive { pid, exe, .. } => (Some(*pid), Some(exe.clone())),
                _ => (None, None),
            };
            Entry {
                vm: id.clone(),
                uid: v.uid,
                pid,
                start_time: pid.and_then(start_time),
                exe,
                taps: v.taps.iter().map(|t| t.name.clone()).collect(),
                grants: v.grants.iter().map(|g| (g.path.clone(), g.writable(), g.restore(&b.acls))).collect(),
            }
        })
        .collect();
    let bytes = postcard::to_stdvec(&entries).map_err(|e| e.to_string())?;
    let tmp = b.run_dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(|e| format!("write journal: {e}"))?;
    std::fs::rename(&tmp, b.run_dir.join(FILE)).map_err(|e| format!("rename journal: {e}"))?;
    std::fs::File::open(&b.run_dir).and_then(|d| d.sync_all()).map_err(|e| format!("sync run dir: {e}"))
}
