//! The VM spec a client gives to `compute.vm.create`, and its validation.
//!
//! Every field is checked here with the same rules the broker applies again when it prepares
//! or spawns the VM (`my_hypervisor_policy`), so a bad spec is refused at create, naming its
//! field, instead of failing at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use my_hypervisor_policy::vmm::{
    MAX_CMDLINE, MAX_DISKS, MAX_MEMORY_MIB, MAX_MTU, MAX_NETS, MAX_VCPUS, MIN_MTU, check_cmdline, check_ifname,
    check_mac,
};
use my_hypervisor_policy::{check_path_text, check_vm_id};
use serde::{Deserialize, Serialize};

use super::error::VmError;

/// Most labels on one VM.
pub const MAX_LABELS: usize = 32;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 63;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 256;

/// What `compute.vm.create` takes. Stored as given, with `agent` resolved (see
/// [`VmSpec::normalized`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    #[schemars(length(min = 1, max = my_hypervisor_policy::names::VM_ID_MAX))]
    #[schemars(pattern(my_hypervisor_policy::names::VM_ID_PATTERN))]
    pub id: String,
    #[schemars(range(min = 1, max = MAX_VCPUS))]
    pub vcpus: u32,
    #[schemars(range(min = 1, max = MAX_MEMORY_MIB))]
    pub memory_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_CMDLINE))]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    #[serde(default)]
    #[schemars(length(max = MAX_DISKS))]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    #[schemars(length(max = MAX_NETS))]
    pub nets: Vec<NetSpec>,
    #[serde(default)]
    pub vsock: bool,
    /// Whether Running waits for the guest agent. Absent means the value of `vsock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<bool>,
    #[serde(default)]
    #[schemars(extend("maxProperties" = MAX_LABELS, "propertyNames" = {"pattern": format!("^[A-Za-z0-9._/-]{{1,{MAX_LABEL_KEY}}}$")}))]
    #[schemars(extend("additionalProperties" = {"type": "string", "maxLength": MAX_LABEL_VALUE}))]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: String,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern("^[A-Za-z0-9_.-]{1,15}$"))]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern("^[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){5}$"))]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = MIN_MTU, max = MAX_MTU))]
    pub mtu: Option<u32>,
}

impl VmSpec {
    /// The spec as stored: `agent` resolved to its default (the value of `vsock`). Two specs
    /// are "identical" for create's idempotency when their normalized forms are equal.
    pub fn normalized(mut self) -> VmSpec {
        self.agent = Some(self.agent.unwrap_or(self.vsock));
        self
    }

    /// Whether the guest runs the exec agent.
    pub fn agent(&self) -> bool {
        self.agent.unwrap_or(self.vsock)
    }

    /// The kernel command line the VM boots with: the spec's, plus guest-init's config
    /// (docs/guest-init.md) when the VM boots a kernel.
    pub fn boot_cmdline(&self) -> Option<String> {
        if self.kernel.is_none() {
            return self.cmdline.clone();
        }
        crate::exec::guest_cmdline(self.cmdline.as_deref(), self.agent(), self.nets.iter().map(|n| n.mtu))
    }

    /// Checks every field; the first bad one is named in the error.
    pub fn validate(&self, image_roots: &[PathBuf]) -> Result<(), VmError> {
        check_vm_id(&self.id).map_err(|e| bad("id", e.to_string()))?;
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(bad("vcpus", format!("must be between 1 and {MAX_VCPUS}, got {}", self.vcpus)));
        }
        if !(1..=u64::from(MAX_MEMORY_MIB)).contains(&self.memory_mib) {
            return Err(bad("memory_mib", format!("must be between 1 and {MAX_MEMORY_MIB}, got {}", self.memory_mib)));
        }
        match (&self.kernel, &self.firmware) {
            (Some(_), Some(_)) => {
                return Err(bad("firmware", "give either `kernel` or `firmware`, not both"));
            }
            (None, None) => return Err(bad("kernel", "give either `kernel` or `firmware`")),
            _ => {}
        }
        if self.kernel.is_none() {
            if self.initramfs.is_some() {
                return Err(bad("initramfs", "needs `kernel`"));
            }
            if self.cmdline.is_some() {
                return Err(bad("cmdline", "needs `kernel`"));
            }
        }
        for (field, path) in [("kernel", &self.kernel), ("initramfs", &self.initramfs), ("firmware", &self.firmware)] {
            if let Some(p) = path {
                check_image_path(field, p, image_roots)?;
            }
        }
        if let Some(c) = &self.cmdline {
            check_cmdline(c).map_err(|_| {
                bad("cmdline", format!("must be at most {MAX_CMDLINE} bytes with no control characters"))
            })?;
        }
        if self.disks.len() > MAX_DISKS {
            return Err(bad("disks", format!("at most {MAX_DISKS} disks, got {}", self.disks.len())));
        }
        for (i, d) in self.disks.iter().enumerate() {
            check_image_path(&format!("disks[{i}].path"), &d.path, image_roots)?;
        }
        if self.nets.len() > MAX_NETS {
            return Err(bad("nets", format!("at most {MAX_NETS} nets, got {}", self.nets.len())));
        }
        for (i, n) in self.nets.iter().enumerate() {
            if let Some(b) = &n.bridge {
                check_ifname(b)
                    .map_err(|_| bad(format!("nets[{i}].bridge"), "must be 1 to 15 characters of [A-Za-z0-9_.-]"))?;
            }
            if let Some(m) = &n.mac {
                check_mac(m)
                    .map_err(|_| bad(format!("nets[{i}].mac"), "must be a unicast MAC like 52:54:00:12:34:56"))?;
            }
            if let Some(mtu) = n.mtu
                && !(MIN_MTU..=MAX_MTU).contains(&mtu)
            {
                return Err(bad(
                    format!("nets[{i}].mtu"),
                    format!("must be between {MIN_MTU} and {MAX_MTU}, got {mtu}"),
                ));
            }
        }
        if self.agent == Some(true) && !self.vsock {
            return Err(bad("agent", "needs `vsock: true`"));
        }
        if let Some(c) = self.boot_cmdline()
            && c.len() > MAX_CMDLINE
        {
            let extra = c.len() - self.cmdline.as_ref().map_or(0, String::len);
            return Err(bad(
                "cmdline",
                format!(
                    "with the {extra} bytes appended for guest-init (vsock port, NIC MTUs) it is {} bytes, over the \
                     limit of {MAX_CMDLINE}",
                    c.len()
                ),
            ));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(bad("labels", format!("at most {MAX_LABELS} labels, got {}", self.labels.len())));
        }
        for (k, v) in &self.labels {
            let key_ok = (1..=MAX_LABEL_KEY).contains(&k.len())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
            if !key_ok {
                return Err(bad("labels", format!("a key must be 1 to {MAX_LABEL_KEY} characters of [A-Za-z0-9._/-]")));
            }
            if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
                return Err(bad(
                    format!("labels.{k}"),
                    format!("must be at most {MAX_LABEL_VALUE} bytes with no control characters"),
                ));
            }
        }
        Ok(())
    }
}

fn bad(field: impl Into<String>, detail: impl Into<String>) -> VmError {
    VmError::invalid_spec(field, detail)
}

/// An image path: absolute, free of what cloud-hypervisor's option parser splits on, without
/// `.`/`..`/empty components, and strictly below one of the image roots.
fn check_image_path(field: &str, path: &str, roots: &[PathBuf]) -> Result<(), VmError> {
    check_path_text(path).map_err(|e| bad(field, e.to_string()))?;
    let p = Path::new(path);
    if roots.iter().any(|r| p != r && p.starts_with(r)) {
        return Ok(());
    }
    let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    Err(bad(
        field,
        if roots.is_empty() {
            "no image root is configured, so no image path is accepted".to_string()
        } else {
            format!("{path:?} is not under an image root ({})", roots.join(", "))
        },
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn roots() -> Vec<PathBuf> {
        vec![PathBuf::from("/img"), PathBuf::from("/srv/images")]
    }

    fn good() -> Value {
        json!({
            "id": "web-1", "vcpus": 2, "memory_mib": 1024, "kernel": "/img/vmlinux",
            "initramfs": "/img/initrd", "cmdline": "console=ttyS0",
            "disks": [{"path": "/srv/images/root.img", "readonly": false}],
            "nets": [{"bridge": "br0", "mac": "52:54:00:12:34:56", "mtu": 1500}],
            "vsock": true, "labels": {"tenant": "a"}
        })
    }

    fn spec(v: Value) -> VmSpec {
        serde_json::from_value(v).expect("spec parses")
    }

    #[test]
    fn a_good_spec_passes_and_agent_defaults_to_vsock() {
        let s = spec(good());
        s.validate(&roots()).expect("valid");
        assert!(s.agent());
        assert_eq!(s.clone().normalized().agent, Some(true));
        let mut v = good();
        v["vsock"] = json!(false);
        assert!(!spec(v).agent());
        // Firmware instead of a kernel.
        let mut v = good();
        let o = v.as_object_mut().unwrap();
        for k in ["kernel", "initramfs", "cmdline"] {
            o.remove(k);
        }
        o.insert("firmware".into(), json!("/img/hypervisor-fw"));
        spec(v).validate(&roots()).expect("firmware spec");
    }

    /// One case per field: (mutation, field named in the error).
    #[test]
    fn each_bad_field_is_named() {
        let long_label = "x".repeat(MAX_LABEL_VALUE + 1);
        let many_labels: serde_json::Map<String, Value> =
            (0..=MAX_LABELS).map(|i| (format!("k{i}"), json!("v"))).collect();
        let cases: Vec<(&str, Value, &str)> = vec![
            ("id", json!("Web_1"), "id"),
            ("id", json!(""), "id"),
            ("vcpus", json!(0), "vcpus"),
            ("vcpus", json!(MAX_VCPUS + 1), "vcpus"),
            ("memory_mib", json!(0), "memory_mib"),
            ("memory_mib", json!(u64::from(MAX_MEMORY_MIB) + 1), "memory_mib"),
            ("kernel", json!("vmlinux"), "kernel"),
            ("kernel", json!("/elsewhere/vmlinux"), "kernel"),
            ("kernel", json!("/img"), "kernel"),
            ("kernel", json!("/img/../etc/shadow"), "kernel"),
            ("kernel", json!("/img/a,b"), "kernel"),
            ("kernel", json!("/img/a=b"), "kernel"),
            ("kernel", json!("/img/a\"b"), "kernel"),
            ("kernel", json!("/img/a\u{1}b"), "kernel"),
            ("initramfs", json!("/tmp/initrd"), "initramfs"),
            ("cmdline", json!("console=ttyS0\n"), "cmdline"),
            ("cmdline", json!("x".repeat(2048)), "cmdline"),
            ("firmware", json!("/img/fw"), "firmware"),
            ("disks", Value::Array(vec![json!({"path": "/srv/images/a", "readonly": true}); MAX_DISKS + 1]), "disks"),
            ("disks", json!([{"path": "/srv/images/ok"}, {"path": "/srv/imagesX/a"}]), "disks[1].path"),
            ("nets", json!([{}, {}, {}, {}, {}]), "nets"),
            ("nets", json!([{"mac": "52:54:00:12:34"}]), "nets[0].mac"),
            ("nets", json!([{"mac": "01:00:5e:00:00:01"}]), "nets[0].mac"),
            ("nets", json!([{"bridge": "a-bridge-name-too-long"}]), "nets[0].bridge"),
            ("nets", json!([{"mtu": 67}]), "nets[0].mtu"),
            ("nets", json!([{"mtu": 65536}]), "nets[0].mtu"),
            ("labels", Value::Object(many_labels), "labels"),
            ("labels", json!({"bad key": "v"}), "labels"),
            ("labels", json!({"k": long_label}), "labels.k"),
            ("labels", json!({"k": "a\u{7}"}), "labels.k"),
        ];
        for (key, value, field) in cases {
            let mut v = good();
            v[key] = value.clone();
            let e = spec(v).validate(&roots()).expect_err(&format!("{key} = {value} must be refused"));
            assert!(matches!(e, VmError::InvalidSpec { .. }), "{key}: {e}");
            assert!(e.to_string().contains(&format!("field `{field}`")), "{key} = {value}: {e}");
        }
        // Fields whose badness is a combination.
        let mut v = good();
        v["vsock"] = json!(false);
        v["agent"] = json!(true);
        let e = spec(v).validate(&roots()).unwrap_err();
        assert!(e.to_string().contains("field `agent`"), "{e}");
        let mut v = good();
        v.as_object_mut().unwrap().remove("kernel");
        let e = spec(v).validate(&roots()).unwrap_err();
        assert!(e.to_string().contains("field `kernel`"), "{e}");
        let mut v = good();
        v.as_object_mut().unwrap().remove("kernel");
        v.as_object_mut().unwrap().remove("initramfs");
        v["firmware"] = json!("/img/fw");
        let e = spec(v).validate(&roots()).unwrap_err();
        assert!(e.to_string().contains("field `cmdline`"), "{e}");
        // No image root at all refuses every path.
        let e = spec(good()).validate(&[]).unwrap_err();
        assert!(e.to_string().contains("no image root"), "{e}");
    }

    #[test]
    fn guest_init_s_words_count_against_the_cmdline_limit() {
        let mut v = good();
        v["nets"] = json!([{"mtu": 1400}, {}, {"mtu": 9000}]);
        assert_eq!(
            spec(v.clone()).boot_cmdline().as_deref(),
            Some("console=ttyS0 myhv.port=1024 myhv.mtu=eth0:1400,eth2:9000")
        );
        // The words fit exactly, then one byte more does not.
        let words = " myhv.port=1024 myhv.mtu=eth0:1400,eth2:9000".len();
        v["cmdline"] = json!("x".repeat(MAX_CMDLINE - words));
        spec(v.clone()).validate(&roots()).expect("fits exactly");
        v["cmdline"] = json!("x".repeat(MAX_CMDLINE - words + 1));
        let e = spec(v.clone()).validate(&roots()).unwrap_err();
        assert!(e.to_string().contains("field `cmdline`") && e.to_string().contains("guest-init"), "{e}");
        // Without the agent and MTUs nothing is appended, and firmware boots get nothing.
        v["agent"] = json!(false);
        v["nets"] = json!([]);
        spec(v.clone()).validate(&roots()).expect("nothing appended");
        assert_eq!(spec(v).boot_cmdline().map(|c| c.len()), Some(MAX_CMDLINE - words + 1));
        let mut v = good();
        for k in ["kernel", "initramfs", "cmdline"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v["firmware"] = json!("/img/fw");
        assert_eq!(spec(v).boot_cmdline(), None);
    }
}
