//! `my_hypervisor-init`, the guest's PID 1. Its exec service over vsock is not built yet;
//! until it is, the binary says so and exits instead of pretending to serve.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("my_hypervisor-init: the guest exec service is not built yet");
    ExitCode::FAILURE
}
