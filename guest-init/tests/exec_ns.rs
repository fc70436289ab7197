//! guest-init in test mode (`--listen-unix`), as PID 1 of new PID, mount and UTS namespaces,
//! driven with the protocol crate as the client. As non-root each test prints SKIP and passes.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Init, have_root, sh};
use my_hypervisor_exec_proto::{ExecRequest, ExitStatus, GuestFrame, HostFrame, Outcome, read_frame, write_frame};

#[test]
fn exec_round_trip_with_argv_env_cwd_stdin_exit_code_signal_and_truncation() {
    if !have_root("exec_round_trip") {
        return;
    }
    let init = Init::start(&["--cmdline", "quiet myhv.hostname=guest-test myhv.mtu=lo:1280"]);
    let mut c = init.connect();
    // Its mounts are in its own mount namespace under a private `/`: the clone made `/`
    // shared there (common.rs), so only guest-init's own MS_PRIVATE removes the "shared:" tag.
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", init.pid)).unwrap();
    let mounts: Vec<Vec<&str>> = mountinfo.lines().map(|l| l.split(' ').collect()).collect();
    let root = mounts.iter().find(|f| f[4] == "/").expect("a / mount");
    assert!(!root.iter().take_while(|f| **f != "-").any(|f| f.starts_with("shared:")), "{root:?}");
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp"] {
        assert!(mounts.iter().any(|f| f[4] == dir), "{dir} is not mounted in its namespace");
    }
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_ne!(std::fs::read_link(format!("/proc/{}/ns/mnt", init.pid)).unwrap(), ours);
    let (_, running) = c.health();
    assert_eq!(running, 0);

    let mut req = sh("echo \"$FOO|$#|$1\"; pwd; cat; echo err >&2; exit 7");
    req.argv.extend(["argv0".into(), "first arg".into()]);
    req.env = vec![("FOO".into(), "bar baz".into())];
    req.cwd = Some("/usr".into());
    let o = c.exec(req, Some(b"from stdin\n"));
    let exit = o.exit.clone().unwrap_or_else(|| panic!("no exit: {o:?}\n{}", init.log_text()));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "bar baz|1|first arg\n/usr\nfrom stdin\n");
    assert_eq!(o.stderr, b"err\n");
    assert_eq!((exit.status, exit.outcome), (ExitStatus::Code(7), Outcome::Exited));
    assert!(!exit.stdout_truncated && !exit.stderr_truncated);
    assert!(o.pid.is_some());

    // The environment is exactly the one requested; a bare program name is looked up in
    // guest-init's own PATH.
    let o = c.exec(ExecRequest::new(["env"]), None);
    assert_eq!(o.stdout, b"");
    assert_eq!(o.exit.as_ref().map(|e| e.status), Some(ExitStatus::Code(0)), "{o:?}");

    let o = c.exec(sh("kill -KILL $$"), None);
    assert_eq!(o.exit.as_ref().map(|e| e.status), Some(ExitStatus::Signal(libc::SIGKILL)), "{o:?}");
    // The command itself (not a shell's child: the shell would reset it) blocks no signal.
    let o = c.exec(ExecRequest::new(["/bin/grep", "SigBlk", "/proc/self/status"]), None);
    assert_eq!(o.stdout, b"SigBlk:\t0000000000000000\n", "no signal blocked in a command");

    let mut req = ExecRequest::new(["/usr/bin/head", "-c", "300000", "/dev/zero"]);
    req.max_output_bytes = Some(1000);
    let o = c.exec(req, None);
    let exit = o.exit.unwrap();
    assert_eq!(o.stdout.len(), 1000);
    assert!(exit.stdout_truncated && !exit.stderr_truncated);
    assert_eq!(exit.stdout_bytes, 300_000);

    // The config from the command line: hostname (in its UTS namespace) and lo's MTU and
    // state (in its network namespace).
    let o = c.exec(sh("cat /proc/sys/kernel/hostname /sys/class/net/lo/mtu /sys/class/net/lo/operstate"), None);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "guest-test\n1280\nunknown\n", "{}", init.log_text());

    let o = c.exec(sh("cat /proc/self/status | grep ^NSpid; cat /proc/1/cmdline | tr '\\0' ' '"), None);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.contains("--listen-unix"), "pid 1 is guest-init: {text}");

    // A program that does not exist is an error frame; the connection goes on.
    let o = c.exec(ExecRequest::new(["/nonexistent/prog"]), None);
    assert!(o.error.as_deref().unwrap_or("").contains("cannot run"), "{o:?}");
    // An invalid request is refused before anything runs.
    c.send(&HostFrame::Exec(ExecRequest::new(Vec::<String>::new())));
    assert!(matches!(c.recv(), GuestFrame::Error { message } if message.contains("argv")));
    c.health();
    let none_left = || init.children().is_empty().then_some(());
    assert!(common::wait_until(Duration::from_secs(5), none_left).is_some(), "{:?}", init.children());
}

#[test]
fn hostile_clients_are_refused_and_the_service_goes_on() {
    if !have_root("hostile_clients") {
        return;
    }
    let init = Init::start(&[]);

    // Another protocol version: a clear error, then the stream closes.
    let mut s = UnixStream::connect(&init.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_frame(&mut s, &HostFrame::Hello { version: 99 }).unwrap();
    match read_frame::<GuestFrame>(&mut s).unwrap() {
        Some(GuestFrame::Error { message }) => assert!(message.contains("version mismatch"), "{message}"),
        other => panic!("expected a version error, got {other:?}"),
    }
    assert!(read_frame::<GuestFrame>(&mut s).unwrap().is_none());

    // A length far over the limit: refused at once, without waiting for 4 GiB.
    let mut s = UnixStream::connect(&init.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    match read_frame::<GuestFrame>(&mut s).unwrap() {
        Some(GuestFrame::Error { message }) => assert!(message.contains("larger than the limit"), "{message}"),
        other => panic!("expected a size error, got {other:?}"),
    }

    // Garbage that is not a frame of ours.
    let mut s = UnixStream::connect(&init.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(!rest.is_empty(), "an error frame before the close");

    // A client that never says hello costs a bounded wait: the stream is closed.
    let mut s = UnixStream::connect(&init.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);

    init.connect().health();
}

#[test]
fn timeout_and_cancel_kill_the_whole_process_group() {
    if !have_root("timeout_kills_group") {
        return;
    }
    let init = Init::start(&[]);
    let mut c = init.connect();
    // The shell starts a grandchild in its group and waits; the timeout must end both.
    let mut req = sh("sleep 60 & echo $!; wait");
    req.timeout_secs = Some(1);
    let o = c.exec(req, None);

    let exit = o.exit.clone().unwrap_or_else(|| panic!("{o:?}"));
    assert_eq!(exit.outcome, Outcome::TimedOut);
    assert_eq!(exit.status, ExitStatus::Signal(libc::SIGTERM));
    let grandchild = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(grandchild.parse::<u32>().is_ok(), "{grandchild:?}");
    // Inside the namespace, the grandchild is gone (killed, then reaped: not left a zombie).
    let check = format!(
        "for i in $(seq 50); do test -e /proc/{grandchild} || {{ echo gone; exit; }}; sleep 0.1; done; echo alive"
    );
    let o = c.exec(sh(&check), None);
    assert_eq!(o.stdout, b"gone\n");

    // A cancel: SIGTERM is ignored by the command, so SIGKILL follows the grace period.
    c.start(sh("trap '' TERM; echo ready; sleep 60 & wait; sleep 60"), None);
    assert!(matches!(c.recv(), GuestFrame::Started { .. }));
    assert!(matches!(c.recv(), GuestFrame::Stdout(d) if d == b"ready\n"));
    c.send(&HostFrame::Cancel);
    let o = c.finish();
    let exit = o.exit.clone().unwrap_or_else(|| panic!("{o:?}"));
    assert_eq!(exit.outcome, Outcome::Cancelled);
    assert_eq!(exit.status, ExitStatus::Signal(libc::SIGKILL));
    let no_sleep = || init.children().iter().all(|(_, _, comm)| comm != "sleep").then_some(());
    assert!(common::wait_until(Duration::from_secs(5), no_sleep).is_some(), "{:?}", init.children());
}

#[test]
fn orphans_are_reaped() {
    if !have_root("orphans_are_reaped") {
        return;
    }
    // The config file stands in for the initramfs's; the command line overrides it.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("init.conf");
    std::fs::write(&conf, "# test\nhostname = from-file\nmtu = lo:1400\n").unwrap();
    let init = Init::start(&["--config", conf.to_str().unwrap(), "--cmdline", "myhv.mtu=lo:1300"]);
    let mut c = init.connect();
    let o = c.exec(sh("cat /proc/sys/kernel/hostname /sys/class/net/lo/mtu"), None);
    assert_eq!(o.stdout, b"from-file\n1300\n", "{}", init.log_text());

    // setsid takes the sleep out of the command's group, so it outlives the command and is
    // re-parented to PID 1: guest-init. The command waits until setsid has run (the pid file
    // is written after it), so the group's end cannot catch the sleep first.
    let script = "setsid /bin/sh -c 'echo $$ >/tmp/orphan.pid; exec /bin/sleep 3' \
                  </dev/null >/dev/null 2>&1 & \
                  while [ ! -s /tmp/orphan.pid ]; do sleep 0.05; done; exit 0";
    let o = c.exec(sh(script), None);
    assert_eq!(o.exit.unwrap().status, ExitStatus::Code(0));
    let orphan =
        common::wait_until(Duration::from_secs(5), || init.children().into_iter().find(|(_, _, comm)| comm == "sleep"));
    assert!(orphan.is_some(), "the orphan was not re-parented to guest-init: {:?}", init.children());
    let gone = common::wait_until(Duration::from_secs(15), || init.children().is_empty().then_some(()));
    assert!(gone.is_some(), "a child of guest-init remains (zombie?): {:?}", init.children());
}

#[test]
fn sigterm_stops_every_process_and_ends_the_namespace() {
    if !have_root("sigterm_ends_namespace") {
        return;
    }
    let mut init = Init::start(&[]);
    let mut c = init.connect();
    c.start(sh("echo up; exec sleep 100"), None);
    assert!(matches!(c.recv(), GuestFrame::Started { .. }));
    assert!(matches!(c.recv(), GuestFrame::Stdout(_)));
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(init.pid, libc::SIGTERM) }, 0);
    // The command saw SIGTERM first (its exit frame says so) ...
    let o = c.finish();
    assert_eq!(o.exit.as_ref().map(|e| e.status), Some(ExitStatus::Signal(libc::SIGTERM)), "{o:?}");
    // ... then PID 1 powered off, which in a child PID namespace ends it.
    let status = init.wait_exit(Duration::from_secs(20));
    let status = status.unwrap_or_else(|| panic!("guest-init did not end; log:\n{}", init.log_text()));
    assert!(libc::WIFSIGNALED(status) || libc::WIFEXITED(status), "{status:#x}");
    assert!(init.log_text().contains("shutting down"), "{}", init.log_text());
}

#[test]
fn as_pid1_of_a_child_namespace_it_refuses_guest_mode() {
    if !have_root("refuses_guest_mode_in_namespace") {
        return;
    }
    // No --listen-unix: guest mode, whose mounts must never happen in a container on a host.
    let mut init = Init::spawn(&[], None);
    let status = init.wait_exit(Duration::from_secs(10)).expect("it exits");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 2, "{status:#x}");
    assert!(init.log_text().contains("must run as PID 1 of a guest"), "{}", init.log_text());
}
