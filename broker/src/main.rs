//! `my_hypervisor-daemon`: the root entry point and the broker.
//!
//! Start-up order matters and runs before any thread exists: bind the RPC socket, create the
//! broker channel, start the unprivileged frontend. Any failure there stops the daemon. The
//! broker then supervises the frontend and serves its requests, in one thread.

mod adopt;
mod ch;
mod cli;
mod confine;
mod dirs;
mod images;
mod journal;
mod kvm;
mod notify;
mod spawner;
mod strays;
mod supervise;
mod table;
mod tap;
mod unpriv;
mod vmm;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    cli::init_logging(args.log_format);
    let Err(e) = supervise::run(&args) else { return ExitCode::SUCCESS };
    tracing::error!(error = %e, "daemon stopped");
    ExitCode::FAILURE
}
