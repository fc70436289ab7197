//! A VMM's sandbox in a few lines, for `compute.vm.status`: what was planned (taken from the
//! report the broker stored at spawn, [`crate::sandbox::SandboxSpec::report`]) and what the
//! kernel shows applied to the live process (its `/proc/<pid>/status`, read by the broker).
//! Pure text in, text out.

/// Most bytes of a stored report the broker hands out: a reply must fit one datagram
/// (`my_hypervisor_broker_proto::MAX_MESSAGE`).
pub const MAX_REPORT: usize = 64 * 1024;
/// Most bytes of a `/proc/<pid>/status` the broker reads.
pub const MAX_STATUS: usize = 16 * 1024;

// A reply fits one datagram (the applied lines are about as long as the status they come from).
const _: () = assert!(MAX_REPORT + 2 * MAX_STATUS < my_hypervisor_broker_proto::MAX_MESSAGE);

/// The stored report is trusted only as a regular file owned by root with one link: the VM
/// uid, which owns the run dir, can make none of those (no hard link to a root file either).
pub fn check_report_node(name: &str, st_mode: u32, st_uid: u32, st_nlink: u64) -> Result<(), String> {
    if st_mode & libc::S_IFMT != libc::S_IFREG || st_uid != 0 || st_nlink != 1 {
        return Err(format!("{name} is not the broker's own file"));
    }
    Ok(())
}

/// The planned summary: uid, capabilities, no_new_privs, the namespaces, the Landlock ABI
/// and mode, and the seccomp default action, one line each, from the stored report.
pub fn planned(report: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut section = "";
    for line in report.lines() {
        if let Some(s) = line.strip_prefix('[') {
            section = s.split(']').next().unwrap_or("");
        }
        let wanted = match section {
            "identity" => {
                line.starts_with("uid ") || line.starts_with("capabilities:") || line.starts_with("no_new_privs:")
            }
            "namespaces" => ["pid:", "ipc, uts:", "mount:", "network:"].iter().any(|p| line.starts_with(p)),
            "landlock" | "seccomp" => line.starts_with('['),
            _ => false,
        };
        if wanted {
            let l = line.strip_prefix("[landlock] ").map(|r| format!("landlock: {r}"));
            let l = l.or_else(|| line.strip_prefix("[seccomp] ").map(|r| format!("seccomp: {r}")));
            out.push(l.unwrap_or_else(|| line.to_string()));
        }
    }
    out
}

/// The applied summary from the live VMM's `/proc/<pid>/status`: uids, capability sets,
/// no_new_privs, the seccomp mode and filter count, and the PID namespace nesting (NSpid).
/// Landlock leaves no trace there; the launcher applies it before exec or stops the start.
pub fn applied(status: &str) -> Vec<String> {
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':'))).map(str::trim);
    let mut out = Vec::new();
    if let Some(uid) = field("Uid") {
        out.push(format!("uid (real, effective, saved, fs): {}", uid.split_whitespace().collect::<Vec<_>>().join(" ")));
    }
    let caps: Vec<String> = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
        .iter()
        .filter_map(|c| Some(format!("{c} {}", field(c)?)))
        .collect();
    if !caps.is_empty() {
        out.push(format!("capabilities: {}", caps.join(", ")));
    }
    if let Some(n) = field("NoNewPrivs") {
        out.push(format!("no_new_privs: {n}"));
    }
    if let Some(mode) = field("Seccomp") {
        let name = match mode {
            "0" => "disabled",
            "1" => "strict",
            "2" => "filter",
            _ => "unknown",
        };
        let filters = field("Seccomp_filters").map_or(String::new(), |f| format!(", {f} filters"));
        out.push(format!("seccomp: mode {mode} ({name}){filters}"));
    }
    if let Some(ns) = field("NSpid") {
        let ns = ns.split_whitespace().collect::<Vec<_>>().join(" ");
        let levels = ns.split(' ').count();
        let own = if levels > 1 { "own PID namespace" } else { "host PID namespace" };
        out.push(format!("pid namespace: {own} (NSpid {ns})"));
    }
    out.push("landlock: not visible in /proc; the launcher applies it before exec, or the VMM is not started".into());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_root_owned_regular_file_with_one_link_is_a_report() {
        assert_eq!(check_report_node("r", libc::S_IFREG | 0o600, 0, 1), Ok(()));
        let refused = Err("r is not the broker's own file".to_string());
        assert_eq!(check_report_node("r", libc::S_IFREG | 0o600, 63500, 1), refused);
        assert_eq!(check_report_node("r", libc::S_IFREG | 0o600, 0, 2), refused);
        assert_eq!(check_report_node("r", libc::S_IFIFO | 0o600, 0, 1), refused);
        assert_eq!(check_report_node("r", libc::S_IFLNK | 0o777, 0, 1), refused);
    }

    #[test]
    fn applied_reads_the_kernel_fields() {
        let status = "Name:\tcloud-hyperviso\nUid:\t63201\t63201\t63201\t63201\nNSpid:\t4242\t1\n\
                      CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
                      CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n\
                      Seccomp_filters:\t2\n";
        let a = applied(status);
        assert_eq!(a[0], "uid (real, effective, saved, fs): 63201 63201 63201 63201");
        assert!(a[1].starts_with("capabilities: CapInh 0000000000000000,") && a[1].contains("CapEff 0000000000000000"));
        assert_eq!(a[2], "no_new_privs: 1");
        assert_eq!(a[3], "seccomp: mode 2 (filter), 2 filters");
        assert_eq!(a[4], "pid namespace: own PID namespace (NSpid 4242 1)");
        assert!(a[5].starts_with("landlock:"));
        // Garbage gives no invented fields.
        assert_eq!(applied("nonsense\n").len(), 1);
    }

    #[test]
    fn planned_picks_the_key_lines_of_a_report() {
        // The shape `SandboxSpec::report` writes (the daemon tests read a real one).
        let report = "sandbox of VM a\n\n[identity]\nuid 63201 gid 63201, no supplementary groups\n\
                      capabilities: all empty\nno_new_privs: set\n\n[namespaces]\npid: new\nipc, uts: new\n\
                      mount: new\nnetwork: new and empty\n/dev: fresh tmpfs\n/proc: absent\n\n\
                      [landlock] ABI 6 (hard requirement); everything else denied\n/x: ReadFile\n\
                      network: TCP bind and connect denied\n\n[seccomp] default action: KillProcess\nallow read\n";
        let p = planned(report);
        assert_eq!(
            p,
            [
                "uid 63201 gid 63201, no supplementary groups",
                "capabilities: all empty",
                "no_new_privs: set",
                "pid: new",
                "ipc, uts: new",
                "mount: new",
                "network: new and empty",
                "landlock: ABI 6 (hard requirement); everything else denied",
                "seccomp: default action: KillProcess",
            ]
        );
    }
}
