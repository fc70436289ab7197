//! The daemon's configuration: its flags (`policy::daemon::Args`) resolved against the
//! system, and logging.

use std::path::{Path, PathBuf};

pub use my_hypervisor_policy::daemon::Args;
use my_hypervisor_policy::daemon::LogFormat;
use my_hypervisor_policy::layout::{self, Ids};
use nix::unistd::{Group, User};
use tracing_subscriber::EnvFilter;

pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("MYHV_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// The checked configuration.
pub struct Config {
    pub frontend: Ids,
    pub vm_uids: std::ops::RangeInclusive<u32>,
    pub launcher_bin: PathBuf,
    pub rpc_gid: Option<u32>,
    pub frontend_bin: PathBuf,
}

pub fn resolve(args: &Args) -> Result<Config, String> {
    let name = &args.frontend_user;
    let frontend = match layout::parse_ids(name).map_err(|e| e.to_string())? {
        Some(ids) => ids,
        None => {
            let u = User::from_name(name).map_err(|e| format!("looking up user {name:?}: {e}"))?;
            let u = u.ok_or_else(|| format!("no user named {name:?}"))?;
            Ids { uid: u.uid.as_raw(), gid: u.gid.as_raw() }
        }
    };
    let vm_uids = layout::parse_uid_range(&args.vm_uid_range).map_err(|e| e.to_string())?;
    layout::check_identities(frontend, &vm_uids).map_err(|e| e.to_string())?;
    let group = |g: &String| {
        let found = Group::from_name(g).map_err(|e| format!("looking up group {g:?}: {e}"))?;
        Ok::<_, String>(found.ok_or_else(|| format!("no group named {g:?}"))?.gid.as_raw())
    };
    let rpc_gid = args.rpc_group.as_ref().map(|g| g.parse::<u32>().or_else(|_| group(g))).transpose()?;
    let frontend_bin = args.frontend_bin.clone().map_or_else(|| sibling("my_hypervisor-frontend"), Ok)?;
    args.check_paths()?;
    let launcher_bin = args.launcher_bin.clone().map_or_else(|| sibling("my_hypervisor-vmm-launcher"), Ok)?;
    Ok(Config { frontend, vm_uids, launcher_bin, rpc_gid, frontend_bin })
}

/// A binary installed beside the daemon's own.
pub fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::fs::read_link("/proc/self/exe").map_err(|e| format!("/proc/self/exe: {e}"))?;
    Ok(exe.parent().unwrap_or(Path::new("/")).join(name))
}
