//! The event monitor: each event is a pretty-printed JSON object (serde_json's
//! `to_string_pretty` of CH's `Event` struct, fields in its order) followed by a blank line,
//! written by a thread of its own to a file opened O_NONBLOCK; write errors are ignored.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cli::Endpoint;

struct Monitor {
    start: Instant,
    tx: Mutex<Option<Sender<String>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();

/// Opens the monitor (a path is created or truncated; an fd is taken as is) and starts its
/// writer thread. Timestamps count from here.
pub fn open(endpoint: &Endpoint) -> std::io::Result<()> {
    let file = match endpoint {
        Endpoint::Path(p) => File::options().write(true).create(true).truncate(true).open(p)?,
        // SAFETY: the fd was handed to us on the command line to own, as CH does.
        Endpoint::Fd(fd) => unsafe { File::from_raw_fd(*fd) },
    };
    set_nonblocking(&file);
    let (tx, rx) = channel::<String>();
    let writer = std::thread::Builder::new().name("event-monitor".into()).spawn(move || write_loop(file, rx))?;
    let _ = MONITOR.set(Monitor { start: Instant::now(), tx: Mutex::new(Some(tx)), writer: Mutex::new(Some(writer)) });
    Ok(())
}

fn set_nonblocking(file: &File) {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

fn write_loop(mut file: File, rx: Receiver<String>) {
    while let Ok(event) = rx.recv() {
        let _ = file.write_all(event.as_bytes());
        let _ = file.write_all(b"\n\n");
    }
}

/// Emits one event; properties in the given order.
pub fn event(source: &str, event: &str, properties: &[(&str, &str)]) {
    let Some(m) = MONITOR.get() else { return };
    let text = render(m.start.elapsed(), source, event, properties);
    if let Some(tx) = m.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let _ = tx.send(text);
    }
}

/// Lets the writer drain what was sent, for at most a second; used before exiting unless
/// the `quiet-exit` fault asks for CH's race where the last events are lost.
pub fn flush() {
    let Some(m) = MONITOR.get() else { return };
    drop(m.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
    let Some(writer) = m.writer.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
    let end = Instant::now() + Duration::from_secs(1);
    while !writer.is_finished() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Stops sending events to the file: what was not written yet is lost.
pub fn silence() {
    if let Some(m) = MONITOR.get() {
        drop(m.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The exact text serde_json's pretty printer gives CH's `Event`.
pub fn render(t: Duration, source: &str, event: &str, properties: &[(&str, &str)]) -> String {
    let props = if properties.is_empty() {
        "null".to_string()
    } else {
        let items: Vec<String> = properties.iter().map(|(k, v)| format!("    {}: {}", quote(k), quote(v))).collect();
        format!("{{\n{}\n  }}", items.join(",\n"))
    };
    format!(
        "{{\n  \"timestamp\": {{\n    \"secs\": {},\n    \"nanos\": {}\n  }},\n  \"source\": {},\n  \"event\": {},\n  \"properties\": {}\n}}",
        t.as_secs(),
        t.subsec_nanos(),
        quote(source),
        quote(event),
        props
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_serde_pretty() {
        let t = std::time::Duration::new(1, 5);
        let ours = super::render(t, "guest", "panic", &[("event", "panic")]);
        let theirs = serde_json::to_string_pretty(&serde_json::json!({
            "timestamp": {"secs": 1, "nanos": 5}, "source": "guest", "event": "panic",
            "properties": {"event": "panic"}
        }))
        .unwrap();
        // serde_json sorts object keys here; compare as values and check our field order.
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&ours).unwrap(),
            serde_json::from_str::<serde_json::Value>(&theirs).unwrap()
        );
        assert!(ours.find("timestamp").unwrap() < ours.find("source").unwrap());
    }
}
