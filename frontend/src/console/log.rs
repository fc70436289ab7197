//! The per-VM serial log: `<log-dir>/<vm-id>.log`, capped at a size, with one rotation to
//! `<vm-id>.log.1`. Replay and `compute.vm.logs` read its tail across both files.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The smallest size a log file may be capped at: one read of the serial port always fits.
pub const MIN_LOG_BYTES: u64 = 4096;

/// The current log file of a VM and its one rotation.
pub fn paths(dir: &Path, vm_id: &str) -> [PathBuf; 2] {
    [dir.join(format!("{vm_id}.log")), dir.join(format!("{vm_id}.log.1"))]
}

/// Appends serial output, rotating once the current file would pass `max` bytes.
pub struct SerialLog {
    paths: [PathBuf; 2],
    file: Option<File>,
    size: u64,
    max: u64,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

impl SerialLog {
    /// Opens (or creates) the VM's log; output after a frontend restart goes on where it was.
    pub fn open(dir: &Path, vm_id: &str, max: u64) -> io::Result<SerialLog> {
        let paths = paths(dir, vm_id);
        let file = open_append(&paths[0])?;
        let size = file.metadata()?.len();
        Ok(SerialLog { paths, file: Some(file), size, max: max.max(MIN_LOG_BYTES) })
    }

    /// Appends `data` (at most [`MIN_LOG_BYTES`] is written at a time by the caller, but any
    /// size is accepted: a chunk larger than the cap starts a file of its own).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + data.len() as u64 > self.max {
            self.file = None;
            std::fs::rename(&self.paths[0], &self.paths[1])?;
            self.size = 0;
        }
        if self.file.is_none() {
            let f = OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&self.paths[0])?;
            self.file = Some(f);
        }
        if let Some(f) = &mut self.file {
            f.write_all(data)?;
            self.size += data.len() as u64;
        }
        Ok(())
    }
}

/// The last `max` bytes of the log (older file first), and whether more output was kept
/// than returned.
pub fn tail(dir: &Path, vm_id: &str, max: u64) -> io::Result<(Vec<u8>, bool)> {
    let [current, old] = paths(dir, vm_id);
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut left = max;
    let mut truncated = false;
    for path in [current, old] {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let (data, more) = file_tail(&file, left)?;
        left -= data.len() as u64;
        truncated |= more;
        parts.push(data);
    }
    parts.reverse();
    Ok((parts.concat(), truncated))
}

/// The last `max` bytes of an open file, and whether it holds more.
pub fn file_tail(file: &File, max: u64) -> io::Result<(Vec<u8>, bool)> {
    let size = file.metadata()?.len();
    let start = size.saturating_sub(max);
    let mut buf = vec![0u8; (size - start) as usize];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], start + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok((buf, start > 0))
}

/// Deletes a VM's log files (when the VM is removed).
pub fn remove(dir: &Path, vm_id: &str) {
    for p in paths(dir, vm_id) {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_once_and_tails_across_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SerialLog::open(dir.path(), "a", 4096).unwrap();
        let chunk: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut all: Vec<u8> = Vec::new();
        for _ in 0..13 {
            log.write(&chunk).unwrap();
            all.extend(&chunk);
        }
        let [cur, old] = paths(dir.path(), "a");
        let (c, o) = (std::fs::metadata(&cur).unwrap().len(), std::fs::metadata(&old).unwrap().len());
        assert!(c <= 4096 && o <= 4096, "{c} {o}");
        // 13 writes of 1000 into files of at most 4 writes: 4 + 4 rotated away, 4 in .1, 1 now.
        assert_eq!((o, c), (4000, 1000));
        let (t, truncated) = tail(dir.path(), "a", 2500).unwrap();
        assert_eq!(t, all[all.len() - 2500..]);
        assert!(truncated);
        let (t, truncated) = tail(dir.path(), "a", 1 << 20).unwrap();
        assert_eq!(t, all[all.len() - 5000..]);
        assert!(!truncated);
        // Reopened after a restart, it appends.
        drop(log);
        let mut log = SerialLog::open(dir.path(), "a", 4096).unwrap();
        log.write(b"xyz").unwrap();
        assert_eq!(std::fs::metadata(&cur).unwrap().len(), 1003);
        remove(dir.path(), "a");
        assert!(!cur.exists() && !old.exists());
        assert_eq!(tail(dir.path(), "a", 10).unwrap(), (vec![], false));
    }

    #[test]
    fn a_chunk_larger_than_the_cap_gets_a_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SerialLog::open(dir.path(), "b", 1).unwrap();
        log.write(b"a").unwrap();
        log.write(&[7u8; 5000]).unwrap();
        let [cur, old] = paths(dir.path(), "b");
        assert_eq!(std::fs::read(&old).unwrap(), b"a");
        assert_eq!(std::fs::metadata(&cur).unwrap().len(), 5000);
    }
}
