//! `my_hypervisor-vmm-launcher`: the broker's spawn helper starts it as the VM's uid, with
//! no capabilities and only the VMM's fds, and it execs cloud-hypervisor with the argv the
//! broker built.
//!
//! It does not yet apply Landlock or seccomp of its own (the VMM sandbox issue adds them):
//! until then the VMM is confined only by its uid, the empty capability sets and
//! no_new_privs, and the launcher says so in the VMM's log at every start.

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "my_hypervisor-vmm-launcher",
    version,
    about = "Confines one cloud-hypervisor, then execs it (started by the broker)"
)]
struct Args {
    /// The VM this VMM serves (for the log).
    #[arg(long)]
    vm: String,
    /// cloud-hypervisor and its arguments, as the broker built them.
    #[arg(last = true, required = true)]
    vmm: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "my_hypervisor-vmm-launcher: vm {}: no Landlock or seccomp sandbox is applied yet; the VMM runs as its own uid with no capabilities",
        args.vm
    );
    let err = Command::new(&args.vmm[0]).args(&args.vmm[1..]).exec();
    eprintln!("my_hypervisor-vmm-launcher: exec {}: {err}", args.vmm[0]);
    ExitCode::FAILURE
}
