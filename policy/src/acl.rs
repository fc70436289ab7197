//! The POSIX ACL entry a read-only image grant adds for a VM uid, and how it comes off
//! again, on the kernel's xattr form of `system.posix_acl_access`: a little-endian u32
//! version 2, then (u16 tag, u16 perm, u32 id) entries sorted by tag, then id.
//!
//! Several VMs may share one read-only image, so the broker counts grants per inode. The
//! first grant saves the file's original ACL bytes and mode; a revoke that is not the last
//! only takes its own entry off ([`without_uid`]); the last one writes the saved bytes and
//! mode back exactly, so that no mask or group bit stays wider than before.

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
}
