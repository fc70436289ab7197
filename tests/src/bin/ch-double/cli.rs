//! cloud-hypervisor's command line: clap's flag handling (usage errors exit 2) and CH's
//! option-string parser (`key=value` items split on commas outside quotes and brackets;
//! configuration errors exit 1).

use std::collections::BTreeMap;

use crate::options::{byte_size, integer_list, lookup, options, split_options, toggle};

/// Where the API socket or the event monitor lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Fd(i32),
    Path(String),
}

#[derive(Debug, Clone)]
pub struct Disk {
    pub path: String,
    pub readonly: bool,
    pub image_type: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Net {
    pub fds: Vec<i32>,
    pub mac: Option<String>,
    pub num_queues: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    Off,
    Null,
    Tty,
    Pty,
    File(String),
    Socket(String),
}

#[derive(Debug, Clone)]
pub struct Vsock {
    pub cid: u32,
    pub socket: String,
}

/// What the double was started with.
#[derive(Debug, Clone)]
pub struct Config {
    pub api: Option<Endpoint>,
    pub event_monitor: Option<Endpoint>,
    pub kernel: Option<String>,
    pub initramfs: Option<String>,
    pub firmware: Option<String>,
    pub cmdline: Option<String>,
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
    pub memory: u64,
    pub disks: Vec<Disk>,
    pub nets: Vec<Net>,
    pub serial: Serial,
    pub console: String,
    pub vsock: Option<Vsock>,
    pub pvpanic: bool,
    pub no_shutdown: bool,
    pub landlock: bool,
}

/// Why the command line was refused, and how CH reports it.
#[derive(Debug)]
pub enum CliError {
    /// clap's usage errors: a message on stderr, exit 2.
    Usage(String),
    /// `--version` or `--help`: print on stdout, exit 0.
    Info(String),
    /// CH's configuration errors: an error chain, exit 1.
    Config(Vec<String>),
}

const USAGE: &str = "Usage: cloud-hypervisor [OPTIONS]\n\nFor more information, try '--help'.";

/// The flags CH v53 knows: (name, takes a value, may repeat with several values, vm-config group).
const FLAGS: &[(&str, Arity, bool)] = &[
    ("api-socket", Arity::One, false),
    ("balloon", Arity::One, true),
    ("cmdline", Arity::One, true),
    ("console", Arity::One, true),
    ("cpus", Arity::One, true),
    ("debug-console", Arity::One, true),
    ("device", Arity::Many, true),
    ("disk", Arity::Many, true),
    ("event-monitor", Arity::One, false),
    ("firmware", Arity::One, false),
    ("fs", Arity::Many, true),
    ("initramfs", Arity::One, true),
    ("kernel", Arity::One, false),
    ("landlock", Arity::Zero, true),
    ("landlock-rules", Arity::Many, true),
    ("log-file", Arity::One, false),
    ("memory", Arity::One, true),
    ("net", Arity::Many, true),
    ("no-shutdown", Arity::Zero, false),
    ("pmem", Arity::Many, true),
    ("pvpanic", Arity::Zero, true),
    ("rng", Arity::One, true),
    ("seccomp", Arity::One, false),
    ("serial", Arity::One, true),
    ("vsock", Arity::One, true),
    ("watchdog", Arity::Zero, true),
    ("version", Arity::Zero, false),
    ("help", Arity::Zero, false),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arity {
    Zero,
    One,
    Many,
}

/// Parses argv (without argv[0]).
pub fn parse(args: &[String]) -> Result<Config, CliError> {
    let mut seen: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "-V" {
            seen.entry("version").or_default();
            continue;
        }
        if arg == "-h" {
            seen.entry("help").or_default();
            continue;
        }
        if arg.starts_with('-') && !arg.starts_with("--") && arg[1..].chars().all(|c| c == 'v') && arg.len() > 1 {
            continue; // -v, -vv: log verbosity
        }
        let Some(long) = arg.strip_prefix("--") else {
            return Err(CliError::Usage(format!("error: unexpected argument '{arg}' found\n\n{USAGE}")));
        };
        let (name, inline) = match long.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (long, None),
        };
        let Some(&(flag, arity, _)) = FLAGS.iter().find(|f| f.0 == name) else {
            return Err(CliError::Usage(format!("error: unexpected argument '--{name}' found\n\n{USAGE}")));
        };
        let mut values = Vec::new();
        match arity {
            Arity::Zero => {
                if inline.is_some() {
                    return Err(CliError::Usage(format!(
                        "error: unexpected value for '--{flag}' found; no more were expected\n\n{USAGE}"
                    )));
                }
            }
            Arity::One | Arity::Many => {
                if let Some(v) = inline {
                    values.push(v);
                } else if i < args.len() && !args[i].starts_with("--") {
                    values.push(args[i].clone());
                    i += 1;
                }
                if arity == Arity::Many {
                    while i < args.len() && !args[i].starts_with('-') {
                        values.push(args[i].clone());
                        i += 1;
                    }
                }
                if values.is_empty() {
                    return Err(CliError::Usage(format!(
                        "error: a value is required for '--{flag} <{flag}>' but none was supplied\n\n{USAGE}"
                    )));
                }
            }
        }
        if let Some(prev) = seen.get_mut(flag) {
            if arity != Arity::Many {
                return Err(CliError::Usage(format!(
                    "error: the argument '--{flag} <{flag}>' cannot be used multiple times\n\n{USAGE}"
                )));
            }
            prev.extend(values);
        } else {
            seen.insert(flag, values);
        }
    }
    if seen.contains_key("help") {
        return Err(CliError::Info(format!("Cloud Hypervisor (test double)\n\n{USAGE}")));
    }
    if seen.contains_key("version") {
        return Err(CliError::Info("cloud-hypervisor v53.0.0".into()));
    }
    let payload = ["kernel", "firmware"].iter().any(|f| seen.contains_key(f));
    if !payload && let Some(f) = FLAGS.iter().find(|f| f.2 && seen.contains_key(f.0)) {
        let _ = f;
        return Err(CliError::Usage(format!(
            "error: the following required arguments were not provided:\n  <--firmware <firmware>|--kernel <kernel>>\n\n{USAGE}"
        )));
    }
    let one = |f: &str| seen.get(f).and_then(|v| v.first().cloned());
    let config_err = |flag: &str, e: String| {
        CliError::Config(vec!["Error parsing config".into(), format!("Error parsing --{flag}"), e])
    };

    let api = one("api-socket").map(|s| {
        // CH ignores parse errors here and falls back to the bare string as a path.
        let o = split_options(&s).unwrap_or_default();
        if let Some(fd) = lookup(&o, "fd") {
            fd.parse::<i32>().map(Endpoint::Fd).map_err(|e| config_err("api-socket", e.to_string()))
        } else if let Some(p) = lookup(&o, "path") {
            Ok(Endpoint::Path(p))
        } else {
            Ok(Endpoint::Path(s.clone()))
        }
    });
    let api = api.transpose()?;
    let event_monitor = match one("event-monitor") {
        None => None,
        Some(s) => {
            let o = options(&s, &["path", "fd"]).map_err(|e| config_err("event-monitor", e))?;
            if let Some(fd) = lookup(&o, "fd") {
                Some(Endpoint::Fd(fd.parse::<i32>().map_err(|e| config_err("event-monitor", format!("{e}")))?))
            } else if let Some(p) = lookup(&o, "path") {
                Some(Endpoint::Path(p))
            } else {
                return Err(config_err("event-monitor", "path or fd required".into()));
            }
        }
    };

    let cpus = options(
        &one("cpus").unwrap_or_else(|| "boot=1".into()),
        &[
            "boot",
            "max",
            "topology",
            "kvm_hyperv",
            "max_phys_bits",
            "affinity",
            "features",
            "nested",
            "core_scheduling",
            "profile",
        ],
    )
    .map_err(|e| config_err("cpus", e))?;
    let boot_vcpus = match lookup(&cpus, "boot") {
        Some(b) => b.parse::<u32>().map_err(|e| config_err("cpus", format!("{e}")))?,
        None => 1,
    };
    let max_vcpus = match lookup(&cpus, "max") {
        Some(b) => b.parse::<u32>().map_err(|e| config_err("cpus", format!("{e}")))?,
        None => boot_vcpus,
    };
    let memory = options(
        &one("memory").unwrap_or_else(|| "size=512M".into()),
        &[
            "size",
            "file",
            "mergeable",
            "hotplug_method",
            "hotplug_size",
            "hotplugged_size",
            "shared",
            "hugepages",
            "hugepage_size",
            "prefault",
            "reserve",
            "thp",
        ],
    )
    .map_err(|e| config_err("memory", e))?;
    let memory = match lookup(&memory, "size") {
        Some(s) => byte_size(&s).map_err(|e| config_err("memory", e))?,
        None => 512 << 20,
    };

    let mut disks = Vec::new();
    for d in seen.get("disk").into_iter().flatten() {
        let o = options(
            d,
            &[
                "path",
                "readonly",
                "direct",
                "iommu",
                "queue_size",
                "num_queues",
                "vhost_user",
                "socket",
                "bw_size",
                "bw_one_time_burst",
                "bw_refill_time",
                "ops_size",
                "ops_one_time_burst",
                "ops_refill_time",
                "id",
                "_disable_io_uring",
                "_disable_aio",
                "pci_segment",
                "serial",
                "rate_limit_group",
                "queue_affinity",
                "pci_device_id",
                "backing_files",
                "sparse",
                "image_type",
                "lock_granularity",
            ],
        )
        .map_err(|e| config_err("disk", e))?;
        let readonly = toggle(&o, "readonly").map_err(|e| config_err("disk", e))?;
        let Some(path) = lookup(&o, "path") else {
            return Err(CliError::Config(vec![
                "Error parsing config".into(),
                "Error validating configuration".into(),
                "Disk path missing".into(),
            ]));
        };
        disks.push(Disk { path, readonly, image_type: lookup(&o, "image_type") });
    }

    let mut nets = Vec::new();
    for n in seen.get("net").into_iter().flatten() {
        let o = options(
            n,
            &[
                "tap",
                "ip",
                "mask",
                "mac",
                "host_mac",
                "offload_tso",
                "offload_ufo",
                "offload_csum",
                "mtu",
                "iommu",
                "queue_size",
                "num_queues",
                "vhost_user",
                "socket",
                "vhost_mode",
                "id",
                "fd",
                "bw_size",
                "bw_one_time_burst",
                "bw_refill_time",
                "ops_size",
                "ops_one_time_burst",
                "ops_refill_time",
                "pci_segment",
                "pci_device_id",
            ],
        )
        .map_err(|e| config_err("net", e))?;
        let fds = match lookup(&o, "fd") {
            Some(f) => integer_list(&f).map_err(|e| config_err("net", e))?,
            None => Vec::new(),
        };
        let num_queues = match lookup(&o, "num_queues") {
            Some(q) => q.parse::<usize>().map_err(|e| config_err("net", format!("{e}")))?,
            None => 2,
        };
        let invalid = |why: String| {
            CliError::Config(vec!["Error parsing config".into(), "Error validating configuration".into(), why])
        };
        if num_queues < 2 {
            return Err(invalid(format!("Number of queues to virtio_net less than 2: {num_queues}")));
        }
        if !fds.is_empty() {
            if fds.len() * 2 != num_queues {
                return Err(invalid(format!(
                    "Number of queues to virtio_net does not match the number of input FDs: {num_queues}/{}",
                    fds.len()
                )));
            }
            if let Some(fd) = fds.iter().find(|&&fd| fd <= 2) {
                return Err(invalid(format!("Reserved fd number (<= 2): {fd}")));
            }
        }
        nets.push(Net { fds, mac: lookup(&o, "mac"), num_queues });
    }

    let serial = match one("serial") {
        None => Serial::Null,
        Some(s) => console_mode(&s).map_err(|e| config_err("serial", e))?,
    };
    let console = one("console").unwrap_or_else(|| "tty".into());
    if let Serial::Socket(_) = console_mode(&console).map_err(|e| config_err("console", e))? {
        return Err(CliError::Config(vec![
            "Error parsing config".into(),
            "Error validating configuration".into(),
            "No socket option support for console device".into(),
        ]));
    }
    let vsock = match one("vsock") {
        None => None,
        Some(v) => {
            let o = options(&v, &["cid", "socket", "iommu", "id", "pci_segment", "pci_device_id"])
                .map_err(|e| config_err("vsock", e))?;
            let socket = lookup(&o, "socket")
                .ok_or_else(|| config_err("vsock", "Error parsing --vsock: socket missing".into()))?;
            let cid = lookup(&o, "cid")
                .ok_or_else(|| config_err("vsock", "Error parsing --vsock: cid missing".into()))?
                .parse::<u32>()
                .map_err(|e| config_err("vsock", format!("{e}")))?;
            Some(Vsock { cid, socket })
        }
    };
    if let Some(s) = one("seccomp")
        && !["true", "false", "log", "errno"].contains(&s.as_str())
    {
        return Err(CliError::Usage(format!(
            "error: invalid value '{s}' for '--seccomp <seccomp>'\n  [possible values: true, false, log, errno]\n\n{USAGE}"
        )));
    }
    let (kernel, firmware) = (one("kernel"), one("firmware"));
    if kernel.is_some() && firmware.is_some() {
        return Err(CliError::Usage(format!(
            "error: the argument '--kernel <kernel>' cannot be used with '--firmware <firmware>'\n\n{USAGE}"
        )));
    }
    Ok(Config {
        api,
        event_monitor,
        kernel,
        initramfs: one("initramfs"),
        firmware,
        cmdline: one("cmdline"),
        boot_vcpus,
        max_vcpus,
        memory,
        disks,
        nets,
        serial,
        console,
        vsock,
        pvpanic: seen.contains_key("pvpanic"),
        no_shutdown: seen.contains_key("no-shutdown"),
        landlock: seen.contains_key("landlock"),
    })
}

/// `off|null|pty|tty|file=<path>|socket=<path>`.
fn console_mode(s: &str) -> Result<Serial, String> {
    let o = options(s, &["off", "null", "pty", "tty", "file", "socket", "iommu"])?;
    let has = |k: &str| o.iter().any(|(key, _)| key == k);
    Ok(if has("off") {
        Serial::Off
    } else if has("null") {
        Serial::Null
    } else if has("pty") {
        Serial::Pty
    } else if has("tty") {
        Serial::Tty
    } else if let Some(p) = lookup(&o, "file") {
        Serial::File(p)
    } else if let Some(p) = lookup(&o, "socket") {
        Serial::Socket(p)
    } else {
        return Err("invalid syntax".into());
    })
}
