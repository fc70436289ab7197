//! The exec protocol between the host and `my_hypervisor-init` (guest-init).
//!
//! Every frame on the stream is a 4-byte little-endian payload length followed by one
//! postcard-encoded [`HostFrame`] (host to guest) or [`GuestFrame`] (guest to host). A length
//! above [`MAX_FRAME_LEN`] is refused before anything is allocated; a payload with trailing
//! bytes or an unknown variant is refused too. The first frame each way is a hello carrying
//! [`PROTOCOL_VERSION`]: a peer with another version gets an error and the stream closes.
//!
//! The crate does no I/O of its own beyond the blocking [`read_frame`]/[`write_frame`]
//! helpers over `std::io`: the host (tokio) feeds bytes to a [`FrameDecoder`] and writes what
//! [`encode`] returns. docs/guest-init.md describes the conversation.

mod collect;
mod frames;
mod wire;

pub use collect::{ExecCollector, ExecResult};
pub use frames::{
    ExecRequest, ExitStatus, ExitSummary, GuestFrame, HostFrame, Outcome, check_hello, guest_hello, host_hello,
};
pub use wire::{FrameDecoder, ProtoError, decode, encode, read_frame, write_frame};

/// Bumped on any incompatible change to the frames.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest payload (after the 4-byte length) either side sends or accepts.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// The largest data chunk in one stdin, stdout or stderr frame; leaves room for the framing.
pub const MAX_CHUNK: usize = 32 * 1024;
/// The vsock port guest-init listens on unless its config says otherwise.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;
/// Output kept per stream when the request does not say.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1024 * 1024;
/// The most output per stream a request may ask for.
pub const MAX_OUTPUT_BYTES: u64 = 16 * 1024 * 1024;
/// The most stdin one request may carry.
pub const MAX_STDIN_BYTES: u64 = 16 * 1024 * 1024;
/// Limits on the request itself, so that one ExecStart fits in a frame with room to spare.
pub const MAX_ARGS: usize = 1024;
pub const MAX_ENV: usize = 1024;
