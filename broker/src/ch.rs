//! The cloud-hypervisor binary, checked once at daemon start, before confinement (the broker
//! cannot exec once its filter is on): its path and every dir above it (`policy::ch_binary`),
//! then `--version`, run as the frontend's uid. A failed check does not stop the daemon: each
//! Spawn is refused with its reason.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use my_hypervisor_policy::ch_binary::{Node, VERSION_TIMEOUT_MS, check_chain, check_version, parse_version};
use my_hypervisor_policy::layout::Ids;

use crate::table::Refusal;

/// The checked binary and its major version, or why it may run no VM.
pub type Checked = Result<(PathBuf, u32), String>;

pub fn check(configured: Option<&Path>, ids: Ids) -> Checked {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = match configured {
        Some(p) if p.is_file() => Ok(p.to_path_buf()),
        Some(p) => Err(Refusal::NoCloudHypervisorAt(p.display().to_string())),
        None => std::env::split_paths(&path)
            .map(|d| d.join("cloud-hypervisor"))
            .find(|p| p.is_file())
            .ok_or(Refusal::NoCloudHypervisor),
    };
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
    let end = Instant::now() + Duration::from_millis(VERSION_TIMEOUT_MS);
    while child.try_wait().map_err(|e| format!("{name} --version: {e}"))?.is_none() {
        if Instant::now() > end {
            let _ = (child.kill(), child.wait());
            return Err(format!("{name} did not answer --version within {VERSION_TIMEOUT_MS} ms"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    let _ = child.stdout.take().map(|s| s.take(4096).read_to_string(&mut out));
    let major = parse_version(&name, &out).and_then(|m| check_version(&name, m, false).map(|()| m));
    Ok((ch, major.map_err(|e| e.to_string())?))
}
