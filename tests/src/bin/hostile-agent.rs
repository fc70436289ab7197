//! A guest agent that misbehaves on purpose, for the tests of exec's host side. It listens
//! on a Unix socket (where the cloud-hypervisor test double forwards a vsock port) and
//! speaks the shared exec protocol, up to the point where its mode makes it misbehave:
//!
//! | mode | what it does |
//! |---|---|
//! | `stall` | accepts and never answers, not even the hello |
//! | `oversized` | answers the hello and health; answers an exec with a frame length far over the limit |
//! | `endless` | answers the hello and health; answers an exec with stdout chunks without end, whatever the request's `max_output_bytes` |
//! | `ignore-timeout` | answers the hello and health; starts an exec and then sends nothing until a cancel, which it records in `<socket>.cancelled` and answers with an exit |
//!
//! Usage: `hostile-agent SOCKET MODE`. Each connection has a thread of its own.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use my_hypervisor_exec_proto::{
    ExitStatus, ExitSummary, GuestFrame, HostFrame, MAX_CHUNK, Outcome, guest_hello, read_frame, write_frame,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Stall,
    Oversized,
    Endless,
    IgnoreTimeout,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, mode] = args.as_slice() else {
        eprintln!("usage: hostile-agent SOCKET stall|oversized|endless|ignore-timeout");
        std::process::exit(2);
    };
    let mode = match mode.as_str() {
        "stall" => Mode::Stall,
        "oversized" => Mode::Oversized,
        "endless" => Mode::Endless,
        "ignore-timeout" => Mode::IgnoreTimeout,
        other => {
            eprintln!("hostile-agent: unknown mode {other:?}");
            std::process::exit(2);
        }
    };
    let listener = UnixListener::bind(socket).unwrap_or_else(|e| {
        eprintln!("hostile-agent: bind {socket}: {e}");
        std::process::exit(1);
    });
    let marker = PathBuf::from(format!("{socket}.cancelled"));
    for stream in listener.incoming().flatten() {
        let marker = marker.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, mode, &marker) {
                eprintln!("hostile-agent: connection: {e}");
            }
        });
    }
}

fn serve(mut s: UnixStream, mode: Mode, marker: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    if mode == Mode::Stall {
        // Hold the stream open, unanswered, until the peer gives up.
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
        return Ok(());
    }
    let Some(HostFrame::Hello { .. }) = read_frame::<HostFrame>(&mut s)? else { return Ok(()) };
    write_frame(&mut s, &guest_hello())?;
    loop {
        let Some(frame) = read_frame::<HostFrame>(&mut s)? else { return Ok(()) };
        match frame {
            HostFrame::Health => write_frame(&mut s, &GuestFrame::Health { uptime_ms: 1, running: 0 })?,
            HostFrame::Exec(_) => {
                write_frame(&mut s, &GuestFrame::Started { pid: 42 })?;
                match mode {
                    Mode::Oversized => {
                        s.write_all(&u32::MAX.to_le_bytes())?;
                        s.write_all(&[0u8; 1024])?;
                    }
                    Mode::Endless => {
                        s.set_write_timeout(Some(Duration::from_secs(30)))?;
                        let chunk = GuestFrame::Stdout(vec![b'y'; MAX_CHUNK]);
                        while write_frame(&mut s, &chunk).is_ok() {}
                        return Ok(());
                    }
                    Mode::IgnoreTimeout => loop {
                        match read_frame::<HostFrame>(&mut s)? {
                            Some(HostFrame::Cancel) => {
                                std::fs::write(marker, b"cancel\n")?;
                                let exit = ExitSummary {
                                    status: ExitStatus::Signal(15),
                                    outcome: Outcome::Cancelled,
                                    stdout_bytes: 0,
                                    stderr_bytes: 0,
                                    stdout_truncated: false,
                                    stderr_truncated: false,
                                    duration_ms: 0,
                                };
                                write_frame(&mut s, &GuestFrame::Exit(exit))?;
                                break;
                            }
                            Some(_) => {}
                            None => return Ok(()),
                        }
                    },
                    Mode::Stall => return Ok(()),
                }
            }
            _ => {}
        }
    }
}
