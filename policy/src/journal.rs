//! The broker's journal record: what it holds for each VM (uid, VMM pid and start time,
//! binary, taps, grants with what undoes them), and the rules for taking the VMs up again
//! after a daemon restart. The broker rewrites the journal after every change; at start it
//! re-adopts each VMM that passes [`check_vmm`], releases the rest, and ends every other
//! process in the VM uid range ([`strays`]).

use std::ops::RangeInclusive;

use my_hypervisor_broker_proto::ImageRole;
use serde::{Deserialize, Serialize};

/// The journal's file name in the run dir.
pub const FILE: &str = "broker.journal";

/// What puts an image back as it was before it was granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Restore {
    Nothing,
    Owner { uid: u32, gid: u32 },
    Acl { original: Option<Vec<u8>>, mode: u32 },
}

/// One image grant: enough to find the same inode again and undo the grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub path: String,
    pub role: ImageRole,
    /// (st_dev, st_ino) at the grant: a path that now names another inode is not undone.
    pub inode: (u64, u64),
    /// What restores the file as it was before the first grant.
    pub restore: Restore,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub vm: String,
    pub uid: u32,
    pub pid: Option<u32>,
    /// Field 22 of /proc/PID/stat: with the pid, names the process across pid reuse.
    pub start_time: Option<u64>,
    pub exe: Option<String>,
    /// Tap names, in creation order: a tap left without an fd is deleted by name.
    pub taps: Vec<String>,
    pub grants: Vec<GrantRecord>,
}

/// The start time (field 22) of a /proc/PID/stat line.
pub fn start_time(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: count fields after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("cannot be decoded ({0}); the VMs it lists must be cleaned up by hand before the file is removed")]
    Corrupt(String),
    #[error("lists VM {vm} with uid {uid}, outside the VM uid range {first}-{last}")]
    OutsideRange { vm: String, uid: u32, first: u32, last: u32 },
    #[error("lists VM {vm}'s tap {name}, which is not a name the broker gives its taps")]
    TapName { vm: String, name: String },
    #[error("lists uid {0} for two VMs")]
    SharedUid(u32),
}

/// Decodes a journal found at start and checks what the broker will act on: each uid in
/// the range and held once, each tap named as the broker names them.
pub fn decode(bytes: &[u8], range: &RangeInclusive<u32>) -> Result<Vec<Entry>, JournalError> {
    let entries: Vec<Entry> = postcard::from_bytes(bytes).map_err(|e| JournalError::Corrupt(e.to_string()))?;
    for (i, e) in entries.iter().enumerate() {
        if !range.contains(&e.uid) {
            let (first, last) = (*range.start(), *range.end());
            return Err(JournalError::OutsideRange { vm: e.vm.clone(), uid: e.uid, first, last });
        }
        if entries[..i].iter().any(|o| o.uid == e.uid) {
            return Err(JournalError::SharedUid(e.uid));
        }
        for (n, name) in e.taps.iter().enumerate() {
            if *name != crate::vmm::tap_name(e.uid, n) {
                return Err(JournalError::TapName { vm: e.vm.clone(), name: name.clone() });
            }
        }
    }
    Ok(entries)
}

/// Why a recorded VMM is not adopted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAdopted {
    #[error("no VMM was recorded as running")]
    NotRecorded,
    #[error("pid {0} is gone")]
    Gone(u32),
    #[error("pid {pid} started at {found:?}, not {recorded}: the pid was reused by another process")]
    Reused { pid: u32, recorded: u64, found: Option<u64> },
    #[error("pid {pid} runs under uids {uids:?}, not the VM uid {uid}")]
    WrongUid { pid: u32, uids: Vec<u32>, uid: u32 },
    #[error("pid {pid} is not PID 1 of its own PID namespace (NSpid {nspid:?})")]
    NotNamespaced { pid: u32, nspid: String },
}

/// Whether the process now at the recorded pid is the VM's VMM: the same start time, every
/// uid the VM uid, and NSpid with two entries, the inner one 1. `stat` and `status` are read
/// after the pidfd was taken, so that they describe the process the pidfd names.
pub fn check_vmm(e: &Entry, stat: &str, status: &str) -> Result<u32, NotAdopted> {
    let (Some(pid), Some(recorded)) = (e.pid, e.start_time) else { return Err(NotAdopted::NotRecorded) };
    let found = start_time(stat);
    if found != Some(recorded) {
        return Err(NotAdopted::Reused { pid, recorded, found });
    }
    let uids = crate::sandbox::status_uids(status);
    if uids.len() != 4 || uids.iter().any(|u| *u != e.uid) {
        return Err(NotAdopted::WrongUid { pid, uids, uid: e.uid });
    }
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap_or_default();
    let ids: Vec<&str> = nspid.split_whitespace().collect();
    if ids.len() != 2 || ids[0] != pid.to_string() || ids[1] != "1" {
        return Err(NotAdopted::NotNamespaced { pid, nspid: nspid.trim().to_string() });
    }
    Ok(pid)
}

/// The processes (pid, uids from /proc/PID/status) to end at start: any uid in the VM
/// range, but not the uid of a VM whose VMM was adopted (its VMM may have children).
pub fn strays(procs: &[(u32, Vec<u32>)], range: &RangeInclusive<u32>, adopted: &[u32]) -> Vec<u32> {
    let stray = |uids: &Vec<u32>| uids.iter().any(|u| range.contains(u) && !adopted.contains(u));
    procs.iter().filter(|(_, uids)| stray(uids)).map(|(pid, _)| *pid).collect()
}

/// A grant taken up from the journal is undone only on the very file it was made on: the
/// recorded inode, still with one link.
pub fn check_grant_node(r: &GrantRecord, inode: (u64, u64), nlink: u64) -> Result<(), String> {
    if inode != r.inode || nlink != 1 {
        return Err(format!("{} is no longer the granted file: its grant cannot be undone", r.path));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: u32, start: u64) -> Entry {
        Entry {
            vm: "a".into(),
            uid: 63300,
            pid: Some(pid),
            start_time: Some(start),
            exe: None,
            taps: vec!["mh63300n0".into()],
            grants: vec![],
        }
    }

    fn stat(start: u64) -> String {
        format!("42 (cloud hyp) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 10")
    }

    const STATUS: &str = "Name:\tch\nUid:\t63300\t63300\t63300\t63300\nNSpid:\t42\t1\n";

    #[test]
    fn start_time_counts_fields_after_the_last_parenthesis() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("42 (x) S 1"), None);
        assert_eq!(start_time("no parenthesis"), None);
    }

    #[test]
    fn only_the_recorded_vmm_is_adopted() {
        let e = entry(42, 987654);
        assert_eq!(check_vmm(&e, &stat(987654), STATUS), Ok(42));
        assert!(matches!(check_vmm(&e, &stat(5), STATUS), Err(NotAdopted::Reused { found: Some(5), .. })));
        let other_uid = STATUS.replace("63300\t63300\t63300\t63300", "65534\t65534\t65534\t65534");
        assert!(matches!(check_vmm(&e, &stat(987654), &other_uid), Err(NotAdopted::WrongUid { .. })));
        let setuid = STATUS.replace("63300\t63300\t63300\t63300", "63300\t0\t63300\t63300");
        assert!(matches!(check_vmm(&e, &stat(987654), &setuid), Err(NotAdopted::WrongUid { .. })));
        for nspid in ["NSpid:\t42\n", "NSpid:\t42\t7\n", "NSpid:\t42\t3\t1\n", "NSpid:\t43\t1\n", ""] {
            let s = STATUS.replace("NSpid:\t42\t1\n", nspid);
            assert!(matches!(check_vmm(&e, &stat(987654), &s), Err(NotAdopted::NotNamespaced { .. })), "{nspid}");
        }
        let never = Entry { pid: None, start_time: None, ..entry(42, 1) };
        assert_eq!(check_vmm(&never, &stat(1), STATUS), Err(NotAdopted::NotRecorded));
    }

    #[test]
    fn a_journal_is_checked_before_the_broker_acts_on_it() {
        let range = 63300..=63399;
        let bytes = postcard::to_stdvec(&vec![entry(42, 1)]).unwrap();
        assert_eq!(decode(&bytes, &range).unwrap().len(), 1);
        assert!(matches!(decode(&[1, 1, b'a'], &range), Err(JournalError::Corrupt(_))));
        assert!(matches!(decode(&bytes, &(1..=2)), Err(JournalError::OutsideRange { .. })));
        let mut bad_tap = entry(42, 1);
        bad_tap.taps = vec!["eth0".into()];
        let bytes = postcard::to_stdvec(&vec![bad_tap]).unwrap();
        assert!(matches!(decode(&bytes, &range), Err(JournalError::TapName { .. })));
        let bytes = postcard::to_stdvec(&vec![entry(1, 1), Entry { vm: "b".into(), ..entry(2, 2) }]).unwrap();
        assert_eq!(decode(&bytes, &range), Err(JournalError::SharedUid(63300)));
        assert_eq!(decode(&[0], &range), Ok(vec![]));
    }

    #[test]
    fn strays_are_vm_uid_processes_of_no_adopted_vm() {
        let procs =
            vec![(1, vec![0, 0, 0, 0]), (2, vec![63300; 4]), (3, vec![63301; 4]), (4, vec![1000, 63302, 1000, 1000])];
        assert_eq!(strays(&procs, &(63300..=63399), &[63300]), vec![3, 4]);
    }

    #[test]
    fn a_grant_is_taken_up_only_on_its_own_file() {
        let r = GrantRecord {
            path: "/img/a.raw".into(),
            role: ImageRole::Disk { readonly: false },
            inode: (1, 2),
            restore: Restore::Nothing,
        };
        assert_eq!(check_grant_node(&r, (1, 2), 1), Ok(()));
        let refused = "/img/a.raw is no longer the granted file: its grant cannot be undone";
        assert_eq!(check_grant_node(&r, (1, 3), 1).unwrap_err(), refused);
        assert_eq!(check_grant_node(&r, (2, 2), 1).unwrap_err(), refused);
        assert_eq!(check_grant_node(&r, (1, 2), 2).unwrap_err(), refused);
    }
}
