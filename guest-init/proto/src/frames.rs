//! The frames each side sends, and the checks on a request that both sides apply.

use serde::{Deserialize, Serialize};

use crate::{MAX_ARGS, MAX_ENV, MAX_OUTPUT_BYTES, PROTOCOL_VERSION, ProtoError};

/// The longest timeout a request may ask for: one day.
pub const MAX_TIMEOUT_SECS: u32 = 24 * 60 * 60;

/// Host to guest. The first frame on a stream is always [`HostFrame::Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostFrame {
    Hello {
        version: u32,
    },
    /// Answered by [`GuestFrame::Health`].
    Health,
    /// Start one command. With `stdin: true` the host then sends [`HostFrame::Stdin`] chunks
    /// and one [`HostFrame::StdinEnd`]; otherwise the command reads /dev/null.
    Exec(ExecRequest),
    Stdin(Vec<u8>),
    StdinEnd,
    /// Stop the running command: SIGTERM to its process group, then SIGKILL. The host sends
    /// it when its own timeout passes.
    Cancel,
}

/// Guest to host. The first frame on a stream is [`GuestFrame::Hello`], or
/// [`GuestFrame::Error`] when the host's version is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestFrame {
    Hello {
        version: u32,
    },
    Health {
        uptime_ms: u64,
        running: u32,
    },
    /// The command was spawned; its pid is also its process group.
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last frame of one exec.
    Exit(ExitSummary),
    /// The request was refused or could not run; the stream stays usable unless the refusal
    /// was of the hello.
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to an empty environment, in order.
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub timeout_secs: Option<u32>,
    /// Per stream; output past it is dropped and the stream's truncated flag set.
    pub max_output_bytes: Option<u64>,
    pub stdin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Exited,
    TimedOut,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitSummary {
    pub status: ExitStatus,
    pub outcome: Outcome,
    /// Bytes the command wrote to each stream, including any that were dropped.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration_ms: u64,
}

pub fn host_hello() -> HostFrame {
    HostFrame::Hello { version: PROTOCOL_VERSION }
}

pub fn guest_hello() -> GuestFrame {
    GuestFrame::Hello { version: PROTOCOL_VERSION }
}

/// A first frame that may be a hello.
pub trait Hello {
    /// `Ok(version)` for a hello, `Err` with why it is not one.
    fn hello_version(&self) -> Result<u32, ProtoError>;
}

impl Hello for HostFrame {
    fn hello_version(&self) -> Result<u32, ProtoError> {
        match self {
            HostFrame::Hello { version } => Ok(*version),
            other => Err(ProtoError::Unexpected { expected: "hello", got: frame_name_host(other) }),
        }
    }
}

impl Hello for GuestFrame {
    fn hello_version(&self) -> Result<u32, ProtoError> {
        match self {
            GuestFrame::Hello { version } => Ok(*version),
            GuestFrame::Error { message } => Err(ProtoError::Refused(message.clone())),
            other => Err(ProtoError::Unexpected { expected: "hello", got: frame_name_guest(other) }),
        }
    }
}

/// Checks the peer's first frame: a hello with our [`PROTOCOL_VERSION`].
pub fn check_hello(frame: &impl Hello) -> Result<(), ProtoError> {
    let theirs = frame.hello_version()?;
    if theirs != PROTOCOL_VERSION {
        return Err(ProtoError::VersionMismatch { ours: PROTOCOL_VERSION, theirs });
    }
    Ok(())
}

pub fn frame_name_host(f: &HostFrame) -> &'static str {
    match f {
        HostFrame::Hello { .. } => "hello",
        HostFrame::Health => "health",
        HostFrame::Exec(_) => "exec",
        HostFrame::Stdin(_) => "stdin",
        HostFrame::StdinEnd => "stdin-end",
        HostFrame::Cancel => "cancel",
    }
}

pub fn frame_name_guest(f: &GuestFrame) -> &'static str {
    match f {
        GuestFrame::Hello { .. } => "hello",
        GuestFrame::Health { .. } => "health",
        GuestFrame::Started { .. } => "started",
        GuestFrame::Stdout(_) => "stdout",
        GuestFrame::Stderr(_) => "stderr",
        GuestFrame::Exit(_) => "exit",
        GuestFrame::Error { .. } => "error",
    }
}

impl ExecRequest {
    /// A request for `argv` with every option at its default.
    pub fn new(argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            timeout_secs: None,
            max_output_bytes: None,
            stdin: false,
        }
    }

    /// The checks both sides apply before a request is sent or run.
    pub fn validate(&self) -> Result<(), ProtoError> {
        let bad = |why: String| Err(ProtoError::BadRequest(why));
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return bad("argv must name a program".into());
        }
        if self.argv.len() > MAX_ARGS {
            return bad(format!("argv has {} entries, the limit is {MAX_ARGS}", self.argv.len()));
        }
        if self.env.len() > MAX_ENV {
            return bad(format!("env has {} entries, the limit is {MAX_ENV}", self.env.len()));
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return bad("argv holds a NUL byte".into());
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return bad(format!("env name {k:?} is empty or holds '=' or NUL, or its value NUL"));
            }
        }
        if self.cwd.as_ref().is_some_and(|c| c.is_empty() || c.contains('\0')) {
            return bad("cwd is empty or holds a NUL byte".into());
        }
        if self.timeout_secs.is_some_and(|t| t == 0 || t > MAX_TIMEOUT_SECS) {
            return bad(format!("timeout_secs must be 1..={MAX_TIMEOUT_SECS}"));
        }
        if self.max_output_bytes.is_some_and(|m| m > MAX_OUTPUT_BYTES) {
            return bad(format!("max_output_bytes must be at most {MAX_OUTPUT_BYTES}"));
        }
        Ok(())
    }
}
