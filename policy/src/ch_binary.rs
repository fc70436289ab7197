//! Rules for the cloud-hypervisor binary the daemon runs: which versions it accepts, and who
//! may own and write the binary and every directory above it. The broker gathers the facts
//! (`--version`'s output, one `Node` per path component) and decides here.
//!
//! Ownership rule: every component, the binary first and `/` last, is owned by root, and no
//! group or other write bit is set, except on a directory with the sticky bit (such as
//! /var/tmp, mode 1777). A sticky directory lets others create entries in it, but not rename,
//! remove or replace an entry they do not own; since every component below it must be owned
//! by root, no one but root can change what the path resolves to.

use std::path::{Path, PathBuf};

use crate::refusal::Refusal;

/// The oldest major version the daemon runs.
pub const MIN_MAJOR: u32 = 50;
/// The oldest major version that can create a net device in the VMM's empty network
/// namespace (v50 and v51 cannot).
pub const MIN_MAJOR_NETS: u32 = 52;

/// How long `--version` may take, in milliseconds.
pub const VERSION_TIMEOUT_MS: u64 = 5000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChError {
    #[error("{path} answered --version with {line:?}, not \"cloud-hypervisor vN.M\"")]
    NotCloudHypervisor { path: String, line: String },
    #[error("{path} is cloud-hypervisor v{found}; the daemon needs v{need} or newer{why}")]
    TooOld { path: String, found: u32, need: u32, why: &'static str },
    #[error("{path} is owned by uid {uid}, not root: only root may own cloud-hypervisor and the dirs above it")]
    NotRoot { path: String, uid: u32 },
    #[error("{path} (mode {mode:o}) is writable by others than root")]
    Writable { path: String, mode: u32 },
    #[error("{path} is set-uid or set-gid (mode {mode:o})")]
    SetId { path: String, mode: u32 },
    #[error("{path} is not a regular file")]
    NotFile { path: String },
}

/// One component of the binary's resolved path, as `stat` sees it.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub uid: u32,
    /// `st_mode`, file type bits included.
    pub mode: u32,
}

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

/// Where cloud-hypervisor is: `configured` (`--cloud-hypervisor`) if it is a file, or the
/// first `cloud-hypervisor` file on `path_var` ($PATH).
pub fn locate(
    configured: Option<&Path>,
    path_var: &std::ffi::OsStr,
    is_file: impl Fn(&Path) -> bool,
) -> Result<PathBuf, Refusal> {
    match configured {
        Some(p) if is_file(p) => Ok(p.to_path_buf()),
        Some(p) => Err(Refusal::NoCloudHypervisorAt(p.display().to_string())),
        None => std::env::split_paths(path_var)
            .map(|d| d.join("cloud-hypervisor"))
            .find(|p| is_file(p))
            .ok_or(Refusal::NoCloudHypervisor),
    }
}

/// The major version in `--version`'s first line, e.g. "cloud-hypervisor v53.0" -> 53.
pub fn parse_version(path: &str, stdout: &str) -> Result<u32, ChError> {
    let line = stdout.lines().next().unwrap_or("").trim();
    let bad = || ChError::NotCloudHypervisor { path: path.to_string(), line: line.chars().take(80).collect() };
    let mut words = line.split_whitespace();
    if words.next() != Some("cloud-hypervisor") {
        return Err(bad());
    }
    let v = words.next().and_then(|w| w.strip_prefix('v')).ok_or_else(bad)?;
    let major = v.split('.').next().unwrap_or("");
    if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) || major.len() > 6 {
        return Err(bad());
    }
    major.parse().map_err(|_| bad())
}

/// Whether `major` may run a VM, one with nets or without.
pub fn check_version(path: &str, major: u32, with_nets: bool) -> Result<(), ChError> {
    let path = path.to_string();
    if major < MIN_MAJOR {
        return Err(ChError::TooOld { path, found: major, need: MIN_MAJOR, why: "" });
    }
    if with_nets && major < MIN_MAJOR_NETS {
        let why = " for a VM with nets (older ones cannot create a net device in the VMM's network namespace)";
        return Err(ChError::TooOld { path, found: major, need: MIN_MAJOR_NETS, why });
    }
    Ok(())
}

/// Checks `chain`: the binary first, then each directory above it up to `/`.
pub fn check_chain(chain: &[(String, Node)]) -> Result<(), ChError> {
    for (i, (path, n)) in chain.iter().enumerate() {
        let (path, mode) = (path.clone(), n.mode);
        if i == 0 && mode & S_IFMT != S_IFREG {
            return Err(ChError::NotFile { path });
        }
        if n.uid != 0 {
            return Err(ChError::NotRoot { path, uid: n.uid });
        }
        if i == 0 && mode & 0o6000 != 0 {
            return Err(ChError::SetId { path, mode: mode & 0o7777 });
        }
        let sticky_dir = mode & S_IFMT == S_IFDIR && mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky_dir {
            return Err(ChError::Writable { path, mode: mode & 0o7777 });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(uid: u32, mode: u32) -> Node {
        Node { uid, mode }
    }

    fn chain(dir_mode: u32, dir_uid: u32) -> Vec<(String, Node)> {
        vec![
            ("/var/tmp/x/ch".into(), node(0, S_IFREG | 0o755)),
            ("/var/tmp/x".into(), node(dir_uid, S_IFDIR | dir_mode)),
            ("/var/tmp".into(), node(0, S_IFDIR | 0o1777)),
            ("/var".into(), node(0, S_IFDIR | 0o755)),
            ("/".into(), node(0, S_IFDIR | 0o755)),
        ]
    }

    #[test]
    fn the_configured_binary_or_the_first_on_path_is_used() {
        let files = ["/opt/ch", "/usr/bin/cloud-hypervisor", "/bin/cloud-hypervisor"];
        let is_file = |p: &Path| files.iter().any(|f| Path::new(f) == p);
        let path = std::ffi::OsStr::new("/nowhere:/usr/bin:/bin");
        assert_eq!(locate(Some(Path::new("/opt/ch")), path, is_file).unwrap(), PathBuf::from("/opt/ch"));
        assert_eq!(locate(None, path, is_file).unwrap(), PathBuf::from("/usr/bin/cloud-hypervisor"));
        let e = locate(Some(Path::new("/opt/none")), path, is_file).unwrap_err();
        assert_eq!(e.to_string(), "cloud-hypervisor not found at /opt/none");
        let e = locate(None, std::ffi::OsStr::new("/nowhere"), is_file).unwrap_err();
        assert!(e.to_string().contains("not found on PATH"), "{e}");
    }

    #[test]
    fn versions_parse_from_the_first_line() {
        assert_eq!(parse_version("ch", "cloud-hypervisor v53.0\nMigration Protocol Versions: 0\n"), Ok(53));
        assert_eq!(parse_version("ch", "cloud-hypervisor v50.1.2-dirty\n"), Ok(50));
        for bad in ["", "qemu v53.0", "cloud-hypervisor 53.0", "cloud-hypervisor v.1", "cloud-hypervisor v99999999"] {
            let e = parse_version("/x/ch", bad).unwrap_err();
            assert!(e.to_string().starts_with("/x/ch answered --version with"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn v50_runs_vms_and_v52_runs_vms_with_nets() {
        assert!(check_version("ch", 53, true).is_ok());
        assert!(check_version("ch", 52, true).is_ok());
        assert!(check_version("ch", 50, false).is_ok());
        let e = check_version("ch", 51, true).unwrap_err().to_string();
        assert!(e.contains("v51") && e.contains("v52 or newer for a VM with nets"), "{e}");
        let e = check_version("ch", 49, false).unwrap_err().to_string();
        assert_eq!(e, "ch is cloud-hypervisor v49; the daemon needs v50 or newer");
    }

    #[test]
    fn a_sticky_world_writable_dir_above_root_owned_entries_is_accepted() {
        assert_eq!(check_chain(&chain(0o755, 0)), Ok(()));
        // The same dir without the sticky bit lets anyone replace the root-owned entries.
        let mut c = chain(0o755, 0);
        c[2].1 = node(0, S_IFDIR | 0o777);
        assert_eq!(check_chain(&c), Err(ChError::Writable { path: "/var/tmp".into(), mode: 0o777 }));
        // Sticky protects root's entries only: an entry below it owned by others is refused.
        assert_eq!(check_chain(&chain(0o755, 1000)), Err(ChError::NotRoot { path: "/var/tmp/x".into(), uid: 1000 }));
    }

    #[test]
    fn group_or_other_write_owners_and_file_kinds_are_refused() {
        assert!(matches!(check_chain(&chain(0o775, 0)), Err(ChError::Writable { mode: 0o775, .. })));
        assert!(matches!(check_chain(&chain(0o757, 0)), Err(ChError::Writable { .. })));
        let mut c = chain(0o755, 0);
        c[0].1 = node(0, S_IFREG | 0o775);
        assert!(matches!(check_chain(&c), Err(ChError::Writable { .. })));
        // The sticky bit means nothing on a file.
        c[0].1 = node(0, S_IFREG | 0o1777);
        assert!(matches!(check_chain(&c), Err(ChError::Writable { .. })));
        c[0].1 = node(0, S_IFREG | 0o4755);
        assert!(matches!(check_chain(&c), Err(ChError::SetId { .. })));
        c[0].1 = node(0, S_IFDIR | 0o755);
        assert!(matches!(check_chain(&c), Err(ChError::NotFile { .. })));
        c[0].1 = node(1000, S_IFREG | 0o755);
        let e = check_chain(&c).unwrap_err().to_string();
        assert!(e.contains("owned by uid 1000, not root"), "{e}");
    }
}
