//! state.json: one file per VM under the state dir, plus the sequence high-water mark in a
//! file of its own. The formats are in docs/state-json.md.
//!
//! Every write is atomic: a temp file in the same dir, fsync, rename over the target, fsync
//! of the dir. Reads are bounded ([`MAX_STATE_FILE`]). A file that cannot be read or parsed is
//! renamed aside (`<id>.json.corrupt-<unix seconds>`) and reported, never fatal.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::fsm::VmState;
use super::spec::{DiskSpec, NetSpec, VmSpec};

/// The schema version this frontend writes.
pub const SCHEMA_VERSION: u32 = 2;
/// The largest state file read; anything bigger counts as corrupt.
pub const MAX_STATE_FILE: u64 = 4 * 1024 * 1024;
/// Name of the sequence high-water file in the state dir.
pub const SEQUENCE_FILE: &str = "sequence";
const FILE_MODE: u32 = 0o600;

/// One recorded transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub seq: u64,
    /// Wall-clock time, RFC 3339 UTC with milliseconds.
    pub at: String,
    /// `None` (null) for the transition create records: the VM did not exist before.
    pub from: Option<VmState>,
    pub to: VmState,
    pub reason: String,
}

/// A VM's state.json, schema version 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmFile {
    pub schema_version: u32,
    pub vm_id: String,
    pub state: VmState,
    /// `null` only for a VM whose earlier file was unreadable: it is kept, in state `failed`,
    /// until it is removed.
    pub spec: Option<VmSpec>,
    /// When create recorded the VM.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The VMM's pid while one is believed alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How far the VMM's event-monitor file has been read, so that a frontend restart
    /// resumes there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_offset: Option<u64>,
    /// The newest transitions, oldest first (at most the ring's capacity).
    pub history: VecDeque<Transition>,
}

/// Schema version 1: the spec's fields at the top level, the state in PascalCase, only the last
/// transition kept, and no `agent` field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFileV1 {
    #[allow(dead_code)]
    schema_version: u32,
    id: String,
    state: V1State,
    vcpus: u32,
    memory_mib: u64,
    #[serde(default)]
    kernel: Option<String>,
    #[serde(default)]
    initramfs: Option<String>,
    #[serde(default)]
    cmdline: Option<String>,
    #[serde(default)]
    firmware: Option<String>,
    #[serde(default)]
    disks: Vec<DiskSpec>,
    #[serde(default)]
    nets: Vec<NetSpec>,
    #[serde(default)]
    vsock: bool,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    created_at: String,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    last_transition: Option<V1Transition>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum V1State {
    Pending,
    Provisioning,
    Configured,
    Starting,
    Running,
    StartFailed,
    Stopping,
    Stopped,
    Failed,
}

impl From<V1State> for VmState {
    fn from(s: V1State) -> VmState {
        match s {
            V1State::Pending => VmState::Pending,
            V1State::Provisioning => VmState::Provisioning,
            V1State::Configured => VmState::Configured,
            V1State::Starting => VmState::Starting,
            V1State::Running => VmState::Running,
            V1State::StartFailed => VmState::StartFailed,
            V1State::Stopping => VmState::Stopping,
            V1State::Stopped => VmState::Stopped,
            V1State::Failed => VmState::Failed,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct V1Transition {
    seq: u64,
    /// Seconds since the Unix epoch.
    at_unix: u64,
    from: V1State,
    to: V1State,
    #[serde(default)]
    reason: String,
}

impl VmFileV1 {
    fn migrate(self) -> VmFile {
        let spec = VmSpec {
            id: self.id.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel,
            initramfs: self.initramfs,
            cmdline: self.cmdline,
            firmware: self.firmware,
            disks: self.disks,
            nets: self.nets,
            vsock: self.vsock,
            // v1 had no agent flag: it takes its default, the value of vsock.
            agent: None,
            labels: self.labels,
        }
        .normalized();
        let history = self
            .last_transition
            .map(|t| Transition {
                seq: t.seq,
                at: rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(t.at_unix)),
                from: Some(t.from.into()),
                to: t.to.into(),
                reason: t.reason,
            })
            .into_iter()
            .collect();
        VmFile {
            schema_version: SCHEMA_VERSION,
            vm_id: self.id,
            state: self.state.into(),
            spec: Some(spec),
            created_at: self.created_at,
            last_error: self.error,
            pid: self.pid,
            event_offset: None,
            history,
        }
    }
}

/// Why a state file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
    #[error("it is larger than {MAX_STATE_FILE} bytes")]
    TooBig,
    #[error("it is not valid JSON: {0}")]
    Json(String),
    #[error("schema_version {0} is not one this frontend reads (1 or 2)")]
    Version(u64),
    #[error("it does not match schema version {version}: {detail}")]
    Shape { version: u32, detail: String },
    #[error("it names VM {0:?}, not the VM of its file name")]
    WrongId(String),
}

/// What loading one VM's file gave.
#[derive(Debug)]
pub enum Loaded {
    /// The file, and whether it was migrated (and rewritten) from v1.
    Ok { file: Box<VmFile>, migrated: bool },
    /// The file was unusable; it was moved to `moved_to` (if the rename worked).
    Corrupt { vm_id: String, error: LoadError, moved_to: Option<PathBuf> },
}

/// The state dir.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn vm_path(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!("{vm_id}.json"))
    }

    /// Every VM file in the dir. v1 files are migrated and written back as v2. Leftover temp
    /// files from an interrupted write are removed; other names are ignored.
    pub fn load_all(&self) -> io::Result<Vec<Loaded>> {
        let mut out = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') && name.ends_with(".tmp") {
                tracing::info!(file = %name, "removing a temp file left by an interrupted write");
                let _ = fs::remove_file(entry.path());
                continue;
            }
            names.push(name);
        }
        names.sort();
        for name in names {
            let Some(vm_id) = name.strip_suffix(".json") else {
                continue;
            };
            if my_hypervisor_policy::check_vm_id(vm_id).is_err() {
                continue;
            }
            out.push(self.load_one(vm_id));
        }
        Ok(out)
    }

    fn load_one(&self, vm_id: &str) -> Loaded {
        let path = self.vm_path(vm_id);
        match read_vm_file(&path, vm_id) {
            Ok((file, migrated)) => {
                if migrated {
                    match self.write_vm(&file) {
                        Ok(()) => tracing::info!(vm = vm_id, "migrated state.json from schema 1 to 2"),
                        Err(e) => tracing::error!(vm = vm_id, error = %e, "cannot write migrated state.json"),
                    }
                }
                Loaded::Ok { file: Box::new(file), migrated }
            }
            Err(error) => {
                let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let aside = self.dir.join(format!("{vm_id}.json.corrupt-{secs}"));
                let moved_to = match fs::rename(&path, &aside) {
                    Ok(()) => {
                        let _ = sync_dir(&self.dir);
                        Some(aside)
                    }
                    Err(e) => {
                        tracing::error!(vm = vm_id, error = %e, "cannot move the unreadable state file aside");
                        None
                    }
                };
                tracing::error!(vm = vm_id, %error, moved_to = ?moved_to, "unreadable state file");
                Loaded::Corrupt { vm_id: vm_id.to_string(), error, moved_to }
            }
        }
    }

    pub fn write_vm(&self, file: &VmFile) -> io::Result<()> {
        atomic_write(&self.dir, &format!("{}.json", file.vm_id), &vm_bytes(file)?)
    }

    /// Writes several VM files, each atomically, with one fsync of the dir for all of them.
    /// One result per file, in order.
    pub fn write_vms(&self, files: &[&VmFile]) -> Vec<io::Result<()>> {
        let mut out: Vec<io::Result<()>> = files
            .iter()
            .map(|f| vm_bytes(f).and_then(|b| write_renamed(&self.dir, &format!("{}.json", f.vm_id), &b)))
            .collect();
        if out.iter().any(Result::is_ok)
            && let Err(e) = sync_dir(&self.dir)
        {
            let kind = e.kind();
            for r in out.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(io::Error::new(kind, format!("syncing the state dir: {e}")));
            }
        }
        out
    }

    pub fn remove_vm(&self, vm_id: &str) -> io::Result<()> {
        match fs::remove_file(self.vm_path(vm_id)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The persisted sequence high-water mark: no number above it has been handed out.
    /// `Ok(None)` when there is no file yet; an unreadable file is an error.
    pub fn read_sequence(&self) -> Result<Option<u64>, LoadError> {
        let path = self.dir.join(SEQUENCE_FILE);
        let bytes = match read_bounded(&path, 64) {
            Ok(b) => b,
            Err(LoadError::Io(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let text = String::from_utf8_lossy(&bytes);
        text.trim().parse::<u64>().map(Some).map_err(|e| LoadError::Json(format!("sequence {text:?}: {e}")))
    }

    pub fn write_sequence(&self, high_water: u64) -> io::Result<()> {
        atomic_write(&self.dir, SEQUENCE_FILE, format!("{high_water}\n").as_bytes())
    }
}

/// Reads and parses one VM file; returns it and whether it was v1.
pub fn read_vm_file(path: &Path, vm_id: &str) -> Result<(VmFile, bool), LoadError> {
    let bytes = read_bounded(path, MAX_STATE_FILE)?;
    let (file, migrated) = parse_vm_file(&bytes)?;
    if file.vm_id != vm_id || file.spec.as_ref().is_some_and(|s| s.id != vm_id) {
        return Err(LoadError::WrongId(file.vm_id));
    }
    Ok((file, migrated))
}

/// Parses a state file of either version; v1 is migrated to v2.
pub fn parse_vm_file(bytes: &[u8]) -> Result<(VmFile, bool), LoadError> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| LoadError::Json(e.to_string()))?;
    let version = v.get("schema_version").and_then(serde_json::Value::as_u64).unwrap_or(0);
    match version {
        1 => {
            let f: VmFileV1 =
                serde_json::from_value(v).map_err(|e| LoadError::Shape { version: 1, detail: e.to_string() })?;
            Ok((f.migrate(), true))
        }
        2 => {
            let f: VmFile =
                serde_json::from_value(v).map_err(|e| LoadError::Shape { version: 2, detail: e.to_string() })?;
            Ok((f, false))
        }
        other => Err(LoadError::Version(other)),
    }
}

/// Reads at most `max` bytes; a longer file is [`LoadError::TooBig`].
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, LoadError> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(LoadError::TooBig);
    }
    Ok(buf)
}

fn vm_bytes(file: &VmFile) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(file).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Writes `dir/name` atomically: `.name.tmp`, fsync, rename, fsync of the dir.
pub fn atomic_write(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_renamed(dir, name, bytes)?;
    sync_dir(dir)
}

/// `.name.tmp`, fsync, rename over `name`; the dir is not synced.
fn write_renamed(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dir.join(name))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2025-01-31T12:00:00.000Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_millis())
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(951_782_400_250)), "2000-02-29T00:00:00.250Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_735_689_599)), "2024-12-31T23:59:59.000Z");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        atomic_write(dir.path(), "a.json", b"one").unwrap();
        atomic_write(dir.path(), "a.json", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("a.json")).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["a.json"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("a.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn oversized_and_unknown_versions_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.json");
        fs::write(&p, vec![b' '; MAX_STATE_FILE as usize + 1]).unwrap();
        assert!(matches!(read_vm_file(&p, "big"), Err(LoadError::TooBig)));
        assert!(matches!(parse_vm_file(br#"{"schema_version": 3}"#), Err(LoadError::Version(3))));
        assert!(matches!(parse_vm_file(b"{"), Err(LoadError::Json(_))));
        assert!(matches!(
            parse_vm_file(br#"{"schema_version": 2, "vm_id": "a"}"#),
            Err(LoadError::Shape { version: 2, .. })
        ));
    }
}
