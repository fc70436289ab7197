//! The host side of exec against a scripted peer on a socketpair (the muxer and the guest in
//! one): the CONNECT handshake, bytes past the OK line, the hello, health and one exec, and
//! the errors for what a peer can get wrong. No root needed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::thread;

use my_hypervisor_exec_proto::{
    ExecRequest, ExitStatus, ExitSummary, GuestFrame, HostFrame, MAX_CHUNK, Outcome, encode, guest_hello, read_frame,
    write_frame,
};
use my_hypervisor_frontend::exec::{AgentConn, ExecError, ExecErrorKind};

/// The host's end as an fd, and the peer running `script` on the other end.
fn pair(script: impl FnOnce(UnixStream) + Send + 'static) -> (OwnedFd, thread::JoinHandle<()>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    (OwnedFd::from(ours), thread::spawn(move || script(theirs)))
}

fn read_connect(s: &mut UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

#[tokio::test]
async fn connect_hello_health_and_an_exec_with_bytes_past_the_ok_line() {
    let (fd, peer) = pair(|mut s| {
        assert_eq!(read_connect(&mut s), "CONNECT 1024\n");
        // The guest's hello comes in the same write as the OK line: the host must keep it.
        let mut first = b"OK 1073741824\n".to_vec();
        first.extend(encode(&guest_hello()).unwrap());
        s.write_all(&first).unwrap();
        assert!(matches!(read_frame::<HostFrame>(&mut s).unwrap(), Some(HostFrame::Hello { version: 1 })));
        assert_eq!(read_frame::<HostFrame>(&mut s).unwrap(), Some(HostFrame::Health));
        write_frame(&mut s, &GuestFrame::Health { uptime_ms: 5, running: 0 }).unwrap();
        let Some(HostFrame::Exec(req)) = read_frame::<HostFrame>(&mut s).unwrap() else { panic!("an exec") };
        assert_eq!(req.argv, ["cat"]);
        assert!(req.stdin);
        assert_eq!(req.timeout_secs, Some(60), "the default timeout is sent");
        let mut stdin = Vec::new();
        loop {
            match read_frame::<HostFrame>(&mut s).unwrap() {
                Some(HostFrame::Stdin(d)) => stdin.extend(d),
                Some(HostFrame::StdinEnd) => break,
                other => panic!("{other:?}"),
            }
        }
        write_frame(&mut s, &GuestFrame::Started { pid: 9 }).unwrap();
        for chunk in stdin.chunks(MAX_CHUNK) {
            write_frame(&mut s, &GuestFrame::Stdout(chunk.to_vec())).unwrap();
        }
        write_frame(&mut s, &GuestFrame::Stderr(b"e".to_vec())).unwrap();
        let exit = ExitSummary {
            status: ExitStatus::Code(3),
            outcome: Outcome::Exited,
            stdout_bytes: stdin.len() as u64,
            stderr_bytes: 1,
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 7,
        };
        write_frame(&mut s, &GuestFrame::Exit(exit)).unwrap();
    });
    let mut conn = AgentConn::open(fd, 1024).await.expect("connected");
    assert_eq!(conn.health().await.unwrap(), (5, 0));
    // More stdin than one chunk, written while the output is read.
    let stdin: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let r = conn.exec(ExecRequest::new(["cat"]), Some(&stdin)).await.expect("exec");
    assert_eq!((r.status, r.pid, r.duration_ms), (ExitStatus::Code(3), Some(9), 7));
    assert_eq!(r.stdout, stdin);
    assert_eq!(r.stderr, b"e");
    peer.join().unwrap();
}

#[tokio::test]
async fn what_a_muxer_can_get_wrong_is_a_clear_error() {
    // The stream closes before OK: nothing listens on the port.
    let (fd, peer) = pair(|mut s| {
        read_connect(&mut s);
    });
    let e = AgentConn::open(fd, 1024).await.err().expect("no listener");
    assert!(matches!(e, ExecError::NoListener { port: 1024 }), "{e}");
    assert_eq!(e.kind(), ExecErrorKind::Unreachable);
    peer.join().unwrap();

    for answer in [&b"ERR 1\n"[..], b"OK notanumber\n", &[b'O'; 200]] {
        let answer = answer.to_vec();
        let (fd, peer) = pair(move |mut s| {
            read_connect(&mut s);
            s.write_all(&answer).unwrap();
            let _ = s.read_to_end(&mut Vec::new());
        });
        let e = AgentConn::open(fd, 1024).await.err().expect("bad answer");
        assert!(matches!(e, ExecError::BadConnect(_)), "{e}");
        peer.join().unwrap();
    }

    // A guest of another protocol version.
    let (fd, peer) = pair(|mut s| {
        read_connect(&mut s);
        s.write_all(b"OK 5\n").unwrap();
        write_frame(&mut s, &GuestFrame::Hello { version: 2 }).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    });
    let e = AgentConn::open(fd, 1024).await.err().expect("version");
    assert!(format!("{:?}", e).contains("VersionMismatch"), "{e:?}");
    peer.join().unwrap();
}

#[tokio::test]
async fn a_bad_request_is_refused_before_anything_is_sent() {
    let (fd, peer) = pair(|mut s| {
        read_connect(&mut s);
        s.write_all(b"OK 5\n").unwrap();
        read_frame::<HostFrame>(&mut s).unwrap();
        write_frame(&mut s, &guest_hello()).unwrap();
        // Nothing more may come: the stream ends when the host drops it.
        assert_eq!(read_frame::<HostFrame>(&mut s).unwrap(), None);
    });
    let conn = AgentConn::open(fd, 1024).await.unwrap();
    let e = conn.exec(ExecRequest::new(["a\0b"]), None).await.expect_err("refused");
    assert_eq!(e.kind(), ExecErrorKind::BadRequest, "{e}");
    peer.join().unwrap();
}

#[tokio::test]
async fn an_exit_ends_the_exec_even_while_stdin_is_still_being_written() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let answered = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&answered);
    let (fd, peer) = pair(move |mut s| {
        read_connect(&mut s);
        s.write_all(b"OK 5\n").unwrap();
        read_frame::<HostFrame>(&mut s).unwrap();
        write_frame(&mut s, &guest_hello()).unwrap();
        assert!(matches!(read_frame::<HostFrame>(&mut s).unwrap(), Some(HostFrame::Exec(_))));
        // The command exits without reading its stdin, and the guest stops reading too.
        let exit = ExitSummary {
            status: ExitStatus::Code(0),
            outcome: Outcome::Exited,
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 1,
        };
        write_frame(&mut s, &GuestFrame::Started { pid: 1 }).unwrap();
        write_frame(&mut s, &GuestFrame::Exit(exit)).unwrap();
        // The host answers while this end still holds the stream, unread.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !seen.load(Ordering::SeqCst) && std::time::Instant::now() < end {
            thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(seen.load(Ordering::SeqCst), "the exec ended before the stream did");
    });
    let conn = AgentConn::open(fd, 1024).await.unwrap();
    // Far more than the socket buffers hold.
    let stdin = vec![7u8; 8 * 1024 * 1024];
    let r = conn.exec(ExecRequest::new(["true"]), Some(&stdin)).await.expect("exit");
    answered.store(true, Ordering::SeqCst);
    assert_eq!(r.status, ExitStatus::Code(0));
    peer.join().unwrap();
}
