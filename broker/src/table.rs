//! The dispatch table: every request the frontend can make, the broker state it requires,
//! and the checks made before anything changes. Nothing else can reach the broker: the
//! request type is a closed enum, and a datagram that does not decode to exactly one of
//! these ends the channel.
//!
//! "(policy)" checks are stateless and run first, for every request, in
//! `my_hypervisor_policy::request::check`; the rest need the broker's records.
//!
//! | request     | requires                 | checks, in order                                                     |
//! |-------------|--------------------------|----------------------------------------------------------------------|
//! | KvmCheck    | —                        | /dev/kvm opens read-write; KVM_GET_API_VERSION is 12                 |
//! | Prepare     | VM unknown               | (policy) id, 1..=11 images, at most 8 disks, one kernel/initramfs/firmware, path text; a free uid; runtime dir is new; each image: under an image root, openat2 beneath it without symlinks, regular file, dirs above searchable, a writable disk held by no other VM and owner-rw |
//! | CreateTap   | VM prepared, not spawned | (policy) id, mac, mtu range, bridge name; the bridge is an --allowed-bridge; at most MAX_NETS taps |
//! | Spawn       | VM prepared, not spawned | (policy) id, vcpus, memory, cmdline; cloud-hypervisor found; the whole plan re-checked |
//! | Connect     | VMM spawned and alive    | (policy) id; node opened O_PATH|O_NOFOLLOW is a socket owned by the VM uid |
//! | OpenOutputs | VMM spawned              | (policy) id                                                          |
//! | Signal      | VMM spawned and alive    | (policy) id; TERM, KILL or CONT only (the type allows no other)      |
//! | Release     | —                        | (policy) id; a VM the broker does not hold is already released       |
//! | Inventory   | —                        | —                                                                    |
//!
//! Every request, allowed or refused, is one audit line (see `serve`).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use my_hypervisor_broker_proto::{ExitStatus, HeldVm, Reply, Request};
use my_hypervisor_policy::request;
use my_hypervisor_policy::vmm::{FieldError, MAX_NETS};

use crate::images::Grant;
use crate::{images, kvm, vmm};

pub struct Broker {
    pub run_dir: PathBuf,
    pub run_fd: OwnedFd,
    pub image_roots: Vec<(PathBuf, OwnedFd)>,
    pub vm_uids: RangeInclusive<u32>,
    pub cloud_hypervisor: Option<PathBuf>,
    pub spawner: OwnedFd,
    pub sandbox: SandboxOptions,
    pub allowed_bridges: Vec<String>,
    pub vms: BTreeMap<String, Vm>,
}

/// Debugging switches for every VMM's sandbox (flags of the daemon).
#[derive(Debug, Clone, Copy)]
pub struct SandboxOptions {
    pub seccomp: my_hypervisor_policy::seccomp::Mode,
    pub landlock_best_effort: bool,
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
    pub fd: OwnedFd,
}

pub enum Vmm {
    NotSpawned,
    /// `exe` is the cloud-hypervisor binary the launcher was told to exec.
    Alive {
        pid: u32,
        pidfd: OwnedFd,
        exe: String,
        outputs: vmm::Outputs,
    },
    Exited {
        pid: u32,
        status: ExitStatus,
        outputs: vmm::Outputs,
    },
}

/// Why a request was refused; nothing was changed.
#[derive(Debug)]
pub struct Refusal(pub String);

impl<E: std::fmt::Display> From<E> for Refusal {
    fn from(e: E) -> Self {
        Refusal(e.to_string())
    }
}

pub type Outcome = Result<(Reply, Vec<OwnedFd>), Refusal>;

fn refuse<T>(why: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(why.into()))
}

impl Broker {
    fn vm(&mut self, id: &str) -> Result<&mut Vm, Refusal> {
        self.vms.get_mut(id).ok_or_else(|| Refusal(format!("VM {id} was never prepared")))
    }

    fn unspawned(&mut self, id: &str) -> Result<&mut Vm, Refusal> {
        let vm = self.vm(id)?;
        if !matches!(vm.vmm, Vmm::NotSpawned) {
            return refuse(format!("VM {id} was already spawned; a VM is spawned at most once per prepare"));
        }
        Ok(vm)
    }

    fn alive(&mut self, id: &str) -> Result<&mut Vm, Refusal> {
        let vm = self.vm(id)?;
        match vm.vmm {
            Vmm::Alive { .. } => Ok(vm),
            Vmm::NotSpawned => refuse(format!("VM {id} has no VMM: it was never spawned")),
            Vmm::Exited { .. } => refuse(format!("the VMM of VM {id} has exited")),
        }
    }
}

pub fn dispatch(b: &mut Broker, req: &Request) -> Outcome {
    // Every field of every request first (the "(policy)" checks above).
    request::check(req)?;
    match req {
        Request::KvmCheck => {
            let (api_version, extensions) = kvm::check()?;
            Ok((Reply::Kvm { api_version, extensions }, vec![]))
        }
        Request::Prepare { vm, images } => {
            if b.vms.contains_key(vm) {
                return refuse(format!("VM {vm} is already prepared"));
            }
            let uid = vmm::free_uid(b)?;
            let record = images::prepare(b, vm, uid, images)?;
            let reply = Reply::Prepared { uid, run_dir: b.run_dir.join(vm).to_string_lossy().into_owned() };
            b.vms.insert(vm.clone(), record);
            Ok((reply, vec![]))
        }
        Request::CreateTap { vm, mac, mtu, bridge } => {
            if let Some(br) = bridge.as_ref().filter(|br| !b.allowed_bridges.contains(br)) {
                return refuse(format!("bridge {br} is not one the daemon allows (--allowed-bridge)"));
            }
            let v = b.unspawned(vm)?;
            if v.taps.len() >= MAX_NETS {
                return Err(FieldError::Range {
                    field: "nets",
                    min: 0,
                    max: MAX_NETS as u64,
                    got: v.taps.len() as u64 + 1,
                }
                .into());
            }
            let name = my_hypervisor_policy::vmm::tap_name(v.uid, v.taps.len());
            let fd = crate::tap::create(&name, *mtu, bridge.as_deref())?;
            v.taps.push(Tap { name: name.clone(), mac: mac.clone(), fd });
            Ok((Reply::Tap { name }, vec![]))
        }
        Request::Spawn { vm, config } => {
            b.unspawned(vm)?;
            vmm::spawn(b, vm, config)
        }
        Request::Connect { vm, role } => vmm::connect(b.alive(vm)?, *role),
        Request::OpenOutputs { vm } => match &b.vm(vm)?.vmm {
            Vmm::Alive { outputs, .. } | Vmm::Exited { outputs, .. } => Ok((Reply::Outputs, outputs.reopen()?)),
            Vmm::NotSpawned => refuse(format!("VM {vm} was never spawned")),
        },
        Request::Signal { vm, signal } => {
            vmm::signal(b.alive(vm)?, *signal)?;
            Ok((Reply::Signalled, vec![]))
        }
        Request::Release { vm } => {
            vmm::release(b, vm)?;
            Ok((Reply::Released, vec![]))
        }
        Request::Inventory => {
            let vms = b
                .vms
                .iter()
                .map(|(id, v)| {
                    let (pid, alive, exit) = match v.vmm {
                        Vmm::NotSpawned => (None, false, None),
                        Vmm::Alive { pid, .. } => (Some(pid), true, None),
                        Vmm::Exited { pid, status, .. } => (Some(pid), false, Some(status)),
                    };
                    HeldVm { vm: id.clone(), uid: v.uid, pid, alive, exit }
                })
                .collect();
            Ok((Reply::Inventory { vms }, vec![]))
        }
    }
}
