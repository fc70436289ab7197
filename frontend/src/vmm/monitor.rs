//! cloud-hypervisor's event-monitor file: pretty-printed JSON objects separated by blank
//! lines (not one per line), appended by the VMM through the fd the broker opened. The
//! frontend reads it through its own read-only fd from a stored offset, so a restart resumes
//! where it stopped. Timestamps count from the VMM's start.

use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

/// The most the frontend reads of one VMM's event file: the bound at which the driver kills
/// a VMM for writing too much ([`super::driver::MAX_VMM_OUTPUT`]).
pub const MAX_EVENT_FILE: u64 = 64 * 1024 * 1024;
/// Read this much at a time.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: u64,
    pub nanos: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmEvent {
    pub timestamp: Timestamp,
    pub source: String,
    pub event: String,
    #[serde(default)]
    pub properties: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Reads the complete events after `offset`, about `budget` bytes of them (a chunk more at
/// most); returns them and the offset just past the last one. A value cut short (the VMM is
/// still writing it) is left for the next read; bytes that are not an event are skipped up to
/// the next blank line.
pub fn read_from(file: &std::fs::File, mut offset: u64, budget: u64) -> std::io::Result<(Vec<VmmEvent>, u64)> {
    let mut events = Vec::new();
    let start = offset;
    while offset < MAX_EVENT_FILE && offset - start < budget {
        let mut buf = vec![0u8; CHUNK.min((MAX_EVENT_FILE - offset) as usize)];
        let n = file.read_at(&mut buf, offset)?;
        // A whole chunk with no complete event and no separator is no event: skip it, so
        // that a VMM cannot stop the reading for good.
        let used = match parse(&buf[..n], &mut events) {
            0 if n == buf.len() => n,
            used => used,
        };
        offset += used as u64;
        if used == 0 || n < buf.len() {
            break;
        }
    }
    Ok((events, offset))
}

/// Parses the complete events at the front of `buf`; returns the bytes consumed.
fn parse(buf: &[u8], events: &mut Vec<VmmEvent>) -> usize {
    let mut used = 0;
    while used < buf.len() {
        let mut stream = serde_json::Deserializer::from_slice(&buf[used..]).into_iter::<VmmEvent>();
        match stream.next() {
            Some(Ok(ev)) => {
                events.push(ev);
                used += stream.byte_offset();
            }
            None => used = buf.len(),
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(_)) => match buf[used..].windows(2).position(|w| w == b"\n\n") {
                Some(p) => used += p + 2,
                None => break,
            },
        }
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The way cloud-hypervisor writes an event: serde_json pretty, then a blank line.
    fn ch_event(secs: u64, source: &str, event: &str) -> String {
        let v = serde_json::json!({"timestamp": {"secs": secs, "nanos": 5}, "source": source, "event": event, "properties": null});
        format!("{}\n\n", serde_json::to_string_pretty(&v).unwrap())
    }

    #[test]
    fn resumes_from_offsets_and_waits_for_partial_events() {
        let mut f = tempfile::tempfile().unwrap();
        let first = ch_event(0, "vmm", "starting") + &ch_event(0, "vm", "booting");
        let booted = ch_event(1, "vm", "booted");
        f.write_all(first.as_bytes()).unwrap();
        f.write_all(&booted.as_bytes()[..20]).unwrap();
        let (evs, off) = read_from(&f, 0, u64::MAX).unwrap();
        assert_eq!(evs.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(), ["starting", "booting"]);
        assert!(off as usize <= first.len());
        f.write_all(&booted.as_bytes()[20..]).unwrap();
        f.write_all(b"garbage that is not json\n\n").unwrap();
        f.write_all(
            br#"{"timestamp":{"secs":2,"nanos":0},"source":"guest","event":"panic","properties":{"event":"panic"}}"#,
        )
        .unwrap();
        let (evs, off2) = read_from(&f, off, u64::MAX).unwrap();
        assert_eq!(
            evs.iter().map(|e| (e.source.as_str(), e.event.as_str())).collect::<Vec<_>>(),
            [("vm", "booted"), ("guest", "panic")]
        );
        assert_eq!(read_from(&f, off2, u64::MAX).unwrap().0, vec![]);
    }

    #[test]
    fn a_chunk_of_junk_is_skipped() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![b'x'; CHUNK + 10]).unwrap();
        f.write_all(b"\n\n").unwrap();
        f.write_all(ch_event(3, "guest", "panic").as_bytes()).unwrap();
        let (evs, _) = read_from(&f, 0, u64::MAX).unwrap();
        assert_eq!(evs.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(), ["panic"]);
    }

    #[test]
    fn a_budget_reads_a_flood_in_steps() {
        let mut f = tempfile::tempfile().unwrap();
        let one = ch_event(0, "vm", "rebooted");
        let n = 4 * CHUNK / one.len();
        for _ in 0..n {
            f.write_all(one.as_bytes()).unwrap();
        }
        let (mut total, mut off, mut steps) = (0, 0, 0);
        loop {
            let (evs, next) = read_from(&f, off, CHUNK as u64).unwrap();
            assert!(next - off <= 2 * CHUNK as u64, "a step reads about its budget");
            if evs.is_empty() {
                break;
            }
            (total, off, steps) = (total + evs.len(), next, steps + 1);
        }
        assert_eq!(total, n, "every event once");
        assert!(steps >= 2, "{steps} steps: the budget bounds each read");
    }

    #[test]
    fn reads_across_chunks() {
        let mut f = tempfile::tempfile().unwrap();
        let n = 2 * CHUNK / ch_event(0, "vm", "rebooted").len() + 3;
        for i in 0..n {
            f.write_all(ch_event(i as u64, "vm", "rebooted").as_bytes()).unwrap();
        }
        let (evs, _) = read_from(&f, 0, u64::MAX).unwrap();
        assert_eq!(evs.len(), n);
        assert_eq!(evs.last().unwrap().timestamp.secs, n as u64 - 1);
    }
}
