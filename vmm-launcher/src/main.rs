//! `my_hypervisor-vmm-launcher`. The broker's spawn path and the sandbox it applies come
//! with the broker's spawn request and the VMM sandbox; until then this binary refuses to
//! run, so that no VMM can ever start unconfined by accident.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("my_hypervisor-vmm-launcher: the VMM sandbox is not built yet; refusing to start a VMM");
    ExitCode::FAILURE
}
