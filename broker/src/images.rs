//! Granting a VM its images. Each path is opened beneath an image root with openat2
//! (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), must be a regular file, and must be reachable by
//! the VM uid. Writable disks are handed to the VM uid by fchown for the VM's life; read-only
//! images get a POSIX ACL entry when they are not already world-readable. Revoking undoes
//! exactly what granting did, through the fd kept open since.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use my_hypervisor_broker_proto::{Image, ImageRole};
use my_hypervisor_policy::check_path_text;
use my_hypervisor_policy::layout::VM_RUN_DIR_MODE;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, mkdirat};
use nix::unistd::{Gid, Uid, fchown};

use crate::table::{Broker, Refusal, Vm, Vmm};

pub struct Grant {
    pub path: String,
    pub role: ImageRole,
    /// (st_dev, st_ino): a writable disk belongs to one VM at a time.
    pub inode: (u64, u64),
    /// Also bound into the VMM's minimal root (ADR 0003).
    pub fd: OwnedFd,
    undo: Undo,
}

enum Undo {
    Nothing,
    Chown { uid: u32, gid: u32 },
    AclEntry { uid: u32 },
}

impl Grant {
    pub fn writable(&self) -> bool {
        self.role.writable()
    }
}

/// Opens and grants one image to `vm_uid`. `taken` says whether another VM holds the inode
/// in a way that conflicts with this grant.
pub fn grant(
    roots: &[(PathBuf, OwnedFd)],
    vm_uid: u32,
    image: &Image,
    taken: impl Fn((u64, u64), bool) -> Option<String>,
) -> Result<Grant, String> {
    let path = image.path.as_str();
    check_path_text(path).map_err(|e| e.to_string())?;
    let (root, rel) = roots
        .iter()
        .find_map(|(r, fd)| Path::new(path).strip_prefix(r).ok().map(|rel| ((r, fd), rel)))
        .filter(|(_, rel)| !rel.as_os_str().is_empty())
        .ok_or_else(|| format!("{path} is not under any image root"))?;
    let writable = image.role.writable();
    let access = if writable { OFlag::O_RDWR } else { OFlag::O_RDONLY };
    let how = OpenHow::new()
        .flags(access | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd =
        openat2(root.1.as_fd(), rel, how).map_err(|e| format!("{path}: open beneath {}: {e}", root.0.display()))?;
    let st = fstat(fd.as_fd()).map_err(|e| format!("{path}: fstat: {e}"))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(format!("{path} is not a regular file"));
    }
    let inode = (st.st_dev, st.st_ino);
    if let Some(other) = taken(inode, writable) {
        return Err(format!("{path} is already granted to VM {other}, and a writable disk belongs to one VM"));
    }
    check_traversable(Path::new(path))?;
    let undo = if writable {
        if st.st_mode & 0o600 != 0o600 || st.st_nlink != 1 {
            return Err(format!("{path}: a writable disk must be owner-rw and have exactly one link"));
        }
        fchown(fd.as_fd(), Some(Uid::from_raw(vm_uid)), Some(Gid::from_raw(vm_uid)))
            .map_err(|e| format!("{path}: chown to the VM uid: {e}"))?;
        Undo::Chown { uid: st.st_uid, gid: st.st_gid }
    } else if st.st_mode & 0o004 != 0 {
        Undo::Nothing
    } else {
        acl::add_reader(&fd, st.st_mode, vm_uid).map_err(|e| format!("{path}: grant read by ACL: {e}"))?;
        Undo::AclEntry { uid: vm_uid }
    };
    Ok(Grant { path: path.to_string(), role: image.role, inode, fd, undo })
}

/// Creates the VM's runtime dir (new, owned by `uid`, 0700) and grants every image. On any
/// failure, undoes what was done so far: nothing is left behind.
pub fn prepare(b: &Broker, vm: &str, uid: u32, images: &[Image]) -> Result<Vm, Refusal> {
    let mode = Mode::from_bits_truncate(VM_RUN_DIR_MODE);
    mkdirat(b.run_fd.as_fd(), vm, mode).map_err(|e| format!("create runtime dir {vm}: {e}"))?;
    let mut grants: Vec<Grant> = Vec::new();
    let result = (|| {
        let dir = crate::vmm::open_run_dir(b, vm, uid)?;
        for image in images {
            let held = |inode, writable: bool| {
                let mut all = b.vms.iter().flat_map(|(id, v)| v.grants.iter().map(move |g| (id, g)));
                all.find(|(_, g)| g.inode == inode && (writable || g.writable())).map(|(id, _)| id.clone())
            };
            let g = grant(&b.image_roots, uid, image, |inode, w| {
                held(inode, w)
                    .or_else(|| grants.iter().find(|g| g.inode == inode && (w || g.writable())).map(|_| vm.to_string()))
            })?;
            grants.push(g);
        }
        Ok::<_, Refusal>(dir)
    })();
    match result {
        Ok(dir) => Ok(Vm { uid, dir, grants, taps: vec![], vmm: Vmm::NotSpawned }),
        Err(e) => {
            grants.iter().for_each(|g| drop(revoke(g)));
            let _ = crate::vmm::remove_run_dir(b, vm);
            Err(e)
        }
    }
}

/// Undoes a grant through its fd. Safe to call on a grant that needs nothing undone.
pub fn revoke(g: &Grant) -> Result<(), String> {
    match g.undo {
        Undo::Nothing => Ok(()),
        Undo::Chown { uid, gid } => fchown(g.fd.as_fd(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| format!("{}: restore owner: {e}", g.path)),
        Undo::AclEntry { uid } => {
            acl::remove_reader(&g.fd, uid).map_err(|e| format!("{}: remove ACL entry: {e}", g.path))
        }
    }
}

/// Every directory above the image must be searchable by a uid that is neither its owner
/// nor in its group, which is what a VM uid is.
fn check_traversable(path: &Path) -> Result<(), String> {
    for dir in path.ancestors().skip(1) {
        let mode = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?.permissions().mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "{} is not searchable by the VM uid (mode {:o}); {} cannot be reached",
                dir.display(),
                mode & 0o7777,
                path.display()
            ));
        }
    }
    Ok(())
}

/// The ACL calls; what the entries are is `policy::acl`.
mod acl {
    use super::*;
    use my_hypervisor_policy::acl::{Entry, Removal, XATTR, decode, encode, with_reader, without_reader};

    fn read(fd: &OwnedFd) -> std::io::Result<Option<Vec<Entry>>> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: the buffer is valid for its length; the kernel writes at most that much.
        let n = unsafe { libc::fgetxattr(fd.as_raw_fd(), XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENODATA) { Ok(None) } else { Err(e) };
        }
        Ok(Some(decode(&buf[..n as usize])))
    }

    fn write(fd: &OwnedFd, entries: Vec<Entry>) -> std::io::Result<()> {
        let buf = encode(entries);
        // SAFETY: the buffer is valid for its length.
        let r = unsafe { libc::fsetxattr(fd.as_raw_fd(), XATTR.as_ptr(), buf.as_ptr().cast(), buf.len(), 0) };
        if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    pub fn add_reader(fd: &OwnedFd, mode: u32, uid: u32) -> std::io::Result<()> {
        write(fd, with_reader(read(fd)?, mode, uid))
    }

    /// Removes `uid`'s entry; when only what a mode can express is left, removes the ACL and
    /// puts the group bits back.
    pub fn remove_reader(fd: &OwnedFd, uid: u32) -> std::io::Result<()> {
        let Some(entries) = read(fd)? else { return Ok(()) };
        match without_reader(entries, uid) {
            Removal::Write(entries) => write(fd, entries),
            Removal::Drop { group_perm } => {
                // SAFETY: plain syscall on an owned fd with a NUL-terminated name.
                if unsafe { libc::fremovexattr(fd.as_raw_fd(), XATTR.as_ptr()) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let st = fstat(fd.as_fd())?;
                fchmod(fd.as_fd(), Mode::from_bits_truncate((st.st_mode & !0o070 & 0o7777) | group_perm << 3))?;
                Ok(())
            }
        }
    }
}
