//! The systemd unit shipped in dist/: `systemd-analyze verify` accepts it, it keeps exactly
//! the capabilities the broker and the spawn helper keep, and docs/operations.md states the
//! exposure `systemd-analyze security --offline=yes` reports for it.

use std::path::{Path, PathBuf};
use std::process::Command;

use my_hypervisor_policy::privileges::{BROKER_CAPS, SPAWNER_CAPS};
use my_hypervisor_tests::bin;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn unit_text() -> String {
    std::fs::read_to_string(repo("dist/my_hypervisor.service")).expect("dist/my_hypervisor.service")
}

fn setting<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines().filter_map(|l| l.strip_prefix(key)?.strip_prefix('=')).collect()
}

/// The unit with ExecStart pointing at the built daemon, so that verify finds it.
fn staged_unit(dir: &Path) -> PathBuf {
    let daemon = bin("my_hypervisor-daemon");
    let text = unit_text().replace("/usr/local/bin/my_hypervisor-daemon", daemon.to_str().unwrap());
    let p = dir.join("my_hypervisor.service");
    std::fs::write(&p, text).expect("write unit");
    p
}

fn systemd_analyze(test: &str) -> bool {
    let found = Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIP {test}: systemd-analyze is not installed");
    }
    found
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !systemd_analyze("the_unit_passes_systemd_analyze_verify") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(staged_unit(dir.path())).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {err}");
}

#[test]
fn the_unit_is_notify_keeps_vmms_on_stop_and_bounds_capabilities_to_the_daemons() {
    let unit = unit_text();
    assert_eq!(setting(&unit, "Type"), ["notify"]);
    assert_eq!(setting(&unit, "KillMode"), ["process"], "stopping the unit must not kill the VMMs");
    let mut want: Vec<String> = BROKER_CAPS.iter().chain(SPAWNER_CAPS).map(|c| c.to_string()).collect();
    want.sort();
    want.dedup();
    let bounding = setting(&unit, "CapabilityBoundingSet");
    assert_eq!(bounding.len(), 1, "one CapabilityBoundingSet line");
    let mut got: Vec<String> = bounding[0].split_whitespace().map(str::to_string).collect();
    got.sort();
    assert_eq!(got, want, "the unit's bounding set is what the broker and spawn helper keep");
    // systemd's settings that would break the daemon (docs/operations.md says why).
    for (key, why) in [
        ("RestrictNamespaces", "blocks the VMM's namespaces"),
        ("ProtectProc", "hides the VMMs from the broker"),
        ("ProtectHostname", "blocks the VMM's sethostname"),
        ("PrivateNetwork", "taps live in the host's network namespace"),
        ("MemoryDenyWriteExecute", "inherited by every VMM"),
        ("ProtectSystem", "a mount namespace hides the run dir's tmpfs mounts from a restarted daemon"),
        ("PrivateTmp", "a mount namespace hides the run dir's tmpfs mounts from a restarted daemon"),
    ] {
        assert!(setting(&unit, key).is_empty(), "{key}: {why}");
    }
    for dev in ["/dev/kvm rwm", "/dev/net/tun rw"] {
        assert!(setting(&unit, "DeviceAllow").contains(&dev), "DeviceAllow={dev}");
    }
}

#[test]
fn the_docs_state_the_units_exposure() {
    if !systemd_analyze("the_docs_state_the_units_exposure") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(staged_unit(dir.path()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    let score = line.split(": ").nth(1).and_then(|s| s.split_whitespace().next()).expect("a score");
    let docs = std::fs::read_to_string(repo("docs/operations.md")).expect("docs/operations.md");
    assert!(docs.contains(&format!("exposure level {score}")), "docs/operations.md must state exposure level {score}");
}
