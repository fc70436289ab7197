//! Kernel modules: the load order from modules.dep, and finit_module.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// finit_module flag: the file is compressed and the kernel decompresses it.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// `virtio-pci` and `virtio_pci` name the same module.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path in modules.dep: its file name up to the first '.'.
fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalize(file.split('.').next().unwrap_or(file))
}

/// The files to load for `wanted`, dependencies first, each once. Modules built into the
/// kernel are skipped; a name modules.dep does not know is reported and skipped.
pub fn load_order(dep: &str, builtin: &str, wanted: &[String]) -> (Vec<String>, Vec<String>) {
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((module, rest)) = line.split_once(':') else { continue };
        let list = rest.split_ascii_whitespace().map(str::to_string).collect();
        deps.insert(name_of(module), (module.trim().to_string(), list));
    }
    let builtin: HashSet<String> = builtin.lines().map(name_of).collect();
    let (mut order, mut problems, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
    for w in wanted {
        let name = normalize(w);
        if builtin.contains(&name) {
            continue;
        }
        let Some((path, list)) = deps.get(&name) else {
            problems.push(format!("module {w} is not in modules.dep"));
            continue;
        };
        // modules.dep lists a module's dependencies so that the last must load first.
        for d in list.iter().rev().chain(std::iter::once(path)) {
            if seen.insert(d.clone()) {
                order.push(d.clone());
            }
        }
    }
    (order, problems)
}

/// Loads `wanted` from `/lib/modules/<release>`, logging each failure and going on.
pub fn load(dir: &Path, wanted: &[String]) {
    if wanted.is_empty() {
        return;
    }
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let dep = match read("modules.dep") {
        Ok(d) => d,
        Err(e) => {
            log!("my_hypervisor-init: {}: {e}", dir.join("modules.dep").display());
            return;
        }
    };
    let (order, problems) = load_order(&dep, &read("modules.builtin").unwrap_or_default(), wanted);
    for p in problems {
        log!("my_hypervisor-init: {p}");
    }
    for rel in order {
        let path: PathBuf = dir.join(&rel);
        match finit_module(&path) {
            Ok(()) => log!("my_hypervisor-init: loaded {rel}"),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => log!("my_hypervisor-init: loading {}: {e}", path.display()),
        }
    }
}

fn finit_module(path: &Path) -> std::io::Result<()> {
    let file = File::open(path)?;
    let compressed = [".xz", ".zst", ".gz"].iter().any(|s| path.to_string_lossy().ends_with(s));
    let flags = if compressed { MODULE_INIT_COMPRESSED_FILE } else { 0 };
    // SAFETY: finit_module reads the open fd and the NUL-terminated empty parameter string;
    // it touches no memory of ours beyond those.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), flags) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz\n\
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:\n\
kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz:\n\
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n\
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n\
kernel/net/core/failover.ko.xz:\n";

    #[test]
    fn dependencies_load_first_each_once_and_builtins_are_skipped() {
        let wanted: Vec<String> = ["virtio-pci", "virtio_net", "button", "nosuch"].map(String::from).into();
        let (order, problems) = load_order(DEP, "kernel/drivers/acpi/button.ko\n", &wanted);
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz",
                "kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz",
                "kernel/drivers/virtio/virtio_pci.ko.xz",
                "kernel/net/core/failover.ko.xz",
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz",
            ]
        );
        assert_eq!(problems, ["module nosuch is not in modules.dep"]);
    }
}
