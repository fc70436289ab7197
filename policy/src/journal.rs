//! The broker's journal record: what it holds for each VM (uid, VMM pid and start time,
//! binary, taps, grants). The broker rewrites it after every change and refuses to start
//! while an earlier broker's journal still lists VMs.

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

/// The start time (field 22) of a /proc/PID/stat line.
pub fn start_time(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: count fields after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("lists VMs an earlier broker held; stop their VMMs, undo their grants and remove the file")]
pub struct HeldByEarlier;

/// A journal found at start must list no VM: postcard writes an empty list as one zero byte.
pub fn check_found(bytes: &[u8]) -> Result<(), HeldByEarlier> {
    if bytes == [0] { Ok(()) } else { Err(HeldByEarlier) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_counts_fields_after_the_last_parenthesis() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("42 (x) S 1"), None);
        assert_eq!(start_time("no parenthesis"), None);
    }

    #[test]
    fn only_an_empty_journal_is_accepted_at_start() {
        assert_eq!(check_found(&[0]), Ok(()));
        assert_eq!(check_found(&[1, 1, b'a']), Err(HeldByEarlier));
        assert_eq!(check_found(&[]), Err(HeldByEarlier));
    }
}
