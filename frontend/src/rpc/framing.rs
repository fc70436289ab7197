//! The framing under [`super::transport`]: one line in (bounded in length and time), one
//! message out per line (each written within the write timeout), and why a connection ended.

use std::io;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout, timeout_at};

use super::Limits;

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
pub(super) enum Closed {
    #[error("client closed the connection")]
    Eof,
    #[error("idle timeout")]
    Idle,
    #[error("a request line did not arrive in time")]
    LineTimeout,
    #[error("request line too long")]
    LineTooLong,
    #[error("client does not read its responses (write timeout)")]
    WriteTimeout,
    #[error("the outgoing side of the connection stopped")]
    WriterGone,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Reads one line into `line` (without the newline). Returns `Ok(false)` at end of input.
/// Enforces the line length, the per-line deadline and the idle timeout; `has_subscriptions`
/// exempts a connection from the idle timeout.
pub(super) async fn read_line<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    line: &mut Vec<u8>,
    limits: &Limits,
    has_subscriptions: impl Fn() -> bool,
) -> Result<bool, Closed> {
    line.clear();
    let mut line_deadline: Option<Instant> = None;
    let mut idle_deadline = Instant::now() + limits.idle_timeout;
    loop {
        let deadline = line_deadline.unwrap_or(idle_deadline);
        let avail = match timeout_at(deadline, rd.fill_buf()).await {
            Ok(read) => read?,
            Err(_) if line_deadline.is_some() => return Err(Closed::LineTimeout),
            Err(_) if has_subscriptions() => {
                idle_deadline = Instant::now() + limits.idle_timeout;
                continue;
            }
            Err(_) => return Err(Closed::Idle),
        };
        if avail.is_empty() {
            // End of input; a last line without a newline still counts.
            return Ok(!line.is_empty());
        }
        line_deadline.get_or_insert_with(|| Instant::now() + limits.line_timeout);
        let (piece, used, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..i], i + 1, true),
            None => (avail, avail.len(), false),
        };
        if line.len() + piece.len() > limits.max_line_bytes {
            return Err(Closed::LineTooLong);
        }
        line.extend_from_slice(piece);
        rd.consume(used);
        if done {
            return Ok(true);
        }
    }
}

/// Writes queued messages, one per line. Each message must be written within `write_timeout`,
/// so a client that stops reading is disconnected instead of holding the queue full. On `stop`
/// it writes what is already queued and returns.
pub(super) async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Box<RawValue>>,
    mut stop: oneshot::Receiver<()>,
    write_timeout: Duration,
) -> Closed {
    let mut stopping = false;
    loop {
        let msg = tokio::select! {
            msg = rx.recv() => msg,
            _ = &mut stop, if !stopping => {
                stopping = true;
                rx.close();
                continue;
            }
        };
        let Some(msg) = msg else {
            let _ = timeout(write_timeout, wr.shutdown()).await;
            return Closed::Eof;
        };
        let mut out = String::from(Box::<str>::from(msg));
        out.push('\n');
        match timeout(write_timeout, wr.write_all(out.as_bytes())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Closed::Io(e),
            Err(_) => return Closed::WriteTimeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::BufReader;

    use super::*;

    fn limits(max_line_bytes: usize) -> Limits {
        Limits { max_line_bytes, line_timeout: Duration::from_millis(200), ..Limits::default() }
    }

    #[tokio::test]
    async fn lines_are_split_and_bounded() {
        let data: &[u8] = b"abc\n\ndef";
        let mut rd = BufReader::with_capacity(2, data);
        let mut line = Vec::new();
        let l = limits(3);
        assert!(read_line(&mut rd, &mut line, &l, || false).await.unwrap());
        assert_eq!(line, b"abc");
        assert!(read_line(&mut rd, &mut line, &l, || false).await.unwrap());
        assert_eq!(line, b"");
        assert!(read_line(&mut rd, &mut line, &l, || false).await.unwrap());
        assert_eq!(line, b"def");
        assert!(!read_line(&mut rd, &mut line, &l, || false).await.unwrap());

        let mut rd = BufReader::with_capacity(2, &b"abcd\n"[..]);
        let r = read_line(&mut rd, &mut line, &l, || false).await;
        assert!(matches!(r, Err(Closed::LineTooLong)));
        assert!(line.len() <= 3);
    }
}
