//! The request table's handlers. The table itself, one row per request with the VM state
//! it requires, whether it changes the journal, its reply's fds and whether it may repeat,
//! is `my_hypervisor_policy::request::TABLE` (docs/adr/0002-broker.md shows it); [`serve`]
//! enforces the row, every field (`request::check`) and the journal's health before any
//! handler runs, and rewrites the journal after a request that changes it. Nothing else can
//! reach the broker: the request type is a closed enum, and a datagram that does not decode
//! to exactly one of these ends the channel.
//!
//! What the handlers check beyond the row, in order:
//!
//! | request     | checks                                                                                  |
//! |-------------|-----------------------------------------------------------------------------------------|
//! | KvmCheck    | /dev/kvm opens read-write; KVM_GET_API_VERSION is 12                                    |
//! | Prepare     | a free uid; runtime dir is new; each image (images.rs): under an image root, opened O_PATH beneath it without symlinks, a regular file with one link, dirs above searchable, a writable disk held by no other VM and owner-rw, then reopened |
//! | CreateTap   | the bridge is an --allowed-bridge; at most MAX_NETS taps                                 |
//! | Spawn       | cloud-hypervisor passed the start-up check (ch.rs), v52+ with nets; the plan re-checked                                       |
//! | Connect     | node opened O_PATH\|O_NOFOLLOW is a socket owned by the VM uid                          |
//! | OpenOutputs | —                                                                                       |
//! | Signal      | TERM, KILL or CONT only (the type allows no other)                                      |
//! | Release     | a VM the broker does not hold is already released                                       |
//! | Inventory   | —                                                                                       |
//! | TrimLog     | the broker's own fd of the log, reopened for writing; the range from policy             |
//! | Sandbox     | sandbox.txt is a regular root-owned file with one link; applied is read from /proc       |
//! | Serving     | — (READY=1 goes out on the first only)                                                  |
//!
//! Every request, allowed or refused, is one audit line (see `supervise::serve_one`).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use my_hypervisor_broker_proto::{ExitStatus, HeldVm, Reply, Request};
use my_hypervisor_policy::acl::Shares;
pub use my_hypervisor_policy::refusal::Refusal;
use my_hypervisor_policy::request::{self, Held, StateError};
use my_hypervisor_policy::sandbox::SandboxOptions;
use my_hypervisor_policy::vmm::{MAX_NETS, check_bridge, check_range};

use crate::images::Grant;
use crate::{images, journal, kvm, vmm};

pub struct Broker {
    pub run_dir: PathBuf,
    pub run_fd: OwnedFd,
    pub image_roots: Vec<(PathBuf, OwnedFd)>,
    pub vm_uids: RangeInclusive<u32>,
    pub cloud_hypervisor: crate::ch::Checked,
    /// Connected to `$NOTIFY_SOCKET`, until READY=1 is sent.
    pub notify: Option<std::os::unix::net::UnixDatagram>,
    pub spawner: OwnedFd,
    pub sandbox: SandboxOptions,
    pub allowed_bridges: Vec<String>,
    pub vms: BTreeMap<String, Vm>,
    /// Read-only images granted by ACL, by inode: how many grants, and what to restore.
    pub acls: Shares,
    /// The last journal write failed: state-changing requests but Release are refused
    /// until a write succeeds.
    pub journal_failed: bool,
    /// Where fds that came with a request go: never closed on the broker's thread.
    pub strays: crate::strays::Strays,
}

/// The broker's own record of a VM: what it granted, created and spawned.
pub struct Vm {
    pub uid: u32,
    pub dir: OwnedFd,
    pub grants: Vec<Grant>,
    pub taps: Vec<Tap>,
    pub vmm: Vmm,
}

pub struct Tap {
    pub name: String,
    pub mac: Option<String>,
    /// None for a tap taken up from the journal: released by name.
    pub fd: Option<OwnedFd>,
}

pub enum Vmm {
    NotSpawned,
    /// `exe` is the cloud-hypervisor binary the launcher was told to exec.
    Alive {
        pid: u32,
        pidfd: OwnedFd,
        exe: String,
        outputs: vmm::Outputs,
        /// Re-adopted after a daemon restart: not the broker's child, watched by its pidfd.
        adopted: bool,
        /// Read once, while the pid surely names the VMM (the journal's reuse check).
        start_time: Option<u64>,
    },
    Exited {
        pid: u32,
        status: ExitStatus,
        outputs: vmm::Outputs,
    },
}

/// What a handler returns: the reply and its fds.
pub type Handled = Result<(Reply, Vec<OwnedFd>), Refusal>;

impl Vmm {
    /// The state the request table checks, and the pid and exit status the Inventory shows.
    fn summary(&self) -> (Held, Option<u32>, Option<ExitStatus>) {
        match *self {
            Vmm::NotSpawned => (Held::Prepared, None, None),
            Vmm::Alive { pid, .. } => (Held::Alive, Some(pid), None),
            Vmm::Exited { pid, status, .. } => (Held::Exited, Some(pid), Some(status)),
        }
    }
}

impl Broker {
    fn held(&self, id: &str) -> Held {
        self.vms.get(id).map_or(Held::Unknown, |v| v.vmm.summary().0)
    }

    fn vm(&mut self, id: &str) -> Result<&mut Vm, Refusal> {
        self.vms.get_mut(id).ok_or_else(|| StateError::NotPrepared(id.to_string()).into())
    }
}

/// Enforces the request's row of the table, then runs its handler, then rewrites the
/// journal if the row says the request changes it. A change the journal cannot record is
/// undone and refused (a spawned VMM is killed), so the journal never holds less than the
/// broker does.
pub fn serve(b: &mut Broker, req: &Request) -> Handled {
    request::check(req)?;
    let (row, vm) = request::row_of(req);
    if let Some(vm) = vm {
        request::admit(row, vm, b.held(vm))?;
    }
    let release = matches!(req, Request::Release { .. });
    if row.journal && !release && b.journal_failed {
        journal::commit(b).map_err(Refusal::Journal)?;
    }
    let (reply, fds) = dispatch(b, req)?;
    if row.journal
        && let Err(e) = journal::commit(b)
        && !release
    {
        match req {
            Request::Prepare { vm, .. } => drop(vmm::release(b, vm)),
            Request::CreateTap { vm, .. } => drop(b.vm(vm)?.taps.pop()),
            Request::Spawn { vm, .. } => vmm::stop(b, vm)?,
            _ => {}
        }
        return Err(Refusal::Journal(e));
    }
    if fds.len() != usize::from(row.reply_fds) {
        return Err(Refusal::ReplyFds { got: fds.len(), row: row.reply_fds });
    }
    Ok((reply, fds))
}

fn dispatch(b: &mut Broker, req: &Request) -> Handled {
    match req {
        Request::KvmCheck => Ok((kvm::check().map_err(Refusal::Kvm)?, vec![])),
        Request::Prepare { vm, images } => {
            let uid = vmm::free_uid(b)?;
            let record = images::prepare(b, vm, uid, images)?;
            let reply = Reply::Prepared { uid, run_dir: b.run_dir.join(vm).to_string_lossy().into_owned() };
            b.vms.insert(vm.clone(), record);
            Ok((reply, vec![]))
        }
        Request::CreateTap { vm, mac, mtu, bridge } => {
            check_bridge(&b.allowed_bridges, bridge.as_deref()).map_err(Refusal::Bridge)?;
            let v = b.vm(vm)?;
            check_range("nets", v.taps.len() as u64 + 1, 0, MAX_NETS as u64)?;
            let name = my_hypervisor_policy::vmm::tap_name(v.uid, v.taps.len());
            let fd = crate::tap::create(&name, *mtu, bridge.as_deref()).map_err(Refusal::Tap)?;
            v.taps.push(Tap { name: name.clone(), mac: mac.clone(), fd: Some(fd) });
            Ok((Reply::Tap { name }, vec![]))
        }
        Request::Spawn { vm, config } => vmm::spawn(b, vm, config),
        Request::Connect { vm, role } => vmm::connect(b.vm(vm)?, *role),
        Request::OpenOutputs { vm } => match &b.vm(vm)?.vmm {
            Vmm::Alive { outputs, .. } | Vmm::Exited { outputs, .. } => Ok((Reply::Outputs, outputs.reopen()?)),
            Vmm::NotSpawned => Err(StateError::NeverSpawned(vm.clone()).into()),
        },
        Request::Signal { vm, signal } => vmm::signal(b.vm(vm)?, *signal).map(|()| (Reply::Signalled, vec![])),
        Request::Release { vm } => vmm::release(b, vm).map(|()| (Reply::Released, vec![])),
        Request::Inventory => {
            let vms = b.vms.iter().map(|(id, v)| {
                let (held, pid, exit) = v.vmm.summary();
                HeldVm { vm: id.clone(), uid: v.uid, pid, alive: held == Held::Alive, exit }
            });
            Ok((Reply::Inventory { vms: vms.collect() }, vec![]))
        }
        Request::Serving => Ok((Reply::Noted, vec![])).inspect(|_| crate::notify::ready(b.notify.take())),
        Request::TrimLog { vm } => match &b.vm(vm)?.vmm {
            Vmm::Alive { outputs, .. } => Ok((Reply::Trimmed, outputs.trim_log().map(|()| vec![])?)),
            _ => Err(StateError::Exited(vm.clone()).into()),
        },
        Request::Sandbox { vm } => vmm::sandbox(b.vm(vm)?),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use my_hypervisor_broker_proto::{Envelope, Image, ImageRole, PROTOCOL_VERSION, VmmSignal, recv, send};
    use nix::fcntl::{OFlag, open};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use nix::sys::stat::Mode;

    use super::*;
    use my_hypervisor_policy::sandbox::SandboxOptions;

    pub(crate) fn broker(dir: &Path) -> Broker {
        let (spawner, helper) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        // A stand-in for the spawn helper: it mounts no run dir tmpfs, and answers every order
        // with success, so that a Prepare gets as far as its images.
        std::thread::spawn(move || {
            while let Ok((env, _)) = recv::<crate::spawner::Order>(&helper) {
                let reply = Envelope { version: PROTOCOL_VERSION, id: env.id, fds: 0, body: Ok::<u32, String>(0) };
                if send(&helper, reply, &[]).is_err() {
                    break;
                }
            }
        });
        Broker {
            run_dir: dir.to_path_buf(),
            run_fd: open(dir, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).unwrap(),
            image_roots: vec![],
            vm_uids: 62060..=62069,
            cloud_hypervisor: Err("none".into()),
            notify: None,
            spawner,
            sandbox: SandboxOptions { seccomp: my_hypervisor_policy::seccomp::Mode::Kill, landlock_best_effort: false },
            allowed_bridges: vec![],
            vms: BTreeMap::new(),
            acls: Shares::default(),
            journal_failed: false,
            strays: crate::strays::Strays::Refused,
        }
    }

    /// Refusals are typed: the field check, the row's state, the journal's health and an
    /// image's check each give their own variant, before any handler changes anything.
    #[test]
    fn refusals_are_typed_and_the_journal_fails_closed() {
        let dir = PathBuf::from(format!("/var/tmp/myhv-table-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let mut b = broker(&dir);
        let prepare = || Request::Prepare {
            vm: "a".into(),
            images: vec![Image { path: "/nowhere/vmlinux".into(), role: ImageRole::Kernel }],
        };
        assert!(matches!(serve(&mut b, &Request::Release { vm: "A".into() }), Err(Refusal::Field(_))));
        let signal = Request::Signal { vm: "a".into(), signal: VmmSignal::Term };
        assert!(matches!(serve(&mut b, &signal), Err(Refusal::State(StateError::NotPrepared(_)))));

        // The journal cannot be written: Release is still served, Prepare is refused.
        std::fs::create_dir(dir.join(format!("{}.tmp", journal::FILE))).unwrap();
        assert!(matches!(serve(&mut b, &Request::Release { vm: "a".into() }), Ok((Reply::Released, _))));
        assert!(b.journal_failed);
        assert!(matches!(serve(&mut b, &prepare()), Err(Refusal::Journal(_))));
        assert!(matches!(serve(&mut b, &Request::Inventory), Ok((Reply::Inventory { .. }, _))));
        std::fs::remove_dir(dir.join(format!("{}.tmp", journal::FILE))).unwrap();

        if nix::unistd::geteuid().is_root() {
            // Writable again: the journal is retried first, then the image is refused.
            let r = serve(&mut b, &prepare());
            assert!(matches!(r, Err(Refusal::Image { ref why, .. }) if why == "is not under any image root"), "{r:?}");
            assert!(!b.journal_failed && !dir.join("a").exists());
        } else {
            eprintln!("SKIP refusals_are_typed_and_the_journal_fails_closed (image part): needs root to chown");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
