//! guest-init's part of the kernel command line: the frontend appends `myhv.port=<port>`
//! (when the VM runs the agent) and `myhv.mtu=eth<i>:<mtu>,...` (for each NIC with an MTU in
//! the spec) to the spec's cmdline at start. The guest names its NICs `eth0`, `eth1`, ... in
//! the order of the spec's `nets` (guest-init runs no udev). The whole line must stay within
//! cloud-hypervisor's limit, which [`crate::vm::VmSpec::validate`] checks at create.

use my_hypervisor_exec_proto::DEFAULT_VSOCK_PORT;

/// The command line the VM boots with: the spec's, then guest-init's words. `None` when both
/// are empty.
pub fn guest_cmdline(
    cmdline: Option<&str>,
    agent: bool,
    mtus: impl IntoIterator<Item = Option<u32>>,
) -> Option<String> {
    let mut words: Vec<String> = cmdline.filter(|c| !c.trim().is_empty()).map(str::to_string).into_iter().collect();
    if agent {
        words.push(format!("myhv.port={DEFAULT_VSOCK_PORT}"));
    }
    let mtus: Vec<String> =
        mtus.into_iter().enumerate().filter_map(|(i, m)| m.map(|m| format!("eth{i}:{m}"))).collect();
    if !mtus.is_empty() {
        words.push(format!("myhv.mtu={}", mtus.join(",")));
    }
    (!words.is_empty()).then(|| words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_appended_after_the_spec_s_own() {
        assert_eq!(guest_cmdline(None, false, []), None);
        assert_eq!(guest_cmdline(Some("console=ttyS0"), false, [None]).as_deref(), Some("console=ttyS0"));
        assert_eq!(
            guest_cmdline(Some("console=ttyS0"), true, [Some(1400), None, Some(9000)]).as_deref(),
            Some("console=ttyS0 myhv.port=1024 myhv.mtu=eth0:1400,eth2:9000")
        );
        assert_eq!(guest_cmdline(None, true, []).as_deref(), Some("myhv.port=1024"));
    }
}
