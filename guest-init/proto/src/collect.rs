//! The host's side of one exec: collects the guest's frames into a result, keeping at most
//! the requested output per stream whatever the guest sends.

use crate::frames::frame_name_guest;
use crate::{ExitStatus, GuestFrame, Outcome, ProtoError};

/// What the host returns for an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub pid: Option<u32>,
    pub status: ExitStatus,
    pub outcome: Outcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output was dropped, by the guest or by this collector.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// What the guest says the command wrote, dropped bytes included.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub duration_ms: u64,
}

#[derive(Debug)]
pub struct ExecCollector {
    limit: usize,
    pid: Option<u32>,
    out: (Vec<u8>, bool),
    err: (Vec<u8>, bool),
}

impl ExecCollector {
    /// `max_output_bytes` per stream: the request's, so a guest that ignores it gains nothing.
    pub fn new(max_output_bytes: u64) -> Self {
        let limit = usize::try_from(max_output_bytes).unwrap_or(usize::MAX);
        ExecCollector { limit, pid: None, out: (Vec::new(), false), err: (Vec::new(), false) }
    }

    /// Feeds one frame; `Ok(Some(result))` on the exit frame, which ends the exec.
    pub fn push(&mut self, frame: GuestFrame) -> Result<Option<ExecResult>, ProtoError> {
        let limit = self.limit;
        let keep = |(buf, truncated): &mut (Vec<u8>, bool), data: &[u8]| {
            let room = limit.saturating_sub(buf.len());
            if data.len() > room {
                *truncated = true;
            }
            buf.extend_from_slice(&data[..data.len().min(room)]);
        };
        match frame {
            GuestFrame::Started { pid } if self.pid.is_none() => self.pid = Some(pid),
            GuestFrame::Stdout(d) => keep(&mut self.out, &d),
            GuestFrame::Stderr(d) => keep(&mut self.err, &d),
            GuestFrame::Exit(s) => {
                return Ok(Some(ExecResult {
                    pid: self.pid,
                    status: s.status,
                    outcome: s.outcome,
                    stdout: std::mem::take(&mut self.out.0),
                    stderr: std::mem::take(&mut self.err.0),
                    stdout_truncated: self.out.1 || s.stdout_truncated,
                    stderr_truncated: self.err.1 || s.stderr_truncated,
                    stdout_bytes: s.stdout_bytes,
                    stderr_bytes: s.stderr_bytes,
                    duration_ms: s.duration_ms,
                }));
            }
            GuestFrame::Error { message } => return Err(ProtoError::Refused(message)),
            other => {
                let got = frame_name_guest(&other);
                return Err(ProtoError::Unexpected { expected: "exec output", got });
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExitSummary;

    fn exit() -> GuestFrame {
        GuestFrame::Exit(ExitSummary {
            status: ExitStatus::Code(3),
            outcome: Outcome::Exited,
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 5,
        })
    }

    #[test]
    fn output_past_the_limit_is_dropped_even_if_the_guest_sends_it() {
        let mut c = ExecCollector::new(4);
        assert!(c.push(GuestFrame::Started { pid: 9 }).unwrap().is_none());
        c.push(GuestFrame::Stdout(b"abc".to_vec())).unwrap();
        c.push(GuestFrame::Stdout(b"defgh".to_vec())).unwrap();
        c.push(GuestFrame::Stderr(b"e".to_vec())).unwrap();
        let r = c.push(exit()).unwrap().unwrap();
        assert_eq!((r.stdout.as_slice(), r.stderr.as_slice()), (&b"abcd"[..], &b"e"[..]));
        assert!(r.stdout_truncated && !r.stderr_truncated);
        assert_eq!((r.pid, r.status), (Some(9), ExitStatus::Code(3)));
    }

    #[test]
    fn an_error_or_a_stray_frame_ends_the_exec_with_an_error() {
        let mut c = ExecCollector::new(10);
        let e = c.push(GuestFrame::Error { message: "cannot run".into() }).unwrap_err();
        assert!(matches!(e, ProtoError::Refused(m) if m == "cannot run"));
        let e = c.push(GuestFrame::Hello { version: 1 }).unwrap_err();
        assert!(e.to_string().contains("got hello"), "{e}");
    }
}
