//! `my_hypervisor-frontend-launcher`: the broker's spawn helper starts it as PID 1 of the
//! frontend's fresh namespaces, as the frontend's uid, with no capabilities, no_new_privs and
//! an empty environment. It applies the frontend's Landlock rules and seccomp filter
//! (`my_hypervisor_policy::frontend`) to itself, then execs the frontend binary the broker
//! pinned (fd 5), so that any frontend binary runs confined. A step that fails is written to
//! fd 6, which the broker reads: the frontend then failed to start.

use std::ffi::{CString, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use clap::Parser;
use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};
use my_hypervisor_policy::frontend::{EXE_FD, REPORT_FD, allow_list, clone3_filter, exe_access, landlock_rules};
use my_hypervisor_policy::sandbox::LANDLOCK_ABI;
use my_hypervisor_policy::seccomp::{self, Mode};

#[derive(Debug, Parser)]
#[command(name = "my_hypervisor-frontend-launcher", version, about = "Confines the frontend, then execs it")]
struct Args {
    #[arg(long)]
    state_dir: String,
    #[arg(long)]
    console_dir: String,
    /// What the filter does with a syscall outside the allow-list (kill; log or errno to debug).
    #[arg(long, default_value = "kill", value_parser = str::parse::<Mode>)]
    seccomp: Mode,
    /// Apply Landlock as far as the kernel supports it instead of requiring it.
    #[arg(long)]
    landlock_best_effort: bool,
    /// The frontend's argv (argv[0] first).
    #[arg(last = true, required = true)]
    frontend: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Refused(String),
    #[error("{step}: {source}")]
    Step { step: &'static str, source: Box<dyn std::error::Error> },
}

fn step<E: std::error::Error + 'static>(step: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Step { step, source: Box::new(e) }
}

fn main() -> ExitCode {
    let err = match Args::try_parse().map_err(|e| Error::Refused(e.to_string())).and_then(|args| launch(&args)) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let line = format!("frontend sandbox: {err}\n");
    eprint!("my_hypervisor-frontend-launcher: {line}");
    // SAFETY: writes a byte buffer to an fd number; a closed fd only makes it fail.
    unsafe { libc::write(REPORT_FD, line.as_ptr().cast(), line.len()) };
    ExitCode::FAILURE
}

fn launch(args: &Args) -> Result<std::convert::Infallible, Error> {
    let argv: Vec<CString> = args
        .frontend
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| Error::Refused("NUL in an argument".into())))
        .collect::<Result<_, _>>()?;
    for fd in [EXE_FD, REPORT_FD] {
        // SAFETY: F_SETFD on an integer fd has no memory effects; it fails on a closed fd.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(Error::Step { step: "inherited fd", source: Box::new(std::io::Error::last_os_error()) });
        }
    }
    landlock(args)?;
    let filter = seccomp::compile(&allow_list(), args.seccomp).map_err(step("compile seccomp filter"))?;
    let clone3 = clone3_filter().map_err(step("compile clone3 filter"))?;
    // The clone3 filter first: the main filter does not allow installing another.
    seccompiler::apply_filter(&clone3).map_err(step("install clone3 filter"))?;
    seccompiler::apply_filter(&filter).map_err(step("install seccomp filter"))?;
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let env: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: argv and env are NUL-terminated arrays of C strings that outlive the call; on
    // success the call does not return.
    unsafe {
        libc::syscall(libc::SYS_execveat, EXE_FD, c"".as_ptr(), ptrs.as_ptr(), env.as_ptr(), libc::AT_EMPTY_PATH)
    };
    Err(Error::Step { step: "exec the frontend", source: Box::new(std::io::Error::last_os_error()) })
}

/// Every filesystem right is handled and only the policy's paths and the frontend binary get
/// any; all TCP binds and connects are denied; abstract Unix sockets and signals are scoped.
fn landlock(args: &Args) -> Result<(), Error> {
    let level = if args.landlock_best_effort { CompatLevel::BestEffort } else { CompatLevel::HardRequirement };
    let mut ruleset = Ruleset::default()
        .set_compatibility(level)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .and_then(|r| r.handle_access(AccessNet::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.scope(Scope::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.create())
        .map_err(step("landlock ruleset"))?;
    // SAFETY: EXE_FD was checked open above and stays open (close-on-exec) until the exec.
    let exe = unsafe { BorrowedFd::borrow_raw(EXE_FD) };
    ruleset = ruleset.add_rule(PathBeneath::new(exe, exe_access())).map_err(step("landlock rule for the binary"))?;
    for rule in landlock_rules(&args.state_dir, &args.console_dir) {
        let fd = match PathFd::new(&rule.path) {
            Ok(fd) => fd,
            Err(_) if rule.optional => continue,
            Err(e) => return Err(Error::Step { step: "landlock rule path", source: Box::new(e) }),
        };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, rule.access)).map_err(step("landlock rule"))?;
    }
    let status = ruleset.restrict_self().map_err(step("landlock restrict_self"))?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(()),
        _ if args.landlock_best_effort => {
            eprintln!("my_hypervisor-frontend-launcher: warning: landlock only {:?} on this kernel", status.ruleset);
            Ok(())
        }
        other => Err(Error::Refused(format!("landlock is {other:?}, and a hard requirement"))),
    }
}
