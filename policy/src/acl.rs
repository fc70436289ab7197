//! The POSIX ACL entry a read-only image grant adds for a VM uid, and how it comes off
//! again, on the kernel's xattr form of `system.posix_acl_access`: a little-endian u32
//! version 2, then (u16 tag, u16 perm, u32 id) entries sorted by tag, then id.
//!
//! Several VMs may share one read-only image, so the broker counts grants per inode. The
//! first grant saves the file's original ACL bytes and mode; a revoke that is not the last
//! only takes its own entry off ([`without_uid`]); the last one writes the saved bytes and
//! mode back exactly, so that no mask or group bit stays wider than before.

use std::collections::BTreeMap;

use crate::journal::Restore;

pub const XATTR: &std::ffi::CStr = c"system.posix_acl_access";
pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;
pub const READ: u16 = 4;
pub const NO_ID: u32 = u32::MAX;

/// (tag, permissions, id)
pub type Entry = (u16, u16, u32);

pub fn decode(bytes: &[u8]) -> Vec<Entry> {
    let body = bytes.get(4..).unwrap_or_default();
    body.chunks_exact(8)
        .map(|c| {
            (
                u16::from_le_bytes([c[0], c[1]]),
                u16::from_le_bytes([c[2], c[3]]),
                u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect()
}

pub fn encode(mut entries: Vec<Entry>) -> Vec<u8> {
    entries.sort_by_key(|&(tag, _, id)| (tag, id));
    let mut buf = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        buf.extend(tag.to_le_bytes());
        buf.extend(perm.to_le_bytes());
        buf.extend(id.to_le_bytes());
    }
    buf
}

/// The ACL with a read entry for `uid` added: to the existing ACL, or to one made from the
/// file's `mode` when it has none. An existing mask only gains read, so that no other named
/// entry's effective rights grow beyond that; a new ACL's mask is the group class's union.
pub fn with_reader(existing: Option<Vec<Entry>>, mode: u32, uid: u32) -> Vec<Entry> {
    let perm = |shift: u32| ((mode >> shift) & 7) as u16;
    let mut entries = existing
        .unwrap_or_else(|| vec![(USER_OBJ, perm(6), NO_ID), (GROUP_OBJ, perm(3), NO_ID), (OTHER, perm(0), NO_ID)]);
    let old_mask = entries.iter().find(|e| e.0 == MASK).map(|e| e.1);
    entries.retain(|&(tag, _, id)| !(tag == USER && id == uid) && tag != MASK);
    entries.push((USER, READ, uid));
    let group_class = entries.iter().filter(|e| matches!(e.0, USER | GROUP | GROUP_OBJ)).fold(0, |m, e| m | e.1);
    entries.push((MASK, old_mask.map_or(group_class, |m| m | READ), NO_ID));
    entries
}

/// The ACL with `uid`'s named entry taken off and everything else, the mask included, as it
/// is: another VM sharing the image still needs its read.
pub fn without_uid(mut entries: Vec<Entry>, uid: u32) -> Vec<Entry> {
    entries.retain(|&(tag, _, id)| !(tag == USER && id == uid));
    entries
}

/// Read-only images granted by ACL, by inode (st_dev, st_ino): how many grants hold each,
/// and the ACL bytes (none if it had no ACL) and mode it had before the first.
#[derive(Debug, Default)]
pub struct Shares(BTreeMap<(u64, u64), Shared>);

#[derive(Debug)]
struct Shared {
    count: u32,
    original: Option<Vec<u8>>,
    mode: u32,
}

/// What a revoke does to the file.
#[derive(Debug, PartialEq, Eq)]
pub enum Revoke {
    /// No grant by ACL holds the inode: nothing.
    Nothing,
    /// Other grants still hold it: take only this uid's entry off ([`without_uid`]).
    Entry,
    /// The last grant: write the saved ACL bytes back (or remove the ACL if there were
    /// none), then the saved mode.
    Restore { original: Option<Vec<u8>>, mode: u32 },
}

impl Shares {
    /// The ACL bytes that add `uid`'s read entry to the file's `current` ACL bytes (None if
    /// it has no ACL) and `mode` (st_mode). The first grant on `inode` saves both; report
    /// whether writing the bytes worked with [`Shares::granted`].
    pub fn grant(&mut self, inode: (u64, u64), current: Option<Vec<u8>>, mode: u32, uid: u32) -> Vec<u8> {
        let bytes = encode(with_reader(current.as_deref().map(decode), mode, uid));
        self.0.entry(inode).or_insert(Shared { count: 0, original: current, mode: mode & 0o7777 });
        bytes
    }

    /// Counts a grant whose write worked; forgets an inode whose first grant failed.
    pub fn granted(&mut self, inode: (u64, u64), written: bool) {
        match self.0.get_mut(&inode) {
            Some(s) if written => s.count += 1,
            Some(s) if s.count == 0 => drop(self.0.remove(&inode)),
            _ => {}
        }
    }

    pub fn revoke(&self, inode: (u64, u64)) -> Revoke {
        match self.0.get(&inode) {
            None => Revoke::Nothing,
            Some(s) if s.count > 1 => Revoke::Entry,
            Some(s) => Revoke::Restore { original: s.original.clone(), mode: s.mode },
        }
    }

    /// After a revoke's writes worked: one grant fewer; the last one forgets the inode.
    pub fn revoked(&mut self, inode: (u64, u64)) {
        if let Some(s) = self.0.get_mut(&inode) {
            s.count = s.count.saturating_sub(1);
            if s.count == 0 {
                self.0.remove(&inode);
            }
        }
    }

    /// What the journal records to restore `inode`, if a grant by ACL holds it.
    pub fn saved(&self, inode: (u64, u64)) -> Option<Restore> {
        self.0.get(&inode).map(|s| Restore::Acl { original: s.original.clone(), mode: s.mode })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_and_revoke_round_trip() {
        // A 0640 file: owner rw, group r, others nothing.
        let a = with_reader(None, 0o640, 61001);
        assert_eq!(decode(&encode(a.clone())), {
            let mut s = a.clone();
            s.sort_by_key(|&(t, _, id)| (t, id));
            s
        });
        assert!(a.contains(&(USER, READ, 61001)));
        assert!(a.contains(&(MASK, READ, NO_ID)), "mask covers group r and the new entry");
        // A second VM's grant, then the first one's removal, keeps the second.
        let b = with_reader(Some(a), 0o640, 61002);
        let left = without_uid(b, 61001);
        assert!(left.contains(&(USER, READ, 61002)) && !left.iter().any(|e| e.2 == 61001));
        assert!(left.contains(&(MASK, READ, NO_ID)), "the second VM keeps its read through the mask");
    }

    #[test]
    fn named_entries_and_mask_survive_encoding() {
        let original = vec![
            (USER_OBJ, 6, NO_ID),
            (USER, 6, 34),
            (GROUP_OBJ, 4, NO_ID),
            (GROUP, 2, 50),
            (MASK, 2, NO_ID),
            (OTHER, 0, NO_ID),
        ];
        let bytes = encode(original.clone());
        assert_eq!(decode(&bytes), original);
        let granted = with_reader(Some(decode(&bytes)), 0o620, 61001);
        assert!(granted.contains(&(MASK, 2 | READ, NO_ID)) && granted.contains(&(GROUP, 2, 50)));
        // Taking the entry off alone would leave the mask wider: only the saved bytes restore it.
        assert_ne!(encode(without_uid(granted, 61001)), bytes);
    }

    #[test]
    fn an_existing_mask_only_gains_read() {
        // user:backup:rw- limited by mask::r-- must stay limited.
        let existing =
            vec![(USER_OBJ, 6, NO_ID), (USER, 6, 34), (GROUP_OBJ, 4, NO_ID), (MASK, 4, NO_ID), (OTHER, 0, NO_ID)];
        let a = with_reader(Some(existing), 0o640, 61001);
        assert!(a.contains(&(MASK, READ, NO_ID)), "{a:?}");
    }

    #[test]
    fn shares_count_grants_and_only_the_last_revoke_restores() {
        let (inode, original) =
            ((1, 2), Some(encode(vec![(USER_OBJ, 6, NO_ID), (GROUP_OBJ, 0, NO_ID), (OTHER, 0, NO_ID)])));
        let mut shares = Shares::default();
        let first = shares.grant(inode, original.clone(), 0o100600, 61001);
        assert!(decode(&first).contains(&(USER, READ, 61001)));
        shares.granted(inode, true);
        // The second grant builds on the file's current ACL, and does not overwrite the saved one.
        let second = shares.grant(inode, Some(first), 0o100640, 61002);
        assert!(decode(&second).contains(&(USER, READ, 61001)) && decode(&second).contains(&(USER, READ, 61002)));
        shares.granted(inode, true);
        let restore = Revoke::Restore { original: original.clone(), mode: 0o600 };
        assert_eq!(shares.saved(inode), Some(Restore::Acl { original: original.clone(), mode: 0o600 }));
        assert_eq!(shares.revoke(inode), Revoke::Entry);
        shares.revoked(inode);
        assert_eq!(shares.revoke(inode), restore, "the last grant restores the saved bytes and mode");
        shares.revoked(inode);
        assert!(shares.is_empty() && shares.revoke(inode) == Revoke::Nothing && shares.saved(inode).is_none());
        // A first grant whose write failed leaves nothing behind; a later one that fails keeps the count.
        shares.grant(inode, None, 0o100600, 61001);
        shares.granted(inode, false);
        assert!(shares.is_empty());
        shares.grant(inode, None, 0o100600, 61001);
        shares.granted(inode, true);
        shares.grant(inode, None, 0o100600, 61002);
        shares.granted(inode, false);
        assert_eq!(shares.revoke(inode), Revoke::Restore { original: None, mode: 0o600 });
    }
}
