//! What a VMM may be given: limits on every field a client controls, and the one function
//! that turns validated fields into cloud-hypervisor's argv.

use my_hypervisor_broker_proto::{ExitStatus, ImageRole, SocketRole, VmmConfig, VmmSignal};

use crate::names::{NameError, check_path_text};

pub const MAX_VCPUS: u32 = 64;
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
pub const MAX_DISKS: usize = 8;
pub const MAX_NETS: usize = 4;
/// x86's COMMAND_LINE_SIZE, terminator included.
pub const MAX_CMDLINE: usize = 2047;
pub const MIN_MTU: u32 = 68;
pub const MAX_MTU: u32 = 65535;
/// Linux's IFNAMSIZ less the terminator.
pub const MAX_IFNAME: usize = 15;

/// The fds cloud-hypervisor finds its inheritance at.
pub const VMM_API_FD: i32 = 3;
pub const VMM_EVENT_FD: i32 = 4;
pub const VMM_FIRST_TAP_FD: i32 = 5;
/// Guest CID of every VM: each VM has its own hybrid-vsock muxer, so CIDs never meet.
pub const GUEST_CID: u32 = 3;
/// How long a Release waits for a VMM to exit after SIGKILL before it gives up, so that a
/// VMM stuck in uninterruptible I/O cannot stall the broker; the VM stays held.
pub const RELEASE_WAIT_MS: u16 = 5000;

/// The KVM API version cloud-hypervisor speaks, and the ioctls that ask for it and for each
/// extension (linux/kvm.h).
pub const KVM_API_VERSION: i32 = 12;
pub const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
pub const KVM_CHECK_EXTENSION: libc::c_ulong = 0xAE03;
/// The KVM extensions cloud-hypervisor (v50-v53, x86_64) requires before it creates a VM
/// (`check_required_kvm_extensions`), with their numbers from linux/kvm.h. The broker's KVM
/// check reports each one.
pub const KVM_EXTENSIONS: &[(&str, u64)] = &[
    ("KVM_CAP_IRQCHIP", 0),
    ("KVM_CAP_USER_MEMORY", 3),
    ("KVM_CAP_SET_TSS_ADDR", 4),
    ("KVM_CAP_EXT_CPUID", 7),
    ("KVM_CAP_MP_STATE", 14),
    ("KVM_CAP_USER_NMI", 22),
    ("KVM_CAP_IRQ_ROUTING", 25),
    ("KVM_CAP_IRQFD", 32),
    ("KVM_CAP_IOEVENTFD", 36),
    ("KVM_CAP_SET_IDENTITY_MAP_ADDR", 37),
    ("KVM_CAP_ADJUST_CLOCK", 39),
    ("KVM_CAP_VCPU_EVENTS", 41),
    ("KVM_CAP_XSAVE", 55),
    ("KVM_CAP_GET_TSC_KHZ", 61),
    ("KVM_CAP_TSC_DEADLINE_TIMER", 72),
    ("KVM_CAP_SPLIT_IRQCHIP", 121),
    ("KVM_CAP_IMMEDIATE_EXIT", 136),
];

/// Socket and file names inside a VM's runtime dir.
pub const API_SOCKET: &str = "api.sock";
pub const SERIAL_SOCKET: &str = "serial.sock";
pub const VSOCK_SOCKET: &str = "vsock.sock";
pub const EVENT_FILE: &str = "events.json";
pub const LOG_FILE: &str = "vmm.log";
/// The newest bytes of `vmm.log` a trim (broker `TrimLog`) keeps.
pub const LOG_KEEP: u64 = 1 << 20;
/// The bytes `vmm.log` may hold on its tmpfs (allocated, not its apparent size) before the
/// frontend asks for a trim; it asks at most once a second.
pub const LOG_TRIM_AT: u64 = 8 << 20;

/// How much of a `vmm.log` of `size` bytes a trim frees, from offset 0: every whole 4 KiB
/// page before the newest [`LOG_KEEP`] bytes (already freed pages cost nothing to punch
/// again). None when there is nothing to free.
pub fn log_punch_len(size: u64) -> Option<u64> {
    let len = size.saturating_sub(LOG_KEEP) & !4095;
    (len > 0).then_some(len)
}
/// The VMM's effective sandbox, as stored by the broker at spawn.
pub const SANDBOX_REPORT: &str = "sandbox.txt";

/// The file name of a VMM socket in its runtime dir.
pub fn socket_name(role: SocketRole) -> &'static str {
    match role {
        SocketRole::Api => API_SOCKET,
        SocketRole::Serial => SERIAL_SOCKET,
        SocketRole::Vsock => VSOCK_SOCKET,
    }
}

/// The signals the frontend may have the broker send a VMM.
pub fn signal_number(sig: VmmSignal) -> i32 {
    match sig {
        VmmSignal::Term => libc::SIGTERM,
        VmmSignal::Kill => libc::SIGKILL,
        VmmSignal::Cont => libc::SIGCONT,
    }
}

/// The pid and exit of a reaped child that exited or was killed; `None` for any other
/// wait status.
pub fn exit_status(ws: nix::sys::wait::WaitStatus) -> Option<(u32, ExitStatus)> {
    use nix::sys::wait::WaitStatus;
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw() as u32, ExitStatus::Code(code))),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw() as u32, ExitStatus::Signal(sig as i32))),
        _ => None,
    }
}

/// A tap's bridge, if it asks for one, must be one the daemon was started with
/// (`--allowed-bridge`); the refused name otherwise.
pub fn check_bridge(allowed: &[String], bridge: Option<&str>) -> Result<(), String> {
    match bridge {
        Some(br) if !allowed.iter().any(|a| a == br) => Err(br.to_string()),
        _ => Ok(()),
    }
}

/// A VMM socket the broker connects to: `st_mode` and `st_uid` of the node opened O_PATH in
/// the VM's dir must say a socket owned by the VM uid.
pub fn check_socket_node(name: &str, st_mode: u32, st_uid: u32, vm_uid: u32) -> Result<(), String> {
    if st_mode & libc::S_IFMT != libc::S_IFSOCK || st_uid != vm_uid {
        return Err(format!("{name} is not a socket owned by the VM uid {vm_uid}"));
    }
    Ok(())
}

/// An output file (event file or log) of a VMM taken up from the journal must be the
/// broker's own: a regular file owned by root, never a FIFO, device or symlink.
pub fn check_output_node(name: &str, st_mode: u32, st_uid: u32) -> Result<(), String> {
    if st_mode & libc::S_IFMT != libc::S_IFREG || st_uid != 0 {
        return Err(format!("{name} is not the broker's regular file"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("{field} must be between {min} and {max}, got {got}")]
    Range { field: &'static str, min: u64, max: u64, got: u64 },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Name(#[from] NameError),
}

pub fn check_range(field: &'static str, got: u64, min: u64, max: u64) -> Result<(), FieldError> {
    if (min..=max).contains(&got) { Ok(()) } else { Err(FieldError::Range { field, min, max, got }) }
}

pub fn check_cmdline(cmdline: &str) -> Result<(), FieldError> {
    if cmdline.len() > MAX_CMDLINE || cmdline.chars().any(|c| c.is_control()) {
        return Err(FieldError::Invalid {
            field: "cmdline",
            reason: format!("at most {MAX_CMDLINE} bytes with no control characters"),
        });
    }
    Ok(())
}

/// A unicast MAC in `aa:bb:cc:dd:ee:ff` form.
pub fn check_mac(mac: &str) -> Result<(), FieldError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let hex = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    let multicast = hex && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 1);
    if !hex || multicast {
        return Err(FieldError::Invalid {
            field: "mac",
            reason: format!("{mac:?} is not a unicast MAC of the form aa:bb:cc:dd:ee:ff"),
        });
    }
    Ok(())
}

/// A network interface name, as the kernel accepts them and our ioctls need them.
pub fn check_ifname(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::Invalid {
            field: "bridge",
            reason: format!("{name:?} is not 1-{MAX_IFNAME} characters of [A-Za-z0-9_.-]"),
        })
    }
}

/// The name of a VM's tap number `index`: unique because VM uids are.
pub fn tap_name(vm_uid: u32, index: usize) -> String {
    format!("mh{vm_uid}n{index}")
}

/// Everything cloud-hypervisor is started with. Paths are those the broker granted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmmPlan {
    pub run_dir: String,
    pub kernel: Option<String>,
    pub initramfs: Option<String>,
    pub firmware: Option<String>,
    pub cmdline: Option<String>,
    /// (path, readonly)
    pub disks: Vec<(String, bool)>,
    /// One MAC (or none) per tap; tap i is at fd VMM_FIRST_TAP_FD + i.
    pub nets: Vec<Option<String>>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub vsock: bool,
}

impl VmmPlan {
    /// The plan for a VM's granted `images` (by role), its taps' MACs and its config.
    pub fn new(run_dir: String, images: &[(ImageRole, String)], nets: Vec<Option<String>>, cfg: &VmmConfig) -> VmmPlan {
        let image = |role| images.iter().find(|(r, _)| *r == role).map(|(_, p)| p.clone());
        let disks = images.iter().filter_map(|(r, p)| match r {
            ImageRole::Disk { readonly } => Some((p.clone(), *readonly)),
            _ => None,
        });
        VmmPlan {
            run_dir,
            kernel: image(ImageRole::Kernel),
            initramfs: image(ImageRole::Initramfs),
            firmware: image(ImageRole::Firmware),
            cmdline: cfg.cmdline.clone(),
            disks: disks.collect(),
            nets,
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            vsock: cfg.vsock,
        }
    }

    /// Checks every field again, whoever built the plan.
    pub fn check(&self) -> Result<(), FieldError> {
        check_range("vcpus", self.vcpus.into(), 1, MAX_VCPUS.into())?;
        check_range("memory_mib", self.memory_mib.into(), 1, MAX_MEMORY_MIB.into())?;
        check_range("disks", self.disks.len() as u64, 0, MAX_DISKS as u64)?;
        check_range("nets", self.nets.len() as u64, 0, MAX_NETS as u64)?;
        if self.kernel.is_some() == self.firmware.is_some() {
            return Err(FieldError::Invalid { field: "kernel", reason: "exactly one of kernel and firmware".into() });
        }
        if self.kernel.is_none() && (self.initramfs.is_some() || self.cmdline.is_some()) {
            return Err(FieldError::Invalid {
                field: "initramfs",
                reason: "initramfs and cmdline need a kernel".into(),
            });
        }
        let paths = [&self.kernel, &self.initramfs, &self.firmware].into_iter().flatten();
        for p in paths.chain(self.disks.iter().map(|d| &d.0)).chain([&self.run_dir]) {
            check_path_text(p)?;
        }
        if let Some(c) = &self.cmdline {
            check_cmdline(c)?;
        }
        self.nets.iter().flatten().try_for_each(|m| check_mac(m))
    }

    /// cloud-hypervisor's arguments (without argv[0]). CH creates and boots the VM at start.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |flag: &str, val: String| {
            a.push(flag.to_string());
            a.push(val);
        };
        push("--api-socket", format!("fd={VMM_API_FD}"));
        push("--event-monitor", format!("fd={VMM_EVENT_FD}"));
        if let Some(k) = &self.kernel {
            push("--kernel", k.clone());
        }
        if let Some(i) = &self.initramfs {
            push("--initramfs", i.clone());
        }
        if let Some(f) = &self.firmware {
            push("--firmware", f.clone());
        }
        if let Some(c) = &self.cmdline {
            push("--cmdline", c.clone());
        }
        push("--cpus", format!("boot={}", self.vcpus));
        push("--memory", format!("size={}M", self.memory_mib));
        for (path, ro) in &self.disks {
            push("--disk", format!("path={path}{}", if *ro { ",readonly=on" } else { "" }));
        }
        for (i, mac) in self.nets.iter().enumerate() {
            let fd = VMM_FIRST_TAP_FD + i as i32;
            push("--net", format!("fd={fd}{}", mac.as_ref().map(|m| format!(",mac={m}")).unwrap_or_default()));
        }
        push("--serial", format!("socket={}/{SERIAL_SOCKET}", self.run_dir));
        push("--console", "off".into());
        if self.vsock {
            push("--vsock", format!("cid={GUEST_CID},socket={}/{VSOCK_SOCKET}", self.run_dir));
        }
        push("--seccomp", "true".into());
        a.push("--pvpanic".into());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_trims_keep_the_newest_mib_in_whole_pages() {
        assert_eq!(log_punch_len(0), None);
        assert_eq!(log_punch_len(LOG_KEEP), None);
        assert_eq!(log_punch_len(LOG_KEEP + 4095), None);
        assert_eq!(log_punch_len(LOG_KEEP + 4096), Some(4096));
        assert_eq!(log_punch_len(LOG_KEEP + 10_000), Some(8192));
        assert_eq!(log_punch_len(80 << 20), Some((80 << 20) - LOG_KEEP));
    }

    fn plan() -> VmmPlan {
        VmmPlan {
            run_dir: "/run/my_hypervisor/vmm/a".into(),
            kernel: Some("/img/k".into()),
            initramfs: None,
            firmware: None,
            cmdline: Some("console=ttyS0 quiet".into()),
            disks: vec![("/img/d.raw".into(), false), ("/img/ro.raw".into(), true)],
            nets: vec![Some("52:54:00:12:34:56".into()), None],
            vcpus: 2,
            memory_mib: 512,
            vsock: true,
        }
    }

    #[test]
    fn argv() {
        let p = plan();
        assert_eq!(p.check(), Ok(()));
        let a = p.args().join(" ");
        assert_eq!(
            a,
            "--api-socket fd=3 --event-monitor fd=4 --kernel /img/k --cmdline console=ttyS0 quiet \
             --cpus boot=2 --memory size=512M --disk path=/img/d.raw --disk path=/img/ro.raw,readonly=on \
             --net fd=5,mac=52:54:00:12:34:56 --net fd=6 --serial socket=/run/my_hypervisor/vmm/a/serial.sock \
             --console off --vsock cid=3,socket=/run/my_hypervisor/vmm/a/vsock.sock --seccomp true --pvpanic"
        );
    }

    #[test]
    fn the_sandbox_spec_runs_the_plan_under_its_binary() {
        use crate::sandbox::{SandboxOptions, SandboxSpec};
        let opts = SandboxOptions { seccomp: crate::seccomp::Mode::Log, landlock_best_effort: true };
        let spec = SandboxSpec::new("a", 62601, "/usr/bin/cloud-hypervisor".into(), None, plan(), opts);
        assert_eq!(
            (spec.vm.as_str(), spec.uid, spec.seccomp, spec.landlock_best_effort),
            ("a", 62601, opts.seccomp, true)
        );
        let argv = spec.ch_argv();
        assert_eq!(argv[0], "/usr/bin/cloud-hypervisor");
        assert_eq!(argv[1..], plan().args()[..]);
    }

    #[test]
    fn exits_and_kills_are_reported_and_nothing_else() {
        use nix::sys::signal::Signal;
        use nix::sys::wait::WaitStatus;
        use nix::unistd::Pid;
        let pid = Pid::from_raw(4321);
        assert_eq!(exit_status(WaitStatus::Exited(pid, 3)), Some((4321, ExitStatus::Code(3))));
        let killed = WaitStatus::Signaled(pid, Signal::SIGKILL, false);
        assert_eq!(exit_status(killed), Some((4321, ExitStatus::Signal(libc::SIGKILL))));
        assert_eq!(exit_status(WaitStatus::Stopped(pid, Signal::SIGSTOP)), None);
        assert_eq!(exit_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn a_tap_lands_only_on_an_allowed_bridge() {
        let allowed = vec!["br0".to_string(), "vmbr1".to_string()];
        assert_eq!(check_bridge(&allowed, None), Ok(()));
        assert_eq!(check_bridge(&allowed, Some("vmbr1")), Ok(()));
        assert_eq!(check_bridge(&allowed, Some("br1")), Err("br1".to_string()));
        assert_eq!(check_bridge(&allowed, Some("br")), Err("br".to_string()), "whole names only");
        assert_eq!(check_bridge(&[], Some("br0")), Err("br0".to_string()), "none by default");
    }

    #[test]
    fn only_a_socket_owned_by_the_vm_uid_is_connected() {
        assert_eq!(check_socket_node("api.sock", libc::S_IFSOCK | 0o600, 62601, 62601), Ok(()));
        let refused = "api.sock is not a socket owned by the VM uid 62601";
        assert_eq!(check_socket_node("api.sock", libc::S_IFSOCK | 0o600, 0, 62601).unwrap_err(), refused);
        assert_eq!(check_socket_node("api.sock", libc::S_IFLNK | 0o777, 62601, 62601).unwrap_err(), refused);
        assert_eq!(check_socket_node("api.sock", libc::S_IFIFO | 0o600, 62601, 62601).unwrap_err(), refused);
    }

    #[test]
    fn only_a_regular_file_owned_by_root_is_taken_up_as_an_output() {
        assert_eq!(check_output_node("vmm.log", libc::S_IFREG | 0o600, 0), Ok(()));
        let refused = "vmm.log is not the broker's regular file";
        assert_eq!(check_output_node("vmm.log", libc::S_IFREG | 0o600, 62601).unwrap_err(), refused);
        assert_eq!(check_output_node("vmm.log", libc::S_IFIFO | 0o600, 0).unwrap_err(), refused);
        assert_eq!(check_output_node("vmm.log", libc::S_IFLNK | 0o777, 0).unwrap_err(), refused);
        assert_eq!(check_output_node("vmm.log", libc::S_IFCHR | 0o600, 0).unwrap_err(), refused);
    }

    #[test]
    fn plan_checks() {
        let bad: [fn(&mut VmmPlan); 8] = [
            |p| p.vcpus = 0,
            |p| p.memory_mib = MAX_MEMORY_MIB + 1,
            |p| p.firmware = Some("/img/fw".into()),
            |p| p.disks[0].0 = "/img/a,b".into(),
            |p| p.nets[0] = Some("01:00:00:00:00:00".into()),
            |p| p.cmdline = Some("a\nb".into()),
            |p| p.disks = vec![("/x".into(), true); MAX_DISKS + 1],
            |p| {
                p.kernel = None;
                p.firmware = Some("/fw".into())
            },
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut p = plan();
            f(&mut p);
            assert!(p.check().is_err(), "case {i}");
        }
        // Firmware with an initramfs is refused.
        let mut p = plan();
        p.kernel = None;
        p.firmware = Some("/fw".into());
        p.cmdline = None;
        p.initramfs = Some("/img/i".into());
        assert!(p.check().is_err());
        p.initramfs = None;
        p.cmdline = None;
        assert_eq!(p.check(), Ok(()));
    }

    #[test]
    fn names() {
        assert!(check_mac("52:54:00:ab:CD:ef").is_ok());
        for m in ["52:54:00:ab:cd", "52-54-00-ab-cd-ef", "zz:54:00:ab:cd:ef", "ff:ff:ff:ff:ff:ff"] {
            assert!(check_mac(m).is_err(), "{m}");
        }
        assert!(check_ifname("br0").is_ok());
        for n in ["", "a b", "0123456789abcdef", "..", "br/0"] {
            assert!(check_ifname(n).is_err(), "{n}");
        }
        assert!(tap_name(4_294_967_295, 9).len() <= MAX_IFNAME);
    }
}
