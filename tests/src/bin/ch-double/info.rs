//! vm.info's body: CH v53's shape and values for what the double knows.

use serde_json::{Value, json};

use crate::cli::Serial;
use crate::vmm::Vmm;

impl Vmm {
    pub fn info(&self) -> Value {
        let c = &self.cfg;
        let mut payload = serde_json::Map::new();
        for (k, v) in
            [("firmware", &c.firmware), ("kernel", &c.kernel), ("cmdline", &c.cmdline), ("initramfs", &c.initramfs)]
        {
            if let Some(v) = v {
                payload.insert(k.into(), json!(v));
            }
        }
        let id = |i: usize| self.ids.get(i).cloned();
        let disks: Vec<Value> = c
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                json!({"id": id(i), "pci_segment": 0, "path": d.path, "readonly": d.readonly, "direct": false,
                "num_queues": 1, "queue_size": 128, "vhost_user": false, "disable_io_uring": false,
                "disable_aio": false, "backing_files": false, "sparse": true,
                "image_type": d.image_type.clone().map_or("Raw".into(), |t| capitalise(&t)),
                "lock_granularity": "ByteRange"})
            })
            .collect();
        let nets: Vec<Value> = c
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                json!({"id": id(c.disks.len() + i), "pci_segment": 0,
                "mac": n.mac.clone().unwrap_or_else(|| default_mac(i)), "num_queues": n.num_queues,
                "queue_size": 256, "vhost_user": false, "vhost_mode": "Client", "fds": n.fds,
                "offload_tso": true, "offload_ufo": true, "offload_csum": true})
            })
            .collect();
        let mode = |s: &Serial| match s {
            Serial::Off => json!({"mode": "Off"}),
            Serial::Null => json!({"mode": "Null"}),
            Serial::Tty => json!({"mode": "Tty"}),
            Serial::Pty => json!({"mode": "Pty"}),
            Serial::File(p) => json!({"mode": "File", "file": p}),
            Serial::Socket(p) => json!({"mode": "Socket", "socket": p}),
        };
        let mut console = match cli_console(&c.console) {
            Some(s) => mode(&s),
            None => json!({"mode": "Tty"}),
        };
        console["pci_segment"] = json!(0);
        let mut config = json!({
            "cpus": {"boot_vcpus": c.boot_vcpus, "max_vcpus": c.max_vcpus, "kvm_hyperv": false,
                "max_phys_bits": 46, "features": {"amx": false}, "nested": true,
                "core_scheduling": "Vm", "profile": "Host"},
            "memory": {"size": c.memory, "mergeable": false, "hotplug_method": "Acpi", "shared": false,
                "hugepages": false, "prefault": false, "reserve": false, "thp": true},
            "payload": payload,
            "rng": {"pci_segment": 0, "src": "/dev/urandom"},
            "serial": mode(&c.serial),
            "console": console,
            "debug_console": {"mode": "Off", "iobase": 233},
            "pvpanic": c.pvpanic,
            "iommu": false,
            "watchdog": false,
            "landlock_enable": c.landlock,
        });
        if !disks.is_empty() {
            config["disks"] = json!(disks);
        }
        if !nets.is_empty() {
            config["net"] = json!(nets);
        }
        if let Some(v) = &c.vsock {
            config["vsock"] = json!({"id": id(c.disks.len() + c.nets.len()), "pci_segment": 0,
                "cid": v.cid, "socket": v.socket});
        }
        let (state, tree) = match &self.vm {
            None => ("Created", Value::Null),
            Some(vm) => (if vm.paused { "Paused" } else { "Running" }, self.device_tree()),
        };
        json!({"config": config, "state": state, "memory_actual_size": c.memory, "device_tree": tree})
    }

    fn device_tree(&self) -> Value {
        let mut tree = serde_json::Map::new();
        let leaf = |id: &str, parent: Option<String>| {
            let mut v = json!({"id": id, "resources": [], "children": []});
            if let Some(p) = parent {
                v["parent"] = json!(p);
            }
            v
        };
        tree.insert("__serial".into(), leaf("__serial", None));
        tree.insert("__ioapic".into(), leaf("__ioapic", None));
        let mut slot = 1;
        let mut bar: u64 = 0xe800_0000;
        let mut pci = |tree: &mut serde_json::Map<String, Value>, id: &str| {
            let dev = format!("_virtio-pci-{id}");
            tree.insert(id.into(), leaf(id, Some(dev.clone())));
            tree.insert(
                dev.clone(),
                json!({"id": dev, "resources": [{"PciBar": {"index": 0, "base": bar, "size": 524288,
                    "type_": "Mmio32", "prefetchable": false}}], "children": [id],
                    "pci_bdf": format!("0000:00:{slot:02x}.0")}),
            );
            slot += 1;
            bar += 0x8_0000;
        };
        let n = self.cfg.disks.len() + self.cfg.nets.len();
        for id in &self.ids[..n.min(self.ids.len())] {
            pci(&mut tree, id);
        }
        pci(&mut tree, "__rng");
        for id in self.ids.iter().skip(n) {
            pci(&mut tree, id);
        }
        if self.cfg.pvpanic {
            tree.insert(
                "__pvpanic".into(),
                json!({"id": "__pvpanic", "resources": [{"PciBar": {"index": 0, "base": 0xe7ff_fff0u64,
                    "size": 2, "type_": "Mmio32", "prefetchable": false}}], "children": [],
                    "pci_bdf": format!("0000:00:{slot:02x}.0")}),
            );
        }
        Value::Object(tree)
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c.flat_map(|x| x.to_lowercase())).collect()).unwrap_or_default()
}

fn default_mac(i: usize) -> String {
    let pid = std::process::id();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", (pid >> 16) as u8, (pid >> 8) as u8, pid as u8, i as u8)
}

fn cli_console(s: &str) -> Option<Serial> {
    Some(match s {
        "off" => Serial::Off,
        "null" => Serial::Null,
        "pty" => Serial::Pty,
        "tty" => Serial::Tty,
        _ => return None,
    })
}
