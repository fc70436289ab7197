//! guest-init's config: `myhv.*` words on the kernel command line, over `key=value` lines in
//! a file in the initramfs. A bad value is reported and ignored; it never stops the boot.

use my_hypervisor_exec_proto::DEFAULT_VSOCK_PORT;

/// The file in the initramfs; the kernel command line overrides it key by key.
pub const CONFIG_FILE: &str = "/etc/my_hypervisor-init.conf";
/// The prefix of guest-init's words on the kernel command line.
pub const CMDLINE_PREFIX: &str = "myhv.";
const MAX_MODULES: usize = 128;
const MAX_MTUS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub port: u32,
    /// Loaded in this order, each after its dependencies.
    pub modules: Vec<String>,
    pub hostname: Option<String>,
    /// (interface, MTU)
    pub mtus: Vec<(String, u32)>,
}

impl Default for Config {
    fn default() -> Self {
        Config { port: DEFAULT_VSOCK_PORT, modules: Vec::new(), hostname: None, mtus: Vec::new() }
    }
}

impl Config {
    /// Applies the file's lines (`key=value`, `#` comments), then the command line's
    /// `myhv.key=value` words. Returns the problems found, each already skipped.
    pub fn load(file: Option<&str>, cmdline: Option<&str>) -> (Config, Vec<String>) {
        let mut cfg = Config::default();
        let mut problems = Vec::new();
        for line in file.unwrap_or("").lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('=') {
                Some((k, v)) => cfg.set(k.trim(), v.trim(), &mut problems),
                None => problems.push(format!("config line {line:?} is not key=value")),
            }
        }
        for word in cmdline.unwrap_or("").split_ascii_whitespace() {
            let Some(rest) = word.strip_prefix(CMDLINE_PREFIX) else { continue };
            match rest.split_once('=') {
                Some((k, v)) => cfg.set(k, v, &mut problems),
                None => problems.push(format!("kernel command line word {word:?} has no value")),
            }
        }
        (cfg, problems)
    }

    fn set(&mut self, key: &str, value: &str, problems: &mut Vec<String>) {
        let mut bad = |why: &str| problems.push(format!("config {key}={value:?}: {why}"));
        match key {
            "port" => match value.parse::<u32>() {
                Ok(p) if p > 0 && p != u32::MAX => self.port = p,
                _ => bad("not a vsock port"),
            },
            "hostname" => {
                if valid_hostname(value) {
                    self.hostname = Some(value.to_string());
                } else {
                    bad("not a hostname (1-64 of a-z, A-Z, 0-9, '-', '.')");
                }
            }
            "modules" => {
                for m in value.split(',').filter(|m| !m.is_empty()) {
                    if !valid_module(m) {
                        bad("a module name is not 1-64 of a-z, A-Z, 0-9, '_', '-'");
                    } else if self.modules.len() >= MAX_MODULES {
                        bad("too many modules");
                        break;
                    } else if !self.modules.iter().any(|x| x == m) {
                        self.modules.push(m.to_string());
                    }
                }
            }
            "mtu" => {
                for pair in value.split(',').filter(|p| !p.is_empty()) {
                    let parsed = pair.split_once(':').and_then(|(i, m)| {
                        let mtu = m.parse::<u32>().ok().filter(|m| (68..=65535).contains(m))?;
                        valid_ifname(i).then(|| (i.to_string(), mtu))
                    });
                    match parsed {
                        Some(_) if self.mtus.len() >= MAX_MTUS => bad("too many interfaces"),
                        Some((i, m)) => {
                            self.mtus.retain(|(x, _)| *x != i);
                            self.mtus.push((i, m));
                        }
                        None => bad("not IFNAME:MTU with MTU 68-65535"),
                    }
                }
            }
            _ => bad("unknown key"),
        }
    }
}

fn valid_hostname(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn valid_module(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Kernel interface names: 1-15 bytes, no '/', ':' or whitespace.
pub fn valid_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_overrides_the_file_and_bad_values_are_skipped() {
        let file = "# comment\nport = 2000\nmodules = virtio_pci,vsock\nhostname=from-file\nbogus\n";
        let cmdline = "console=hvc0 myhv.port=1025 myhv.mtu=eth0:1400,eth1:9000 \
                       myhv.modules=button,virtio_pci myhv.hostname=bad/name myhv.mtu=eth0:1 myhv.nope=1 myhv.port";
        let (cfg, problems) = Config::load(Some(file), Some(cmdline));
        assert_eq!(cfg.port, 1025);
        assert_eq!(cfg.modules, ["virtio_pci", "vsock", "button"]);
        assert_eq!(cfg.hostname.as_deref(), Some("from-file"));
        assert_eq!(cfg.mtus, [("eth0".to_string(), 1400), ("eth1".to_string(), 9000)]);
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("unknown key")));
    }

    #[test]
    fn defaults_without_any_config() {
        let (cfg, problems) = Config::load(None, Some("quiet root=/dev/vda"));
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.port, DEFAULT_VSOCK_PORT);
        assert!(problems.is_empty());
        let (_, problems) = Config::load(None, Some("myhv.port=0 myhv.port=x myhv.modules=../x"));
        assert_eq!(problems.len(), 3);
    }
}
