//! Who owns each directory the daemon uses, with which mode, and the uid rules that keep
//! the frontend and every VMM apart. docs/layout.md is the prose form of this file.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

/// Default numeric frontend identity: works with no account created, and is not 65534
/// (`nobody`), which other services share.
pub const DEFAULT_FRONTEND_USER: &str = "61000:61000";
/// Default uids (and gids, the same numbers) handed out one per VM.
pub const DEFAULT_VM_UID_RANGE: &str = "61001-61999";

/// The RPC socket without `--rpc-group`, and with it.
pub const RPC_SOCKET_MODE: u32 = 0o600;
pub const RPC_SOCKET_GROUP_MODE: u32 = 0o660;
/// The console dir with `--rpc-group`: the frontend's, in that group, setgid, so that the
/// sockets the frontend makes there (0660) are the group's too.
pub const CONSOLE_DIR_GROUP_MODE: u32 = 0o2750;
/// A per-VM runtime dir under the run dir, owned by the VM's uid.
pub const VM_RUN_DIR_MODE: u32 = 0o700;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Root,
    Frontend,
}

impl Owner {
    /// The uid and gid the owner stands for.
    pub fn ids(self, frontend: Ids) -> Ids {
        match self {
            Owner::Root => Ids { uid: 0, gid: 0 },
            Owner::Frontend => frontend,
        }
    }
}

/// The directories the daemon creates and checks at every start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirRole {
    /// Parent of the RPC socket.
    SocketParent,
    /// Per-VM state.json files and the event sequence; only the frontend writes here.
    State,
    /// Console endpoints the frontend serves.
    Console,
    /// Per-VM runtime dirs of the VMMs and the broker's journal. Traversable, so that each
    /// VMM can reach its own 0700 dir, but writable by root only.
    Run,
    /// A root that images may come from. Root's; the broker only reads below it.
    ImageRoot,
}

/// The owner and mode of a directory, and whether the daemon enforces them on a directory
/// that already exists. Shared directories (the socket's parent, image roots) may be
/// managed by others, so an existing one is only checked to be a directory; a missing one
/// is created as root 0755.
pub const fn dir_rule(role: DirRole) -> (Owner, u32, Enforce) {
    match role {
        DirRole::SocketParent => (Owner::Root, 0o755, Enforce::CreateOnly),
        DirRole::State => (Owner::Frontend, 0o700, Enforce::Always),
        DirRole::Console => (Owner::Frontend, 0o700, Enforce::Always),
        DirRole::Run => (Owner::Root, 0o711, Enforce::Always),
        DirRole::ImageRoot => (Owner::Root, 0o755, Enforce::CreateOnly),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforce {
    /// Owner and mode are set at every start.
    Always,
    /// Owner and mode are set only when the daemon creates the directory.
    CreateOnly,
}

/// System directories no image root may be or lie under: granting the VM uid read of a
/// file there (by ACL) or handing it one (a writable disk) would widen the host.
pub const SYSTEM_DIRS: &[&str] = &["/etc", "/usr", "/bin", "/sbin", "/boot", "/root", "/proc", "/sys", "/dev"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRootError {
    #[error(
        "image root {0} is / or a system directory (/etc, /usr, /bin, /sbin, /lib*, /boot, /root, /proc, /sys, /dev) or lies under one"
    )]
    System(String),
    #[error("image root: {0}")]
    Text(#[from] crate::names::NameError),
    #[error("image root {root} must be owned by root and writable by no group or other (uid {uid}, mode {mode:o})")]
    Owner { root: String, uid: u32, mode: u32 },
}

/// An image root's path: absolute, not `/`, and not at or under a system directory.
pub fn check_image_root_path(root: &str) -> Result<(), ImageRootError> {
    if root != "/" {
        crate::names::check_path_text(root)?;
    }
    let under = |dir: &str| root == dir || root.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'));
    let top = root.trim_start_matches('/').split('/').next().unwrap_or_default();
    if top.is_empty() || top.starts_with("lib") || SYSTEM_DIRS.iter().any(|d| under(d)) {
        return Err(ImageRootError::System(root.to_string()));
    }
    Ok(())
}

/// An image root's owner and mode, as fstat gave them.
pub fn check_image_root_owner(root: &str, uid: u32, mode: u32) -> Result<(), ImageRootError> {
    if uid != 0 || mode & 0o022 != 0 {
        return Err(ImageRootError::Owner { root: root.to_string(), uid, mode: mode & 0o7777 });
    }
    Ok(())
}

/// A daemon dir, opened without following a symlink, must be a directory. `mode` is st_mode.
pub fn check_is_dir(mode: u32) -> Result<(), &'static str> {
    if mode & libc::S_IFMT != libc::S_IFDIR {
        return Err("not a directory");
    }
    Ok(())
}

/// An image file the broker may grant: a regular file with exactly one link (no other name
/// can be handed out through it), and a writable disk also owner-rw. `mode` is st_mode.
pub fn check_image_file(mode: u32, nlink: u64, writable: bool) -> Result<(), &'static str> {
    if mode & libc::S_IFMT != libc::S_IFREG {
        return Err("is not a regular file");
    }
    if nlink != 1 {
        return Err("must have exactly one link");
    }
    if writable && mode & 0o600 != 0o600 {
        return Err("is a writable disk and must be owner-rw");
    }
    Ok(())
}

/// The image root `path` lies under (the first that holds it), and the path below it, never
/// empty: an image root itself is no image.
pub fn image_root_of<'a, T>(roots: &'a [(PathBuf, T)], path: &'a str) -> Option<(&'a (PathBuf, T), &'a Path)> {
    roots
        .iter()
        .find_map(|r| Path::new(path).strip_prefix(&r.0).ok().map(|rel| (r, rel)))
        .filter(|(_, rel)| !rel.as_os_str().is_empty())
}

/// Every directory above an image must be searchable by a uid that is neither its owner nor
/// in its group, which is what a VM uid is. `mode` is `dir`'s.
pub fn check_searchable(dir: &Path, mode: u32, image: &Path) -> Result<(), String> {
    if mode & 0o001 == 0 {
        return Err(format!(
            "{} is not searchable by the VM uid (mode {:o}); {} cannot be reached",
            dir.display(),
            mode & 0o7777,
            image.display()
        ));
    }
    Ok(())
}

/// Whether two grants of one inode conflict: a writable disk belongs to one VM at a time,
/// and a read-only image may be shared only while no one holds it writable.
pub fn shares_conflict(writable: bool, held_writable: bool) -> bool {
    writable || held_writable
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0:?} is not of the form UID:GID")]
    Syntax(String),
    #[error("uid range {0:?} is not of the form FIRST-LAST with FIRST <= LAST")]
    RangeSyntax(String),
    #[error("{what} may not be root (0) or nobody (65534)")]
    Reserved { what: &'static str },
    #[error("the VM uid range {range:?} overlaps the frontend's uid or gid {id}")]
    Overlap { range: RangeInclusive<u32>, id: u32 },
}

/// Parses a numeric `UID:GID`. Names are resolved by the caller, which may read /etc/passwd.
pub fn parse_ids(s: &str) -> Result<Option<Ids>, IdError> {
    let Some((u, g)) = s.split_once(':') else {
        return Ok(None);
    };
    let (Ok(uid), Ok(gid)) = (u.parse(), g.parse()) else {
        return Err(IdError::Syntax(s.to_string()));
    };
    Ok(Some(Ids { uid, gid }))
}

pub fn parse_uid_range(s: &str) -> Result<RangeInclusive<u32>, IdError> {
    let err = || IdError::RangeSyntax(s.to_string());
    let (a, b) = s.split_once('-').ok_or_else(err)?;
    let (a, b): (u32, u32) = (a.parse().map_err(|_| err())?, b.parse().map_err(|_| err())?);
    if a > b {
        return Err(err());
    }
    Ok(a..=b)
}

/// The frontend and the VMMs must be unprivileged, and no VMM may share an id with the
/// frontend, or it could signal or ptrace it.
pub fn check_identities(frontend: Ids, vm_range: &RangeInclusive<u32>) -> Result<(), IdError> {
    let reserved = |id: u32| id == 0 || id == 65534;
    if reserved(frontend.uid) || reserved(frontend.gid) {
        return Err(IdError::Reserved { what: "the frontend user" });
    }
    if vm_range.clone().any(reserved) {
        return Err(IdError::Reserved { what: "a VM uid" });
    }
    for id in [frontend.uid, frontend.gid] {
        if vm_range.contains(&id) {
            return Err(IdError::Overlap { range: vm_range.clone(), id });
        }
    }
    Ok(())
}

/// The RPC transport's limits the daemon passes on to the frontend (`--rpc-limit
/// NAME=VALUE` becomes the frontend's `--rpc-NAME=VALUE`, and `--NAME=VALUE` for the
/// `console-` ones); docs/api.md describes each.
pub const RPC_LIMITS: &[&str] = &[
    "console-log-bytes",
    "console-replay-bytes",
    "max-line-bytes",
    "max-connections",
    "line-timeout",
    "idle-timeout",
    "write-timeout",
    "max-queued-messages",
    "max-response-bytes",
    "max-batch-len",
    "max-subscriptions",
];

/// Checks one `NAME=VALUE`: a known limit and a positive number.
pub fn parse_rpc_limit(s: &str) -> Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    if !RPC_LIMITS.contains(&name) {
        return Err(format!("unknown limit {name:?}; known: {}", RPC_LIMITS.join(", ")));
    }
    match value.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("{name}: {value:?} is not a positive number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_directory_is_a_daemon_dir() {
        assert_eq!(check_is_dir(libc::S_IFDIR | 0o700), Ok(()));
        assert_eq!(check_is_dir(libc::S_IFREG | 0o700), Err("not a directory"));
        assert_eq!(check_is_dir(libc::S_IFLNK | 0o777), Err("not a directory"));
        assert_eq!(check_is_dir(libc::S_IFSOCK | 0o700), Err("not a directory"));
    }

    #[test]
    fn a_dir_owner_is_root_or_the_frontend() {
        let frontend = Ids { uid: 61000, gid: 61001 };
        assert_eq!(dir_rule(DirRole::State).0.ids(frontend), frontend);
        assert_eq!(dir_rule(DirRole::Run).0.ids(frontend), Ids { uid: 0, gid: 0 });
        assert_eq!(dir_rule(DirRole::ImageRoot).0.ids(frontend), Ids { uid: 0, gid: 0 });
    }

    #[test]
    fn an_image_is_found_below_its_root_and_reachable_through_searchable_dirs() {
        let roots = vec![(PathBuf::from("/srv/img"), 1), (PathBuf::from("/srv/images"), 2)];
        let (root, rel) = image_root_of(&roots, "/srv/images/a/vmlinux").unwrap();
        assert_eq!((root.1, rel), (2, Path::new("a/vmlinux")));
        assert!(image_root_of(&roots, "/srv/images").is_none(), "a root itself is no image");
        assert!(image_root_of(&roots, "/srv/imagesX/k").is_none(), "components, not bytes");
        assert!(image_root_of(&roots, "/elsewhere/k").is_none());
        let (dir, image) = (Path::new("/srv/images/a"), Path::new("/srv/images/a/vmlinux"));
        assert_eq!(check_searchable(dir, 0o40711, image), Ok(()));
        assert_eq!(
            check_searchable(dir, 0o40750, image).unwrap_err(),
            "/srv/images/a is not searchable by the VM uid (mode 750); /srv/images/a/vmlinux cannot be reached"
        );
        assert!(!shares_conflict(false, false), "read-only images are shared");
        assert!(shares_conflict(true, false) && shares_conflict(false, true) && shares_conflict(true, true));
    }

    #[test]
    fn image_roots() {
        for bad in
            ["/", "/etc", "/etc/images", "/usr/share/x", "/lib", "/lib64", "/libexec/x", "/root", "/proc/1", "/dev"]
        {
            assert_eq!(check_image_root_path(bad), Err(ImageRootError::System(bad.into())), "{bad}");
        }
        assert!(matches!(check_image_root_path("/var/../etc"), Err(ImageRootError::Text(_))));
        for good in ["/var/lib/my_hypervisor/images", "/srv/images", "/etcetera", "/devices"] {
            assert_eq!(check_image_root_path(good), Ok(()), "{good}");
        }
        assert_eq!(check_image_root_owner("/i", 0, 0o40755), Ok(()));
        assert!(matches!(check_image_root_owner("/i", 1000, 0o755), Err(ImageRootError::Owner { .. })));
        assert!(matches!(check_image_root_owner("/i", 0, 0o775), Err(ImageRootError::Owner { .. })));
        assert!(matches!(check_image_root_owner("/i", 0, 0o757), Err(ImageRootError::Owner { .. })));
    }

    #[test]
    fn image_files() {
        let reg = libc::S_IFREG;
        assert_eq!(check_image_file(reg | 0o600, 1, true), Ok(()));
        assert_eq!(check_image_file(reg | 0o400, 1, false), Ok(()));
        assert_eq!(check_image_file(reg | 0o400, 1, true), Err("is a writable disk and must be owner-rw"));
        assert_eq!(check_image_file(reg | 0o644, 2, false), Err("must have exactly one link"));
        assert_eq!(check_image_file(libc::S_IFIFO | 0o644, 1, false), Err("is not a regular file"));
        assert_eq!(check_image_file(libc::S_IFCHR | 0o644, 1, false), Err("is not a regular file"));
    }

    #[test]
    fn defaults_are_valid() {
        let f = parse_ids(DEFAULT_FRONTEND_USER).unwrap().unwrap();
        let r = parse_uid_range(DEFAULT_VM_UID_RANGE).unwrap();
        assert_eq!(check_identities(f, &r), Ok(()));
        assert_ne!(f.uid, 65534);
    }

    #[test]
    fn bad_identities() {
        assert_eq!(parse_ids("daemon").unwrap(), None);
        assert!(parse_ids("1:x").is_err());
        assert!(parse_uid_range("5-4").is_err());
        assert!(parse_uid_range("5").is_err());
        let f = Ids { uid: 100, gid: 100 };
        assert!(check_identities(Ids { uid: 0, gid: 1 }, &(200..=300)).is_err());
        assert!(check_identities(f, &(0..=10)).is_err());
        assert!(check_identities(f, &(90..=110)).is_err());
        assert!(check_identities(Ids { uid: 1, gid: 150 }, &(140..=160)).is_err());
        assert_eq!(check_identities(f, &(101..=110)), Ok(()));
    }
}
