//! One connection to guest-init: `CONNECT <port>` on the hybrid-vsock stream the broker
//! connected, the hello, then health requests and execs. Every wait is bounded, and so is
//! what a guest can make the frontend hold: frames by the protocol's decoder, output by the
//! request's `max_output_bytes` (a guest that sends more than it was asked for is dropped).

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use my_hypervisor_exec_proto::{
    ExecCollector, ExecRequest, ExecResult, FrameDecoder, GuestFrame, HostFrame, MAX_CHUNK, MAX_FRAME_LEN,
    MAX_STDIN_BYTES, Outcome, ProtoError, check_hello, encode, host_hello,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{Instant, timeout_at};

/// How long the muxer may take to answer `CONNECT`.
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long the guest may take to answer the hello, and a health request.
pub const HELLO_WAIT: Duration = Duration::from_secs(5);
/// The longest answer to `CONNECT` read: `OK <u32>\n` is at most 14 bytes.
const MAX_CONNECT_LINE: usize = 64;
/// After the command's own timeout, how long the host waits for the exit before it cancels.
pub const EXEC_MARGIN: Duration = Duration::from_secs(5);
/// After a cancel, how long the host waits for the exit before it gives up on the connection.
pub const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// A command's timeout when the request gives none.
pub const DEFAULT_TIMEOUT_SECS: u32 = 60;

/// What went wrong, in the terms a caller answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecErrorKind {
    /// No agent answered, or it broke the protocol: nothing was run, or what ran is lost.
    Unreachable,
    /// The agent refused the request or could not run the command.
    Refused,
    /// The command did not finish within its timeout; it was killed.
    TimedOut,
    /// The request itself is invalid.
    BadRequest,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("nothing listens on vsock port {port} in the guest (the stream closed before OK)")]
    NoListener { port: u32 },
    #[error("the vsock muxer answered CONNECT with {0:?}, not OK <port>")]
    BadConnect(String),
    #[error("no {what} from the guest agent within {after:?}")]
    Stalled { what: &'static str, after: Duration },
    #[error("vsock stream I/O")]
    Io(#[source] io::Error),
    #[error("the guest agent closed the stream before {0}")]
    Closed(&'static str),
    #[error("the guest agent broke the exec protocol")]
    Proto(#[source] ProtoError),
    #[error("the guest agent sent {got} bytes of {stream}, more than the {limit} asked for")]
    Flood { stream: &'static str, got: u64, limit: u64 },
    #[error("the guest agent refused: {0}")]
    Refused(String),
    #[error("bad exec request")]
    BadRequest(#[source] ProtoError),
    #[error("the command did not finish within {secs} s and was {how}")]
    TimedOut { secs: u32, how: &'static str },
}

impl ExecError {
    pub fn kind(&self) -> ExecErrorKind {
        match self {
            ExecError::Refused(_) => ExecErrorKind::Refused,
            ExecError::TimedOut { .. } => ExecErrorKind::TimedOut,
            ExecError::BadRequest(_) => ExecErrorKind::BadRequest,
            _ => ExecErrorKind::Unreachable,
        }
    }

    fn proto(e: ProtoError) -> ExecError {
        match e {
            ProtoError::Refused(m) => ExecError::Refused(m),
            ProtoError::Io(e) => ExecError::Io(e),
            e => ExecError::Proto(e),
        }
    }
}

/// The reading side: a bounded decoder and a read buffer of one frame.
struct Reader {
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl Reader {
    /// The next frame; the stream ending first is [`ExecError::Closed`].
    async fn next(&mut self, r: &mut (impl AsyncRead + Unpin), during: &'static str) -> Result<GuestFrame, ExecError> {
        loop {
            if let Some(f) = self.dec.next_frame().map_err(ExecError::proto)? {
                return Ok(f);
            }
            let room = self.dec.room().min(self.buf.len());
            let n = r.read(&mut self.buf[..room]).await.map_err(ExecError::Io)?;
            if n == 0 {
                self.dec.finish().map_err(ExecError::proto)?;
                return Err(ExecError::Closed(during));
            }
            self.dec.push(&self.buf[..n]).map_err(ExecError::proto)?;
        }
    }
}

async fn send(w: &mut (impl AsyncWrite + Unpin), f: &HostFrame) -> Result<(), ExecError> {
    let bytes = encode(f).map_err(ExecError::Proto)?;
    w.write_all(&bytes).await.map_err(ExecError::Io)
}

/// A connection on which the hello has been exchanged.
pub struct AgentConn {
    stream: UnixStream,
    reader: Reader,
}

impl AgentConn {
    /// `CONNECT <port>` on `fd` (a stream connected to the VM's hybrid-vsock socket), then the
    /// hello. Bytes the muxer sent after its `OK` line are kept for the decoder.
    pub async fn open(fd: OwnedFd, port: u32) -> Result<AgentConn, ExecError> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true).map_err(ExecError::Io)?;
        let mut stream = UnixStream::from_std(std).map_err(ExecError::Io)?;
        let mut reader = Reader { dec: FrameDecoder::new(), buf: vec![0u8; MAX_FRAME_LEN] };

        let deadline = Instant::now() + CONNECT_WAIT;
        let stalled = |what| move |_| ExecError::Stalled { what, after: CONNECT_WAIT };
        timeout_at(deadline, stream.write_all(format!("CONNECT {port}\n").as_bytes()))
            .await
            .map_err(stalled("CONNECT"))?
            .map_err(ExecError::Io)?;
        let mut line = Vec::new();
        let rest = loop {
            let mut chunk = [0u8; MAX_CONNECT_LINE];
            let n = timeout_at(deadline, stream.read(&mut chunk))
                .await
                .map_err(stalled("answer to CONNECT"))?
                .map_err(ExecError::Io)?;
            if n == 0 {
                return Err(ExecError::NoListener { port });
            }
            line.extend_from_slice(&chunk[..n]);
            if let Some(end) = line.iter().position(|&b| b == b'\n') {
                break line.split_off(end + 1);
            }
            if line.len() > MAX_CONNECT_LINE {
                return Err(ExecError::BadConnect(String::from_utf8_lossy(&line).into_owned()));
            }
        };
        let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
        let ok = text.strip_prefix("OK ").is_some_and(|n| n.parse::<u32>().is_ok());
        if !ok {
            return Err(ExecError::BadConnect(text));
        }
        reader.dec.push(&rest).map_err(ExecError::proto)?;

        let mut conn = AgentConn { stream, reader };
        let deadline = Instant::now() + HELLO_WAIT;
        let stalled = |_| ExecError::Stalled { what: "hello", after: HELLO_WAIT };
        timeout_at(deadline, send(&mut conn.stream, &host_hello())).await.map_err(stalled)??;
        let hello = timeout_at(deadline, conn.reader.next(&mut conn.stream, "its hello")).await.map_err(stalled)??;
        check_hello(&hello).map_err(ExecError::proto)?;
        Ok(conn)
    }

    /// A health request: the guest's uptime in ms and how many commands it runs.
    pub async fn health(&mut self) -> Result<(u64, u32), ExecError> {
        let deadline = Instant::now() + HELLO_WAIT;
        let stalled = |_| ExecError::Stalled { what: "health answer", after: HELLO_WAIT };
        timeout_at(deadline, send(&mut self.stream, &HostFrame::Health)).await.map_err(stalled)??;
        match timeout_at(deadline, self.reader.next(&mut self.stream, "its health answer")).await.map_err(stalled)?? {
            GuestFrame::Health { uptime_ms, running } => Ok((uptime_ms, running)),
            GuestFrame::Error { message } => Err(ExecError::Refused(message)),
            _ => Err(ExecError::Proto(ProtoError::Unexpected { expected: "health", got: "another frame" })),
        }
    }

    /// Runs one command: sends the request and its stdin while collecting the output, up to
    /// the command's timeout plus [`EXEC_MARGIN`]; then a cancel, and [`CANCEL_WAIT`] more.
    /// A command that the guest ended for its timeout, or that was cancelled, is
    /// [`ExecError::TimedOut`].
    pub async fn exec(mut self, mut req: ExecRequest, stdin: Option<&[u8]>) -> Result<ExecResult, ExecError> {
        req.stdin = stdin.is_some();
        let secs = *req.timeout_secs.get_or_insert(DEFAULT_TIMEOUT_SECS);
        req.validate().map_err(ExecError::BadRequest)?;
        if stdin.is_some_and(|s| s.len() as u64 > MAX_STDIN_BYTES) {
            return Err(ExecError::BadRequest(ProtoError::BadRequest(format!(
                "stdin is larger than {MAX_STDIN_BYTES} bytes"
            ))));
        }
        let limit = req.max_output_bytes.unwrap_or(my_hypervisor_exec_proto::DEFAULT_MAX_OUTPUT_BYTES);
        let deadline = Instant::now() + Duration::from_secs(secs.into()) + EXEC_MARGIN;
        let stalled = |_| ExecError::Stalled { what: "exit", after: Duration::from_secs(secs.into()) + EXEC_MARGIN };
        // A request too large for one frame is the caller's error, not the guest's.
        let frame = encode(&HostFrame::Exec(req)).map_err(ExecError::BadRequest)?;
        timeout_at(deadline, self.stream.write_all(&frame)).await.map_err(stalled)?.map_err(ExecError::Io)?;

        let (mut rd, mut wr) = self.stream.split();
        let reader = &mut self.reader;
        let collect = async move {
            let mut c = ExecCollector::new(limit);
            // The guest keeps at most `limit` per stream and never sends more; one chunk of
            // slack allows for how it cuts its frames.
            let bound = limit.saturating_add(MAX_CHUNK as u64);
            let (mut out, mut err) = (0u64, 0u64);
            loop {
                let frame = reader.next(&mut rd, "the command's exit").await?;
                let counted = match &frame {
                    GuestFrame::Stdout(d) => {
                        out += d.len() as u64;
                        Some(("stdout", out))
                    }
                    GuestFrame::Stderr(d) => {
                        err += d.len() as u64;
                        Some(("stderr", err))
                    }
                    _ => None,
                };
                if let Some((stream, got)) = counted
                    && got > bound
                {
                    return Err(ExecError::Flood { stream, got, limit });
                }
                if let Some(r) = c.push(frame).map_err(ExecError::proto)? {
                    return Ok(r);
                }
            }
        };
        tokio::pin!(collect);
        // Stdin is written while output is read, so neither side can block the other. The
        // exec ends when the output does: an exit, an error, or the stream's end (a failed
        // write shows up there too); stdin not yet written then is dropped.
        let mut fed = false;
        let first = timeout_at(deadline, async {
            let feed = async {
                if let Some(data) = stdin {
                    for chunk in data.chunks(MAX_CHUNK) {
                        send(&mut wr, &HostFrame::Stdin(chunk.to_vec())).await?;
                    }
                    send(&mut wr, &HostFrame::StdinEnd).await?;
                }
                Ok::<(), ExecError>(())
            };
            tokio::pin!(feed);
            loop {
                tokio::select! {
                    r = &mut collect => return r,
                    w = &mut feed, if !fed => {
                        fed = true;
                        if let Err(e) = w {
                            tracing::debug!(error = %e, "writing stdin failed; reading on");
                        }
                    }
                }
            }
        })
        .await;
        let result = match first {
            Ok(r) => r?,
            // `collect` has not finished (it would have ended the wait). A cancel goes out
            // only between frames; with stdin still being written, closing the stream is
            // the cancel (the guest kills the command when its host goes away).
            Err(_) if !fed => {
                let _ = wr.shutdown().await;
                return Err(ExecError::TimedOut { secs, how: "abandoned (stdin was still being written)" });
            }
            Err(_) => {
                let _ = timeout_at(Instant::now() + CANCEL_WAIT, send(&mut wr, &HostFrame::Cancel)).await;
                return match timeout_at(Instant::now() + CANCEL_WAIT, &mut collect).await {
                    Ok(Ok(_)) => Err(ExecError::TimedOut { secs, how: "cancelled" }),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(ExecError::Stalled { what: "exit after a cancel", after: CANCEL_WAIT }),
                };
            }
        };
        match result.outcome {
            Outcome::Exited => Ok(result),
            Outcome::TimedOut => Err(ExecError::TimedOut { secs, how: "killed" }),
            Outcome::Cancelled => Err(ExecError::TimedOut { secs, how: "cancelled" }),
        }
    }
}
