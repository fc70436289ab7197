//! Creates and checks the daemon's directories, and binds the RPC socket.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use my_hypervisor_policy::layout::{self, DirRole, Enforce, Ids, check_image_root_owner};
use nix::fcntl::{OFlag, open};
use nix::sys::stat::{Mode, fchmod, fstat, umask};
use nix::unistd::{Gid, Uid, fchown};

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> String {
    format!("{}: {what}: {e}", path.display())
}

/// Opens the directory `path` itself, never through a symlink there.
/// fchown(2) to raw ids.
pub fn chown_fd(fd: &impl AsFd, uid: u32, gid: u32) -> nix::Result<()> {
    fchown(fd.as_fd(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
}

pub fn open_dir(path: &Path, what: &str) -> Result<OwnedFd, String> {
    open(path, OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| err(path, what, e))
}

/// Makes `path` a real directory (never a symlink) with the owner and mode its role
/// demands, creating it and any missing parents (root 0755) if needed.
pub fn ensure_dir(path: &Path, role: DirRole, frontend: Ids) -> Result<(), String> {
    let (owner, mode, enforce) = layout::dir_rule(role);
    let ids = owner.ids(frontend);
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(|e| err(parent, "create", e))?;
    }
    let created = match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(err(path, "create", e)),
    };
    let fd = open_dir(path, "open (a symlink is refused)")?;
    let st = fstat(fd.as_fd()).map_err(|e| err(path, "fstat", e))?;
    layout::check_is_dir(st.st_mode).map_err(|e| err(path, "check", e))?;
    if !created && enforce == Enforce::CreateOnly {
        return Ok(());
    }
    chown_fd(&fd, ids.uid, ids.gid).map_err(|e| err(path, "chown", e))?;
    fchmod(fd.as_fd(), Mode::from_bits_truncate(mode)).map_err(|e| err(path, "chmod", e))?;
    tracing::info!(path = %path.display(), uid = ids.uid, gid = ids.gid, mode = format!("{mode:o}"), "directory ready");
    Ok(())
}

/// Opens an image root, which must be a canonical path owned by root and writable by no
/// group or other.
pub fn open_image_root(r: &Path) -> Result<(PathBuf, OwnedFd), String> {
    if std::fs::canonicalize(r).ok().as_deref() != Some(r) {
        return Err(format!("image root {} must be a canonical path, with no symlink on the way", r.display()));
    }
    let fd = open_dir(r, "open")?;
    let st = fstat(&fd).map_err(|e| format!("{}: {e}", r.display()))?;
    check_image_root_owner(&r.to_string_lossy(), st.st_uid, st.st_mode).map_err(|e| e.to_string())?;
    Ok((r.to_path_buf(), fd))
}

/// With `--rpc-group`: the console dir goes to that group, setgid (the frontend cannot chgrp).
pub fn share_console_dir(path: &Path, frontend: Ids, gid: u32) -> Result<(), String> {
    let fd = open_dir(path, "open (a symlink is refused)")?;
    chown_fd(&fd, frontend.uid, gid).map_err(|e| err(path, "chown", e))?;
    fchmod(fd.as_fd(), Mode::from_bits_truncate(layout::CONSOLE_DIR_GROUP_MODE)).map_err(|e| err(path, "chmod", e))
}

/// Binds the RPC socket with no window in which it is more open than its final mode:
/// 0600 root:root, or 0660 root:`gid` when a group is granted.
pub fn bind_rpc_socket(path: &Path, gid: Option<u32>) -> Result<UnixListener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| err(path, "remove stale socket", e))?
        }
        Ok(_) => return Err(err(path, "bind", "exists and is not a socket")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(path, "stat", e)),
    }
    let old = umask(Mode::from_bits_truncate(0o777 & !layout::RPC_SOCKET_MODE));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(|e| err(path, "bind", e))?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, Some(Uid::from_raw(0)), Some(Gid::from_raw(gid)))
            .map_err(|e| err(path, "chown", e))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(layout::RPC_SOCKET_GROUP_MODE))
            .map_err(|e| err(path, "chmod", e))?;
    }
    tracing::info!(path = %path.display(), group = ?gid, "rpc socket bound");
    Ok(listener)
}
