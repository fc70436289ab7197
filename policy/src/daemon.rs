//! The daemon's command line, and the checks on it that need no lookup: the broker parses
//! it, resolves names and binaries, and opens what it names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::frontend::FrontendPlan;
use crate::layout::{self, DirRole};
use crate::sandbox::hidden_in_vmm;
use crate::seccomp;
use crate::vmm::check_ifname;

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
    /// The cloud-hypervisor binary; by default found on PATH. Checked once, at daemon start.
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
    /// On SIGTERM, SIGINT or SIGHUP, stop and release every VM before exiting. By default
    /// VMs keep running, and the next daemon adopts them.
    #[arg(long)]
    pub stop_vms_on_exit: bool,
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

/// When the broker restarts the frontend: backoff doubling from 200 ms to 10 s, and back to
/// the start after a frontend that ran for 30 s.
#[derive(Debug)]
pub struct Backoff {
    /// The delay after the next exit, unless that frontend ran long enough to be healthy.
    pub next: Duration,
    /// Restarts so far.
    pub count: u64,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(10);
    /// A frontend that ran this long is healthy again: its next restart comes quickly.
    pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);

    /// The delay before the next restart, after a frontend that ran for `ran_for` (zero for
    /// a restart that failed).
    pub fn delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= Self::HEALTHY_AFTER {
            self.next = Self::FIRST;
        }
        self.count += 1;
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::FIRST, count: 0 }
    }
}

impl Args {
    /// What the frontend is started with: these flags and the frontend binary.
    pub fn frontend_plan<'a>(&'a self, frontend_bin: &'a Path) -> FrontendPlan<'a> {
        FrontendPlan {
            frontend_bin,
            state_dir: &self.state_dir,
            console_dir: &self.console_dir,
            image_roots: &self.image_roots,
            log_format: self.log_format.as_str(),
            rpc_limits: &self.rpc_limits,
            seccomp: self.frontend_seccomp,
            landlock_best_effort: self.landlock_best_effort,
        }
    }

    /// The directories the daemon creates and checks at every start, in order, with their roles.
    pub fn dirs(&self) -> Result<Vec<(&Path, DirRole)>, String> {
        let socket_parent = self.rpc_socket.parent().ok_or("the rpc socket needs a parent dir")?;
        let mut dirs = vec![(socket_parent, DirRole::SocketParent), (self.state_dir.as_path(), DirRole::State)];
        dirs.extend([(self.console_dir.as_path(), DirRole::Console), (self.run_dir.as_path(), DirRole::Run)]);
        dirs.extend(self.image_roots.iter().map(|r| (r.as_path(), DirRole::ImageRoot)));
        Ok(dirs)
    }

    /// The paths must be absolute, and each image root a permitted one that every VMM's
    /// mount namespace can see.
    pub fn check_paths(&self) -> Result<(), String> {
        let paths = [&self.rpc_socket, &self.state_dir, &self.console_dir, &self.run_dir];
        if let Some(p) = paths.into_iter().chain(&self.image_roots).find(|p| !p.is_absolute()) {
            return Err(format!("{} must be an absolute path", p.display()));
        }
        for root in &self.image_roots {
            layout::check_image_root_path(&root.to_string_lossy()).map_err(|e| e.to_string())?;
        }
        if let Some(root) = self.image_roots.iter().find(|r| hidden_in_vmm(&r.to_string_lossy())) {
            return Err(format!(
                "image root {} lies where each VMM's mount namespace has an empty tmpfs",
                root.display()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(["my_hypervisor-daemon"].iter().chain(extra)).unwrap()
    }

    #[test]
    fn defaults_pass_and_bad_paths_are_named() {
        assert_eq!(args(&[]).check_paths(), Ok(()));
        let e = args(&["--state-dir", "vms"]).check_paths().unwrap_err();
        assert_eq!(e, "vms must be an absolute path");
        let e = args(&["--image-root", "relative/images"]).check_paths().unwrap_err();
        assert_eq!(e, "relative/images must be an absolute path");
        assert!(args(&["--image-root", "/etc/images"]).check_paths().unwrap_err().contains("system directory"));
        let e = args(&["--image-root", "/tmp/images"]).check_paths().unwrap_err();
        assert!(e.contains("empty tmpfs"), "{e}");
        assert_eq!(args(&["--image-root", "/srv/images"]).check_paths(), Ok(()));
    }

    #[test]
    fn restarts_back_off_and_recover_after_a_healthy_run() {
        let mut b = Backoff::default();
        let ms = Duration::from_millis;
        let delays: Vec<Duration> = (0..8).map(|_| b.delay(ms(10))).collect();
        assert_eq!(delays, [ms(200), ms(400), ms(800), ms(1600), ms(3200), ms(6400), ms(10_000), ms(10_000)]);
        assert_eq!(b.delay(Duration::from_secs(30)), ms(200), "a healthy frontend restarts quickly");
        assert_eq!((b.delay(Duration::ZERO), b.count), (ms(400), 10));
    }

    #[test]
    fn the_frontend_is_started_with_the_flags() {
        let a = args(&["--state-dir", "/s", "--console-dir", "/c", "--image-root", "/img", "--log-format", "json"]);
        let a = Args { frontend_seccomp: seccomp::Mode::Log, landlock_best_effort: true, ..a };
        let a = Args { rpc_limits: vec![("max-line-bytes".into(), "256".into())], ..a };
        let argv = a.frontend_plan(Path::new("/bin/fe")).launcher_argv(Path::new("/bin/launcher")).unwrap();
        let argv: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            argv.join(" "),
            "/bin/launcher --state-dir /s --console-dir /c --seccomp log --landlock-best-effort -- /bin/fe --listen-fd 3 \
             --broker-fd 4 --state-dir /s --console-dir /c --log-format json --image-root /img --rpc-max-line-bytes=256"
        );
    }

    #[test]
    fn every_dir_has_its_role() {
        let a = args(&["--rpc-socket", "/r/rpc.sock", "--image-root", "/srv/a", "--image-root", "/srv/b"]);
        let dirs: Vec<(&str, DirRole)> = a.dirs().unwrap().into_iter().map(|(p, r)| (p.to_str().unwrap(), r)).collect();
        assert_eq!(
            dirs,
            [
                ("/r", DirRole::SocketParent),
                ("/run/my_hypervisor/vms", DirRole::State),
                ("/run/my_hypervisor/console", DirRole::Console),
                ("/run/my_hypervisor/vmm", DirRole::Run),
                ("/srv/a", DirRole::ImageRoot),
                ("/srv/b", DirRole::ImageRoot),
            ]
        );
        assert_eq!(args(&["--rpc-socket", "/"]).dirs().unwrap_err(), "the rpc socket needs a parent dir");
    }

    #[test]
    fn flags_are_checked_while_parsing() {
        let parse = |extra: &[&str]| Args::try_parse_from(["my_hypervisor-daemon"].iter().chain(extra)).map(drop);
        assert!(parse(&["--allowed-bridge", "br0"]).is_ok());
        assert!(parse(&["--allowed-bridge", "a-name-too-long-for-linux"]).is_err());
        assert!(parse(&["--rpc-limit", "no-such-limit=1"]).is_err());
        assert!(parse(&["--vmm-seccomp", "allow"]).is_err());
        assert_eq!(args(&["--log-format", "json"]).log_format.as_str(), "json");
    }
}
