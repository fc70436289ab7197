//! Daemon restarts through the real daemon, as root (issue 14, cases b to d, and a reused
//! pid): the cloud-hypervisor test double by default, or a real cloud-hypervisor when
//! `MYHV_CLOUD_HYPERVISOR` names one. Case a (the frontend killed) is in tests/daemon.rs.
//! VM uids 63300-63399, ten per test.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use my_hypervisor_policy::journal::Entry;
use my_hypervisor_tests::{Daemon, have_root, proc_status, pvh, scratch_root, staged_bin, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const GUEST_LINE: &str = "my_hypervisor restart guest";

struct Env {
    d: Daemon,
    args: Vec<String>,
    uids: std::ops::RangeInclusive<u32>,
}

impl Drop for Env {
    /// A test's VMMs must not outlive it: a last daemon that stops its VMs on exit adopts
    /// and releases whatever the test left.
    fn drop(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        if self.d.child.try_wait().ok().flatten().is_none() {
            self.d.restart(Signal::SIGKILL, &args, true);
        }
    }
}

impl Env {
    fn start(test: &str, slot: u32) -> Option<Env> {
        if !have_root(test) {
            return None;
        }
        let root = scratch_root();
        let vmm = std::env::var("MYHV_CLOUD_HYPERVISOR")
            .unwrap_or_else(|_| staged_bin(root.path(), "ch-double").to_string_lossy().into_owned());
        let first = 63300 + 10 * slot;
        let uids = first..=first + 9;
        let args = vec!["--cloud-hypervisor".into(), vmm, "--vm-uid-range".into(), format!("{first}-{}", first + 9)];
        let d = Daemon::start_keeping_vms(root, &args.iter().map(String::as_str).collect::<Vec<_>>());
        Some(Env { d, args, uids })
    }

    fn restart(&mut self, sig: Signal) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.d.restart(sig, &args, false);
    }

    /// Stops the daemon (SIGTERM, the default keeps VMs running) and leaves it down.
    fn stop_daemon(&mut self) {
        kill(Pid::from_raw(self.d.pid()), Signal::SIGTERM).expect("term");
        let status = wait_for("the daemon to exit", Duration::from_secs(15), || self.d.child.try_wait().ok().flatten());
        assert!(status.success(), "{status}");
    }

    /// Starts the daemon again after it exited.
    fn start_daemon(&mut self) {
        self.restart(Signal::SIGTERM);
    }

    fn rpc(&self, method: &str, params: Value) -> Value {
        let reply = self.d.call(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
        assert!(reply.get("error").is_none(), "{method} {params}: {reply}\n{}", self.d.log());
        reply["result"].clone()
    }

    /// A VM with a writable disk and a net, started; returns (its VMM pid, the disk path).
    fn start_vm(&self, id: &str) -> (i32, PathBuf) {
        let images = self.d.path("images");
        let kernel = images.join("guest.elf");
        std::fs::write(&kernel, pvh::guest(GUEST_LINE, false)).expect("guest");
        let disk = images.join(format!("{id}.raw"));
        std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
        std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        self.rpc(
            "compute.vm.create",
            json!({"id": id, "vcpus": 1, "memory_mib": 64, "kernel": kernel,
                   "disks": [{"path": disk, "readonly": false}], "nets": [{"mtu": 1400}]}),
        );
        assert_eq!(self.rpc("compute.vm.start", json!({"vm_id": id}))["state"], "running");
        (self.pid(id).expect("pid"), disk)
    }

    fn status(&self, id: &str) -> Value {
        self.rpc("compute.vm.status", json!({"vm_id": id}))
    }

    fn pid(&self, id: &str) -> Option<i32> {
        self.status(id)["pid"].as_i64().map(|p| p as i32)
    }

    fn wait_state(&self, id: &str, want: &str) -> String {
        wait_for(&format!("{id} to be {want}"), Duration::from_secs(20), || {
            (self.status(id)["state"] == want).then_some(())
        });
        let events = self.rpc("compute.vm.events.tail", json!({"vm_id": id}))["events"].clone();
        events
            .as_array()
            .and_then(|e| e.last())
            .map(|e| e["reason"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    fn taps(&self) -> Vec<String> {
        let names = std::fs::read_dir("/sys/class/net").into_iter().flatten().flatten();
        let names = names.map(|e| e.file_name().to_string_lossy().into_owned());
        names.filter(|n| self.uids.clone().any(|u| n.starts_with(&format!("mh{u}n")))).collect()
    }

    fn journal(&self) -> Vec<Entry> {
        postcard::from_bytes(&std::fs::read(self.d.path("run/vmm/broker.journal")).expect("journal")).expect("decode")
    }

    /// What a released VM held is gone: tap, disk owner, run dir, journal entry.
    fn assert_released(&self, id: &str, disk: &PathBuf) {
        assert_eq!(self.taps(), Vec::<String>::new(), "no tap left");
        let m = std::fs::metadata(disk).expect("disk");
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), 0, "disk handed back to root");
        assert!(!self.d.path(&format!("run/vmm/{id}")).exists(), "run dir removed");
        assert!(self.journal().iter().all(|e| e.vm != id), "no journal entry for {id}");
    }
}

/// Waits until every thread of `pid` has exited (a zombie leader may still have threads).
fn wait_exit(pid: i32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: the fd was just created and nothing else owns it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&fd), nix::poll::PollFlags::POLLIN)];
    assert_eq!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)), Ok(1), "pid {pid} exits");
}

fn alive(pid: i32) -> bool {
    proc_status(pid).is_some_and(|s| !s["State"].starts_with('Z'))
}

#[test]
fn a_stopped_daemon_leaves_vms_running_and_the_next_one_adopts_them() {
    let Some(mut env) = Env::start("a_stopped_daemon_leaves_vms_running_and_the_next_one_adopts_them", 0) else {
        return;
    };
    let (pid, disk) = env.start_vm("b");
    env.stop_daemon();
    assert!(alive(pid), "the VMM outlives the daemon");
    assert_eq!(env.taps().len(), 1, "its tap too");
    env.start_daemon();
    assert!(env.d.log().contains("VMM re-adopted from the journal"), "{}", env.d.log());
    assert_eq!(env.status("b")["state"], "running");
    assert_eq!(env.pid("b"), Some(pid), "the same VMM");
    assert!(alive(pid));
    // The new frontend serves the console again (once it has taken the VM up, which runs
    // alongside the first requests): the guest's boot line, replayed.
    let endpoint =
        json!({"jsonrpc": "2.0", "id": 1, "method": "compute.vm.console.endpoint", "params": {"vm_id": "b"}});
    let path = wait_for("the console endpoint", Duration::from_secs(10), || {
        env.d.call(&endpoint)["result"]["path"].as_str().map(PathBuf::from)
    });
    assert_eq!(env.status("b")["state"], "running", "{}", env.d.log());
    let mut c = wait_for("the console socket", Duration::from_secs(10), || UnixStream::connect(&path).ok());
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    while !got.windows(GUEST_LINE.len()).any(|w| w == GUEST_LINE.as_bytes()) {
        let n = c.read(&mut buf).expect("console read");
        assert!(n > 0, "EOF before the guest's line; got {:?}", String::from_utf8_lossy(&got));
        got.extend(&buf[..n]);
    }
    // A later stop still undoes everything the adopted VM holds: tap by name, disk owner, dir.
    assert_eq!(env.rpc("compute.vm.stop", json!({"vm_id": "b", "timeout_secs": 2}))["state"], "stopped");
    assert!(!alive(pid));
    env.rpc("compute.vm.remove", json!({"vm_id": "b"}));
    env.assert_released("b", &disk);
}

#[test]
fn a_vmm_killed_while_the_daemon_is_down_fails_and_is_released() {
    let Some(mut env) = Env::start("a_vmm_killed_while_the_daemon_is_down_fails_and_is_released", 1) else {
        return;
    };
    let (pid, disk) = env.start_vm("c");
    env.stop_daemon();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill the VMM");
    wait_exit(pid);
    env.start_daemon();
    let reason = env.wait_state("c", "failed");
    assert!(reason.contains("while the daemon was down"), "{reason}\n{}", env.d.log());
    env.assert_released("c", &disk);
    env.rpc("compute.vm.remove", json!({"vm_id": "c"}));
}

#[test]
fn a_daemon_killed_with_sigkill_loses_no_vm_and_ends_strays() {
    let Some(mut env) = Env::start("a_daemon_killed_with_sigkill_loses_no_vm_and_ends_strays", 2) else {
        return;
    };
    let (pid, disk) = env.start_vm("d");
    let frontend = env.d.frontend_pid();
    kill(Pid::from_raw(env.d.pid()), Signal::SIGKILL).expect("kill -9 the daemon");
    wait_for("the daemon to die", Duration::from_secs(10), || env.d.child.try_wait().ok().flatten());
    // Its frontend sees the broker channel close and exits.
    wait_for("the old frontend to exit", Duration::from_secs(10), || (!alive(frontend)).then_some(()));
    // A process under a VM uid that no journalled VM holds, as a VMM spawned just before
    // the kill would be.
    let stray_uid = *env.uids.end();
    let mut stray =
        std::process::Command::new("sleep").arg("300").uid(stray_uid).gid(stray_uid).spawn().expect("sleep");
    env.start_daemon();
    assert!(alive(pid), "the VMM survived the daemon's kill -9");
    assert_eq!(env.pid("d"), Some(pid));
    assert_eq!(env.status("d")["state"], "running");
    let ended = wait_for("the stray to end", Duration::from_secs(10), || stray.try_wait().ok().flatten());
    assert!(!ended.success(), "{ended}");
    assert!(env.d.log().contains("killing it"), "{}", env.d.log());
    assert_eq!(env.rpc("compute.vm.stop", json!({"vm_id": "d", "timeout_secs": 2}))["state"], "stopped");
    env.rpc("compute.vm.remove", json!({"vm_id": "d"}));
    env.assert_released("d", &disk);
}

#[test]
fn a_reused_pid_is_not_adopted() {
    let Some(mut env) = Env::start("a_reused_pid_is_not_adopted", 3) else { return };
    let (pid, disk) = env.start_vm("r");
    env.stop_daemon();
    // The recorded pid now names an unrelated process under another uid.
    let mut other = std::process::Command::new("sleep").arg("300").uid(65534).gid(65534).spawn().expect("sleep");
    let mut journal = env.journal();
    journal[0].pid = Some(other.id());
    let bytes = postcard::to_stdvec(&journal).expect("encode");
    std::fs::write(env.d.path("run/vmm/broker.journal"), bytes).expect("rewrite the journal");
    env.start_daemon();
    let reason = env.wait_state("r", "failed");
    assert!(reason.contains("while the daemon was down"), "{reason}");
    assert!(env.d.log().contains("the pid was reused"), "{}", env.d.log());
    assert!(other.try_wait().expect("wait").is_none(), "the unrelated process is not killed");
    // The VM's real VMM, now under no journalled VM, was ended as a stray.
    wait_for("the VMM to end", Duration::from_secs(10), || (!alive(pid)).then_some(()));
    env.assert_released("r", &disk);
    let _ = other.kill();
    let _ = other.wait();
}

#[test]
fn with_stop_vms_on_exit_the_vms_are_stopped_for_a_daemon_shutdown() {
    let Some(mut env) = Env::start("with_stop_vms_on_exit_the_vms_are_stopped_for_a_daemon_shutdown", 4) else {
        return;
    };
    let args: Vec<String> = env.args.clone();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (pid, disk) = env.start_vm("s");
    env.d.restart(Signal::SIGTERM, &args, true);
    assert_eq!(env.pid("s"), Some(pid), "adopted");
    env.stop_daemon();
    wait_exit(pid);
    env.assert_released("s", &disk);
    env.start_daemon();
    let reason = env.wait_state("s", "stopped");
    assert_eq!(reason, "daemon shutdown");
    env.rpc("compute.vm.remove", json!({"vm_id": "s"}));
}
