//! The cloud-hypervisor binary, checked once at daemon start, before confinement (the broker
//! cannot exec once its filter is on): its path and every dir above it (`policy::ch_binary`),
//! then `--version`, run as the frontend's uid. A failed check does not stop the daemon: each
//! Spawn is refused with its reason.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use my_hypervisor_policy::ch_binary::{Node, VERSION_TIMEOUT_MS, check_chain, check_version, locate, parse_version};
use my_hypervisor_policy::layout::Ids;

/// The checked binary and its major version, or why it may run no VM.
pub type Checked = Result<(PathBuf, u32), String>;

pub fn check(configured: Option<&Path>, ids: Ids) -> Checked {
    let found = locate(configured, &std::env::var_os("PATH").unwrap_or_default(), Path::is_file);
    let ch = std::fs::canonicalize(found.map_err(|e| e.to_string())?).map_err(|e| format!("cloud-hypervisor: {e}"))?;
    let node = |p: &Path| {
        let m = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok::<_, String>((p.display().to_string(), Node { uid: m.uid(), mode: m.mode() }))
    };
    check_chain(&ch.ancestors().map(node).collect::<Result<Vec<_>, _>>()?).map_err(|e| e.to_string())?;
    let name = ch.display().to_string();
    let mut cmd = Command::new(&ch);
    cmd.arg("--version").env_clear().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.uid(ids.uid).gid(ids.gid).spawn().map_err(|e| format!("{name} --version: {e}"))?;
    let end = std::time::Instant::now() + std::time::Duration::from_millis(VERSION_TIMEOUT_MS);
    while child.try_wait().map_err(|e| format!("{name} --version: {e}"))?.is_none() {
        if std::time::Instant::now() > end {
            let _ = (child.kill(), child.wait());
            return Err(format!("{name} did not answer --version within {VERSION_TIMEOUT_MS} ms"));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().map_err(|e| format!("{name} --version: {e}"))?;
    let major = parse_version(&name, &String::from_utf8_lossy(&out.stdout))
        .and_then(|m| check_version(&name, m, false).map(|()| m));
    Ok((ch, major.map_err(|e| e.to_string())?))
}
