//! Granting a VM its images. Each path is opened O_PATH beneath an image root with openat2
//! (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), so that nothing on the way can block; only a
//! regular file with one link is then reopened for I/O through that handle, and it must be
//! reachable by the VM uid. Writable disks are handed to the VM uid by fchown for the VM's
//! life; read-only images get a POSIX ACL entry when they are not already world-readable,
//! counted per inode, and the last revoke writes the original ACL bytes and mode back.
//! Revoking goes through the fd kept open since the grant.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use my_hypervisor_broker_proto::{Image, ImageRole};
use my_hypervisor_policy::acl::Shares;
use my_hypervisor_policy::check_path_text;
use my_hypervisor_policy::journal::{GrantRecord, Restore, check_grant_node};
use my_hypervisor_policy::layout::{
    VM_RUN_DIR_MODE, check_image_file, check_searchable, image_root_of, shares_conflict,
};
use my_hypervisor_policy::vmm::FieldError;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, fchmod, fstat, mkdirat};

use crate::dirs::chown_fd;
use crate::table::{Broker, Refusal, Vm, Vmm};

pub struct Grant {
    pub path: String,
    pub role: ImageRole,
    /// (st_dev, st_ino): a writable disk belongs to one VM at a time.
    pub inode: (u64, u64),
    /// Also bound into the VMM's minimal root (ADR 0003).
    pub fd: OwnedFd,
    /// What revoking restores; an ACL grant takes `vm_uid`'s entry off (`policy::acl`).
    undo: Restore,
    vm_uid: u32,
}

impl Grant {
    pub fn writable(&self) -> bool {
        self.role.writable()
    }

    /// What the journal keeps of this grant.
    pub fn record(&self) -> GrantRecord {
        GrantRecord { path: self.path.clone(), role: self.role, inode: self.inode, restore: self.undo.clone() }
    }

    /// A grant an earlier broker made, taken up again from its journal record: the path is
    /// opened beneath its image root as at the grant, and must still be the recorded inode.
    pub fn adopt(b: &mut Broker, vm_uid: u32, r: &GrantRecord) -> Result<Grant, String> {
        let node = open_beneath(&b.image_roots, &r.path)?;
        let st = fstat(node.as_fd()).map_err(|e| format!("{}: {e}", r.path))?;
        check_grant_node(r, (st.st_dev, st.st_ino), st.st_nlink as u64)?;
        let access = if r.role.writable() { OFlag::O_RDWR } else { OFlag::O_RDONLY };
        let fd = crate::vmm::reopen(&node, access).map_err(|e| format!("{}: reopen: {e}", r.path))?;
        if let Restore::Acl { original, mode } = &r.restore {
            b.acls.grant(r.inode, original.clone(), *mode, vm_uid);
            b.acls.granted(r.inode, true);
        }
        Ok(Grant { path: r.path.clone(), role: r.role, inode: r.inode, fd, undo: r.restore.clone(), vm_uid })
    }
}

/// Opens and grants one image to `vm_uid` for VM `vm`, whose grants so far in this Prepare
/// are `pending`.
pub fn grant(b: &mut Broker, vm: &str, pending: &[Grant], vm_uid: u32, image: &Image) -> Result<Grant, Refusal> {
    let path = image.path.as_str();
    let refuse = |why: String| Refusal::Image { path: path.to_string(), why };
    check_path_text(path).map_err(FieldError::from)?;
    let writable = image.role.writable();
    let node = open_beneath(&b.image_roots, path).map_err(refuse)?;
    let st = fstat(node.as_fd())?;
    check_image_file(st.st_mode, st.st_nlink as u64, writable).map_err(|why| refuse(why.into()))?;
    let inode = (st.st_dev, st.st_ino);
    // Held by another VM, or by this one through an earlier image of the same Prepare.
    let others = b.vms.iter().flat_map(|(id, v)| v.grants.iter().map(move |g| (id.as_str(), g)));
    let mut all = others.chain(pending.iter().map(|g| (vm, g)));
    if let Some((other, _)) = all.find(|(_, g)| g.inode == inode && shares_conflict(writable, g.writable())) {
        return Err(refuse(format!("is already granted to VM {other}, and a writable disk belongs to one VM")));
    }
    // Every directory above the image must be searchable by the VM uid.
    for dir in Path::new(path).ancestors().skip(1) {
        let mode = std::fs::metadata(dir).map_err(|e| refuse(format!("{}: {e}", dir.display())))?.permissions().mode();
        check_searchable(dir, mode, Path::new(path)).map_err(refuse)?;
    }
    // A regular file (a FIFO or a device would have been refused above): now opened for I/O,
    // through the handle, so it is the same inode.
    let access = if writable { OFlag::O_RDWR } else { OFlag::O_RDONLY };
    let fd = crate::vmm::reopen(&node, access).map_err(|e| refuse(format!("reopen: {e}")))?;
    let undo = if writable {
        chown_fd(&fd, vm_uid, vm_uid).map_err(|e| refuse(format!("chown to the VM uid: {e}")))?;
        Restore::Owner { uid: st.st_uid, gid: st.st_gid }
    } else if st.st_mode & 0o004 != 0 {
        Restore::Nothing
    } else {
        acl::add_reader(&fd, &mut b.acls, inode, st.st_mode, vm_uid)
            .map_err(|e| refuse(format!("grant read by ACL: {e}")))?;
        // The ACL and mode before the first grant on this inode, shared by every grant of it.
        b.acls.saved(inode).unwrap_or(Restore::Nothing)
    };
    Ok(Grant { path: path.to_string(), role: image.role, inode, fd, undo, vm_uid })
}

/// Opens `path` O_PATH beneath its image root, with no symlink on the way.
fn open_beneath(roots: &[(PathBuf, OwnedFd)], path: &str) -> Result<OwnedFd, String> {
    let ((root, root_fd), rel) = image_root_of(roots, path).ok_or("is not under any image root")?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(root_fd.as_fd(), rel, how).map_err(|e| format!("open beneath {}: {e}", root.display()))
}

/// Grants every image, then creates the VM's runtime dir (new, on its own tmpfs owned by
/// `uid`, 0700): a refused image costs no dir and no mount. On any failure, undoes what was
/// done so far: nothing is left behind.
pub fn prepare(b: &mut Broker, vm: &str, uid: u32, images: &[Image]) -> Result<Vm, Refusal> {
    let mut grants: Vec<Grant> = Vec::new();
    let granted = images.iter().try_for_each(|image| grant(b, vm, &grants, uid, image).map(|g| grants.push(g)));
    let dir = granted.and_then(|()| {
        let mode = Mode::from_bits_truncate(VM_RUN_DIR_MODE);
        mkdirat(b.run_fd.as_fd(), vm, mode).map_err(|e| Refusal::RunDir(format!("create {vm}: {e}")))?;
        crate::vmm::open_run_dir(b, vm, uid).inspect_err(|_| drop(crate::vmm::remove_run_dir(b, vm)))
    });
    let dir = dir.inspect_err(|_| grants.iter().for_each(|g| drop(revoke(g, &mut b.acls))))?;
    Ok(Vm { uid, dir, grants, taps: vec![], vmm: Vmm::NotSpawned })
}

/// Undoes a grant through its fd. Safe to call on a grant that needs nothing undone.
pub fn revoke(g: &Grant, acls: &mut Shares) -> Result<(), String> {
    match g.undo {
        Restore::Nothing => Ok(()),
        Restore::Owner { uid, gid } => chown_fd(&g.fd, uid, gid).map_err(|e| format!("{}: restore owner: {e}", g.path)),
        Restore::Acl { .. } => acl::remove_reader(&g.fd, acls, g.inode, g.vm_uid)
            .map_err(|e| format!("{}: revoke the ACL grant: {e}", g.path)),
    }
}

/// The ACL calls; what the entries are is `policy::acl`.
mod acl {
    use super::*;
    use my_hypervisor_policy::acl::{Revoke, XATTR, decode, encode, without_uid};

    /// The raw `system.posix_acl_access` bytes, or None if the file has no ACL.
    fn read(fd: &OwnedFd) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 65536]; // XATTR_SIZE_MAX
        // SAFETY: the buffer is valid for its length; the kernel writes at most that much.
        let n = unsafe { libc::fgetxattr(fd.as_raw_fd(), XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(n.max(0) as usize);
        Ok(found(n)?.then_some(buf))
    }

    /// Whether an xattr call found the ACL: false for ENODATA (the file has none).
    fn found(r: isize) -> std::io::Result<bool> {
        let e = std::io::Error::last_os_error();
        if r >= 0 || e.raw_os_error() == Some(libc::ENODATA) { Ok(r >= 0) } else { Err(e) }
    }

    fn write(fd: &OwnedFd, buf: &[u8]) -> std::io::Result<()> {
        // SAFETY: the buffer is valid for its length.
        let r = unsafe { libc::fsetxattr(fd.as_raw_fd(), XATTR.as_ptr(), buf.as_ptr().cast(), buf.len(), 0) };
        crate::unpriv::sys("fsetxattr", r.into()).map(drop)
    }

    /// Adds `uid`'s read entry; the first grant on an inode saves its ACL and mode first.
    pub fn add_reader(fd: &OwnedFd, acls: &mut Shares, inode: (u64, u64), mode: u32, uid: u32) -> std::io::Result<()> {
        let bytes = acls.grant(inode, read(fd)?, mode, uid);
        let written = write(fd, &bytes);
        acls.granted(inode, written.is_ok());
        written
    }

    /// Takes `uid`'s entry off while other grants hold the inode; the last one restores the
    /// saved ACL bytes (or removes the ACL) and the saved mode, exactly.
    pub fn remove_reader(fd: &OwnedFd, acls: &mut Shares, inode: (u64, u64), uid: u32) -> std::io::Result<()> {
        match acls.revoke(inode) {
            Revoke::Nothing => return Ok(()),
            Revoke::Entry => {
                if let Some(current) = read(fd)? {
                    write(fd, &encode(without_uid(decode(&current), uid)))?;
                }
            }
            Revoke::Restore { original, mode } => {
                match original {
                    Some(bytes) => write(fd, &bytes)?,
                    // SAFETY: plain syscall on an owned fd with a NUL-terminated name.
                    None => drop(found(unsafe { libc::fremovexattr(fd.as_raw_fd(), XATTR.as_ptr()) } as isize)?),
                }
                fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))?;
            }
        }
        acls.revoked(inode);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use my_hypervisor_policy::acl::{
        GROUP, GROUP_OBJ, MASK, NO_ID, OTHER, READ, USER, USER_OBJ, XATTR, decode, encode,
    };
    use nix::fcntl::open;

    fn xattr(p: &Path) -> Option<Vec<u8>> {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        let mut buf = vec![0u8; 65536];
        // SAFETY: valid NUL-terminated path and a buffer valid for its length.
        let n = unsafe { libc::getxattr(c.as_ptr(), XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    }

    /// A file with a mask and named entries: two VMs are granted read, the first revoke
    /// leaves the second's entry, and the last one puts back the exact original bytes and mode.
    #[test]
    fn acl_grant_then_revoke_restores_the_exact_original() {
        let dir = PathBuf::from(format!("/var/tmp/myhv-acl-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o755)).unwrap();
        let file = dir.join("kernel");
        std::fs::write(&file, b"k").unwrap();
        std::fs::set_permissions(&file, PermissionsExt::from_mode(0o620)).unwrap();
        let original_acl = vec![
            (USER_OBJ, 6, NO_ID),
            (USER, 6, 34),
            (GROUP_OBJ, 2, NO_ID),
            (GROUP, 2, 50),
            (MASK, 2, NO_ID),
            (OTHER, 0, NO_ID),
        ];
        let c = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
        let bytes = encode(original_acl.clone());
        // SAFETY: valid path and buffer.
        let r = unsafe { libc::setxattr(c.as_ptr(), XATTR.as_ptr(), bytes.as_ptr().cast(), bytes.len(), 0) };
        assert_eq!(r, 0, "set the original ACL: {}", std::io::Error::last_os_error());
        let original = xattr(&file).unwrap();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        let root_fd = open(&dir, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
        let mut br = crate::table::tests::broker(&dir);
        br.image_roots = vec![(dir.clone(), root_fd)];
        let image = Image { path: file.to_str().unwrap().into(), role: ImageRole::Kernel };
        let a = grant(&mut br, "a", &[], 62001, &image).unwrap();
        let b = grant(&mut br, "b", &[], 62002, &image).unwrap();
        let both = decode(&xattr(&file).unwrap());
        assert!(both.contains(&(USER, READ, 62001)) && both.contains(&(USER, READ, 62002)), "{both:?}");
        assert!(matches!(a.record().restore, Restore::Acl { original: Some(ref o), .. } if *o == original));
        revoke(&a, &mut br.acls).unwrap();
        let left = decode(&xattr(&file).unwrap());
        assert!(left.contains(&(USER, READ, 62002)) && !left.iter().any(|e| e.2 == 62001), "{left:?}");
        assert!(left.contains(&(MASK, 2 | READ, NO_ID)), "the second VM keeps read: {left:?}");
        revoke(&b, &mut br.acls).unwrap();
        assert_eq!(xattr(&file).unwrap(), original, "the exact original ACL bytes");
        assert_eq!(decode(&original), original_acl);
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode(), mode, "the original mode");
        assert!(br.acls.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_is_refused_without_opening_it() {
        let dir = PathBuf::from(format!("/var/tmp/myhv-fifo-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        nix::unistd::mkfifo(&dir.join("k"), Mode::from_bits_truncate(0o644)).unwrap();
        let mut br = crate::table::tests::broker(&dir);
        br.image_roots = vec![(dir.clone(), open(&dir, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).unwrap())];
        let image = Image { path: dir.join("k").to_str().unwrap().into(), role: ImageRole::Kernel };
        let r = grant(&mut br, "a", &[], 62001, &image);
        assert!(matches!(r, Err(Refusal::Image { ref why, .. }) if why == "is not a regular file"), "{:?}", r.err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
