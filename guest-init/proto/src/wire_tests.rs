use std::io::Cursor;

use super::*;
use crate::{
    ExecRequest, ExitStatus, ExitSummary, GuestFrame, HostFrame, MAX_CHUNK, Outcome, PROTOCOL_VERSION, check_hello,
    guest_hello, host_hello,
};

fn sample_host() -> Vec<HostFrame> {
    let mut req = ExecRequest::new(["/bin/sh", "-c", "echo hi"]);
    req.env = vec![("PATH".into(), "/bin".into())];
    req.cwd = Some("/tmp".into());
    req.timeout_secs = Some(5);
    req.max_output_bytes = Some(10);
    req.stdin = true;
    vec![
        host_hello(),
        HostFrame::Health,
        HostFrame::Exec(req),
        HostFrame::Stdin(vec![0, 1, 255]),
        HostFrame::StdinEnd,
        HostFrame::Cancel,
    ]
}

fn sample_guest() -> Vec<GuestFrame> {
    vec![
        guest_hello(),
        GuestFrame::Health { uptime_ms: 7, running: 1 },
        GuestFrame::Started { pid: 42 },
        GuestFrame::Stdout(b"out".to_vec()),
        GuestFrame::Stderr(vec![0xff; MAX_CHUNK]),
        GuestFrame::Exit(ExitSummary {
            status: ExitStatus::Signal(9),
            outcome: Outcome::TimedOut,
            stdout_bytes: 3,
            stderr_bytes: 1 << 40,
            stdout_truncated: false,
            stderr_truncated: true,
            duration_ms: 1234,
        }),
        GuestFrame::Error { message: "no".into() },
    ]
}

#[test]
fn every_frame_round_trips_through_encode_and_read_frame() {
    let mut stream = Vec::new();
    for f in sample_host() {
        stream.extend(encode(&f).unwrap());
    }
    let mut r = Cursor::new(stream);
    for want in sample_host() {
        assert_eq!(read_frame::<HostFrame>(&mut r).unwrap(), Some(want));
    }
    assert!(read_frame::<HostFrame>(&mut r).unwrap().is_none(), "clean end of stream");

    let mut w = Vec::new();
    for f in sample_guest() {
        write_frame(&mut w, &f).unwrap();
    }
    let mut r = Cursor::new(w);
    for want in sample_guest() {
        assert_eq!(read_frame::<GuestFrame>(&mut r).unwrap(), Some(want));
    }
}

#[test]
fn the_decoder_yields_frames_fed_one_byte_at_a_time() {
    let mut stream = Vec::new();
    for f in sample_guest() {
        stream.extend(encode(&f).unwrap());
    }
    let mut d = FrameDecoder::new();
    let mut got = Vec::new();
    for b in stream {
        d.push(&[b]).unwrap();
        while let Some(f) = d.next_frame::<GuestFrame>().unwrap() {
            got.push(f);
        }
    }
    d.finish().unwrap();
    assert_eq!(got, sample_guest());
}

#[test]
fn an_oversized_length_is_refused_before_the_payload_is_read() {
    let len = (MAX_FRAME_LEN as u32 + 1).to_le_bytes();
    // Only the prefix is there: refusing without waiting for 64 KiB shows nothing was read.
    let err = read_frame::<HostFrame>(&mut Cursor::new(len.to_vec())).unwrap_err();
    assert!(matches!(err, ProtoError::TooLarge { len, .. } if len == MAX_FRAME_LEN + 1), "{err}");
    let err = read_frame::<HostFrame>(&mut Cursor::new(u32::MAX.to_le_bytes().to_vec()));
    assert!(matches!(err, Err(ProtoError::TooLarge { .. })));

    let mut d = FrameDecoder::new();
    let err = d.push(&len).unwrap_err();
    assert!(matches!(err, ProtoError::TooLarge { .. }), "{err}");
}

#[test]
fn encoding_refuses_a_frame_over_the_limit() {
    let err = encode(&GuestFrame::Stdout(vec![0; MAX_FRAME_LEN])).unwrap_err();
    assert!(matches!(err, ProtoError::TooLarge { .. }), "{err}");
}

#[test]
fn the_decoder_buffer_is_bounded() {
    let mut d = FrameDecoder::new();
    let frame = encode(&GuestFrame::Stdout(vec![1; MAX_CHUNK])).unwrap();
    let mut pushed = 0;
    while d.room() >= frame.len() {
        d.push(&frame).unwrap();
        pushed += 1;
    }
    assert!(pushed >= 2);
    assert!(matches!(d.push(&frame), Err(ProtoError::BufferFull)));
    assert!(d.next_frame::<GuestFrame>().unwrap().is_some());
}

#[test]
fn a_truncated_frame_is_an_error_not_a_clean_end() {
    let frame = encode(&host_hello()).unwrap();
    for cut in 1..frame.len() {
        let err = read_frame::<HostFrame>(&mut Cursor::new(frame[..cut].to_vec())).unwrap_err();
        assert!(matches!(err, ProtoError::Truncated { .. }), "cut at {cut}: {err}");
        let mut d = FrameDecoder::new();
        d.push(&frame[..cut]).unwrap();
        assert!(d.next_frame::<HostFrame>().unwrap().is_none());
        assert!(matches!(d.finish(), Err(ProtoError::Truncated { .. })));
    }
}

#[test]
fn an_unknown_variant_and_trailing_bytes_are_refused() {
    // HostFrame has 6 variants: index 6 is unknown.
    let err = decode::<HostFrame>(&[6]).unwrap_err();
    assert!(matches!(err, ProtoError::Decode(_)), "{err}");
    let err = decode::<GuestFrame>(&[200]).unwrap_err();
    assert!(matches!(err, ProtoError::Decode(_)), "{err}");
    let mut payload = encode(&HostFrame::Health).unwrap()[LEN_PREFIX..].to_vec();
    payload.push(0);
    assert!(matches!(decode::<HostFrame>(&payload), Err(ProtoError::TrailingBytes(1))));
    assert!(matches!(decode::<HostFrame>(&[]), Err(ProtoError::Decode(_))));
}

#[test]
fn the_hello_refuses_another_version_with_a_clear_error() {
    check_hello(&host_hello()).unwrap();
    check_hello(&guest_hello()).unwrap();
    let err = check_hello(&HostFrame::Hello { version: PROTOCOL_VERSION + 1 }).unwrap_err();
    assert!(matches!(err, ProtoError::VersionMismatch { .. }));
    assert!(err.to_string().contains("we speak 1, the peer speaks 2"), "{err}");
    let err = check_hello(&HostFrame::Health).unwrap_err();
    assert!(err.to_string().contains("expected a hello frame, got health"), "{err}");
    let err = check_hello(&GuestFrame::Error { message: "old host".into() }).unwrap_err();
    assert!(matches!(err, ProtoError::Refused(m) if m == "old host"));
}

#[test]
fn requests_are_validated() {
    ExecRequest::new(["true"]).validate().unwrap();
    let bad = |f: &dyn Fn(&mut ExecRequest)| {
        let mut r = ExecRequest::new(["true"]);
        f(&mut r);
        assert!(matches!(r.validate(), Err(ProtoError::BadRequest(_))), "{r:?}");
    };
    bad(&|r| r.argv.clear());
    bad(&|r| r.argv[0].clear());
    bad(&|r| r.argv.push("a\0b".into()));
    bad(&|r| r.argv.resize(crate::MAX_ARGS + 1, "x".into()));
    bad(&|r| r.env.push(("A=B".into(), "c".into())));
    bad(&|r| r.env.push(("".into(), "c".into())));
    bad(&|r| r.env.push(("A".into(), "\0".into())));
    bad(&|r| r.cwd = Some(String::new()));
    bad(&|r| r.timeout_secs = Some(0));
    bad(&|r| r.timeout_secs = Some(crate::frames::MAX_TIMEOUT_SECS + 1));
    bad(&|r| r.max_output_bytes = Some(crate::MAX_OUTPUT_BYTES + 1));
}

/// xorshift64*: deterministic, so a failure names its seed.
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed >> 12;
    *seed ^= *seed << 25;
    *seed ^= *seed >> 27;
    seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn decoding_mutated_and_random_bytes_never_panics() {
    let mut seeds = 0x9e37_79b9_7f4a_7c15u64;
    let mut frames: Vec<Vec<u8>> = sample_host().iter().map(|f| encode(f).unwrap()).collect();
    frames.extend(sample_guest().iter().map(|f| encode(f).unwrap()));
    let mut decoded = 0;
    for round in 0..20_000u64 {
        let mut bytes = frames[(rng(&mut seeds) as usize) % frames.len()].clone();
        for _ in 0..1 + rng(&mut seeds) % 4 {
            let i = (rng(&mut seeds) as usize) % bytes.len();
            match rng(&mut seeds) % 3 {
                0 => bytes[i] = rng(&mut seeds) as u8,
                1 => bytes.truncate(i.max(1)),
                _ => bytes.insert(i, rng(&mut seeds) as u8),
            }
        }
        if round % 4 == 0 {
            bytes = (0..rng(&mut seeds) % 64).map(|_| rng(&mut seeds) as u8).collect();
        }
        // Whatever the outcome, it is a value, not a panic or an allocation of the claimed size.
        let a = read_frame::<HostFrame>(&mut Cursor::new(bytes.clone()));
        let b = read_frame::<GuestFrame>(&mut Cursor::new(bytes.clone()));
        let mut d = FrameDecoder::new();
        if d.push(&bytes).is_ok() {
            while let Ok(Some(_)) = d.next_frame::<GuestFrame>() {}
        }
        decoded += usize::from(matches!(a, Ok(Some(_)))) + usize::from(matches!(b, Ok(Some(_))));
    }
    // Some mutations leave a valid frame, most do not: both paths were exercised.
    assert!(decoded > 0);
}
