//! Length-prefixed framing: encode, decode, an incremental decoder for async callers and
//! blocking read/write helpers for sync ones.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::MAX_FRAME_LEN;

/// Bytes of the little-endian length prefix.
pub const LEN_PREFIX: usize = 4;
/// The most bytes a [`FrameDecoder`] holds: one whole frame plus one more read.
pub const DECODER_CAPACITY: usize = 2 * (LEN_PREFIX + MAX_FRAME_LEN);

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("exec protocol I/O")]
    Io(#[source] io::Error),
    #[error("frame of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended inside a frame: {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    #[error("frame holds {0} bytes after its message")]
    TrailingBytes(usize),
    #[error("malformed frame")]
    Decode(#[source] postcard::Error),
    #[error("could not encode a frame")]
    Encode(#[source] postcard::Error),
    #[error("decoder buffer is full: the caller must take frames before pushing more")]
    BufferFull,
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("expected a {expected} frame, got {got}")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("bad exec request: {0}")]
    BadRequest(String),
}

/// The whole frame: length prefix and payload.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let mut out = vec![0u8; LEN_PREFIX];
    out = postcard::to_extend(msg, out).map_err(ProtoError::Encode)?;
    let len = out.len() - LEN_PREFIX;
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::TooLarge { len, max: MAX_FRAME_LEN });
    }
    // The check above keeps len well inside u32.
    out[..LEN_PREFIX].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// One payload (without its length prefix), which must hold exactly one message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(ProtoError::TooLarge { len: payload.len(), max: MAX_FRAME_LEN });
    }
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(ProtoError::Decode)?;
    if !rest.is_empty() {
        return Err(ProtoError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

fn frame_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::TooLarge { len, max: MAX_FRAME_LEN });
    }
    Ok(len)
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtoError> {
    let bytes = encode(msg)?;
    w.write_all(&bytes).map_err(ProtoError::Io)?;
    w.flush().map_err(ProtoError::Io)
}

/// Reads one frame: `Ok(None)` on a clean end of stream before a frame starts. An oversized
/// length is refused before the payload is allocated or read.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<Option<T>, ProtoError> {
    let mut prefix = [0u8; LEN_PREFIX];
    let got = read_full(r, &mut prefix)?;
    if got == 0 {
        return Ok(None);
    }
    if got < LEN_PREFIX {
        return Err(ProtoError::Truncated { expected: LEN_PREFIX, got });
    }
    let len = frame_len(prefix)?;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload)?;
    if got < len {
        return Err(ProtoError::Truncated { expected: len, got });
    }
    decode(&payload).map(Some)
}

/// Reads until `buf` is full or the stream ends; returns how much it read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, ProtoError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtoError::Io(e)),
        }
    }
    Ok(got)
}

/// An incremental decoder for callers that do their own reads (tokio on the host). It holds
/// at most [`DECODER_CAPACITY`] bytes and checks each length as soon as it is complete.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ProtoError> {
        if self.buf.len() + bytes.len() > DECODER_CAPACITY {
            return Err(ProtoError::BufferFull);
        }
        self.buf.extend_from_slice(bytes);
        self.check_pending()
    }

    /// How much a caller may push now.
    pub fn room(&self) -> usize {
        DECODER_CAPACITY - self.buf.len()
    }

    fn check_pending(&self) -> Result<(), ProtoError> {
        match self.buf.first_chunk::<LEN_PREFIX>() {
            Some(prefix) => frame_len(*prefix).map(|_| ()),
            None => Ok(()),
        }
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtoError> {
        let Some(prefix) = self.buf.first_chunk::<LEN_PREFIX>() else { return Ok(None) };
        let len = frame_len(*prefix)?;
        if self.buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let msg = decode(&self.buf[LEN_PREFIX..LEN_PREFIX + len]);
        self.buf.drain(..LEN_PREFIX + len);
        self.check_pending()?;
        msg.map(Some)
    }

    /// Call at end of stream: an error if a frame was cut short.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let expected = match self.buf.first_chunk::<LEN_PREFIX>() {
            Some(prefix) => LEN_PREFIX + frame_len(*prefix)?,
            None => LEN_PREFIX,
        };
        Err(ProtoError::Truncated { expected, got: self.buf.len() })
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
