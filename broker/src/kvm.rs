//! The KVM check: /dev/kvm opens, speaks API version 12, and has what cloud-hypervisor needs.

use std::os::fd::AsRawFd;

use my_hypervisor_broker_proto::Reply;
use my_hypervisor_policy::vmm::{KVM_API_VERSION, KVM_CHECK_EXTENSION, KVM_EXTENSIONS, KVM_GET_API_VERSION};

pub fn check() -> Result<Reply, String> {
    let kvm =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").map_err(|e| format!("/dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Err(format!("KVM API version is {version}, expected {KVM_API_VERSION}"));
    }
    // SAFETY: KVM_CHECK_EXTENSION takes an integer capability number and returns an int.
    let has = |cap: u64| unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CHECK_EXTENSION, cap) } > 0;
    let extensions = KVM_EXTENSIONS.iter().map(|&(name, cap)| (name.to_string(), has(cap))).collect();
    Ok(Reply::Kvm { api_version: version, extensions })
}
