//! Command-line flags and the configuration derived from them.

use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use my_hypervisor_policy::layout::{self, Ids};
use my_hypervisor_policy::sandbox::hidden_in_vmm;
use my_hypervisor_policy::seccomp;
use my_hypervisor_policy::vmm::check_ifname;
use nix::unistd::{Group, User};

#[derive(Debug, Parser)]
#[command(name = "my_hypervisor-daemon", version, about = "VM control-plane daemon (root entry point and broker)")]
pub struct Args {
    /// Where the JSON-RPC socket is bound.
    #[arg(long, default_value = "/run/my_hypervisor/rpc.sock")]
    pub rpc_socket: PathBuf,
    /// Grant the RPC socket to this group (name or gid): mode 0660 instead of 0600.
    #[arg(long)]
    pub rpc_group: Option<String>,
    /// Per-VM state kept by the frontend.
    #[arg(long, default_value = "/run/my_hypervisor/vms")]
    pub state_dir: PathBuf,
    /// Console endpoints served by the frontend.
    #[arg(long, default_value = "/run/my_hypervisor/console")]
    pub console_dir: PathBuf,
    /// Per-VM runtime dirs of the VMMs, and the broker's journal.
    #[arg(long, default_value = "/run/my_hypervisor/vmm")]
    pub run_dir: PathBuf,
    /// The frontend's identity: a user name, or UID:GID.
    #[arg(long, default_value = layout::DEFAULT_FRONTEND_USER)]
    pub frontend_user: String,
    /// The uids the VMMs run under, one per VM, as FIRST-LAST.
    #[arg(long, default_value = layout::DEFAULT_VM_UID_RANGE)]
    pub vm_uid_range: String,
    /// A root that kernels, initramfs, firmware and disks may come from (repeatable).
    #[arg(long = "image-root", default_value = "/var/lib/my_hypervisor/images")]
    pub image_roots: Vec<PathBuf>,
    /// A bridge VM taps may be attached to (repeatable); a tap asks for no other.
    #[arg(long = "allowed-bridge", value_parser = |s: &str| check_ifname(s).map(|()| s.to_string()).map_err(|e| e.to_string()))]
    pub allowed_bridges: Vec<String>,
    /// The cloud-hypervisor binary; by default found on PATH when a VM starts.
    #[arg(long)]
    pub cloud_hypervisor: Option<PathBuf>,
    /// The frontend binary; by default `my_hypervisor-frontend` beside this one.
    #[arg(long)]
    pub frontend_bin: Option<PathBuf>,
    /// A limit of the RPC transport, as NAME=VALUE (repeatable); NAME is one of
    /// max-line-bytes, max-connections, line-timeout, idle-timeout, write-timeout,
    /// max-queued-messages, max-response-bytes, max-batch-len, max-subscriptions (docs/api.md).
    #[arg(long = "rpc-limit", value_name = "NAME=VALUE", value_parser = layout::parse_rpc_limit)]
    pub rpc_limits: Vec<(String, String)>,
    /// The VMM launcher; by default `my_hypervisor-vmm-launcher` beside this binary.
    #[arg(long)]
    pub launcher_bin: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Debugging only: log syscalls outside the broker's seccomp allow-list (to the kernel
    /// audit log) instead of killing the broker.
    #[arg(long)]
    pub seccomp_log: bool,
    /// What the frontend's seccomp filter does with a syscall outside its allow-list: kill
    /// (the default), or, for debugging only, log it or fail it with EPERM.
    #[arg(long, default_value = "kill", value_parser = str::parse::<seccomp::Mode>)]
    pub frontend_seccomp: seccomp::Mode,
    /// What a VMM's seccomp filter does with a syscall outside its allow-list: kill (the
    /// default), or, for debugging only, log it or fail it with EPERM.
    #[arg(long, default_value = "kill", value_parser = str::parse::<seccomp::Mode>)]
    pub vmm_seccomp: seccomp::Mode,
    /// Apply Landlock as far as an older kernel supports it, with a warning, instead of
    /// refusing to start VMMs on a kernel without Landlock ABI 6.
    #[arg(long)]
    pub landlock_best_effort: bool,
    /// Debugging and tests only: do not refuse fds on frontend channels with SO_PASSRIGHTS;
    /// hand stray fds to the closer process instead, as on kernels before 6.16.
    #[arg(long, hide = true)]
    pub no_passrights: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MYHV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
#[derive(Debug)]
pub struct Config {
    pub frontend: Ids,
    pub vm_uids: std::ops::RangeInclusive<u32>,
    pub launcher_bin: PathBuf,
    pub rpc_gid: Option<u32>,
    pub frontend_bin: PathBuf,
}

pub fn resolve(args: &Args) -> Result<Config, String> {
    let frontend = match layout::parse_ids(&args.frontend_user).map_err(|e| e.to_string())? {
        Some(ids) => ids,
        None => {
            let u = User::from_name(&args.frontend_user)
                .map_err(|e| format!("looking up user {:?}: {e}", args.frontend_user))?
                .ok_or_else(|| format!("no user named {:?}", args.frontend_user))?;
            Ids { uid: u.uid.as_raw(), gid: u.gid.as_raw() }
        }
    };
    let vm_uids = layout::parse_uid_range(&args.vm_uid_range).map_err(|e| e.to_string())?;
    layout::check_identities(frontend, &vm_uids).map_err(|e| e.to_string())?;
    let rpc_gid = match &args.rpc_group {
        None => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .map_err(|e| format!("looking up group {g:?}: {e}"))?
                .ok_or_else(|| format!("no group named {g:?}"))?
                .gid
                .as_raw(),
        }),
    };
    let frontend_bin = match &args.frontend_bin {
        Some(p) => p.clone(),
        None => sibling("my_hypervisor-frontend")?,
    };
    for p in [&args.rpc_socket, &args.state_dir, &args.console_dir, &args.run_dir].into_iter().chain(&args.image_roots)
    {
        if !p.is_absolute() {
            return Err(format!("{} must be an absolute path", p.display()));
        }
    }
    for root in &args.image_roots {
        layout::check_image_root_path(&root.to_string_lossy()).map_err(|e| e.to_string())?;
    }
    if let Some(root) = args.image_roots.iter().find(|r| hidden_in_vmm(&r.to_string_lossy())) {
        return Err(format!("image root {} lies where each VMM's mount namespace has an empty tmpfs", root.display()));
    }
    let launcher_bin = match &args.launcher_bin {
        Some(p) => p.clone(),
        None => sibling("my_hypervisor-vmm-launcher")?,
    };
    Ok(Config { frontend, vm_uids, launcher_bin, rpc_gid, frontend_bin })
}

/// A binary installed beside the daemon's own.
pub fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::fs::read_link("/proc/self/exe").map_err(|e| format!("/proc/self/exe: {e}"))?;
    Ok(exe.parent().unwrap_or(Path::new("/")).join(name))
}
