//! `my_hypervisor-vmm-launcher`: the broker's spawn helper starts it in the VMM's fresh
//! namespaces, as the VM's uid, with no capabilities, no_new_privs, an empty environment and
//! only the VMM's fds. It applies the rest of the sandbox its `SandboxSpec` describes (a new
//! session, umask 077, rlimits, Landlock, seccomp) and execs cloud-hypervisor with the argv
//! the broker built. Any step that fails stops the start, and the error names the step.
//!
//! `--explain <vm-config>` prints a VM's exact effective sandbox instead.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::Parser;
use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};
use my_hypervisor_policy::sandbox::{LANDLOCK_ABI, RLIMITS, SandboxSpec};
use my_hypervisor_policy::{seccomp, vmm_filter};

#[derive(Debug, Parser)]
#[command(
    name = "my_hypervisor-vmm-launcher",
    version,
    about = "Confines one cloud-hypervisor, then execs it (started by the broker)"
)]
struct Args {
    /// Print the effective sandbox of the VM whose SandboxSpec (JSON) is in this file, and exit.
    #[arg(long, conflicts_with = "spec")]
    explain: Option<PathBuf>,
    /// The VM's SandboxSpec, as JSON.
    #[arg(long, required_unless_present = "explain")]
    spec: Option<String>,
    /// cloud-hypervisor and its arguments, as the broker built them.
    #[arg(last = true)]
    vmm: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Spec(String),
    #[error("{step}: {source}")]
    Step { step: &'static str, source: Box<dyn std::error::Error> },
}

fn step<E: std::error::Error + 'static>(step: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Step { step, source: Box::new(e) }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(file) = &args.explain {
        let spec = std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str::<SandboxSpec>(&s).map_err(|e| e.to_string()));
        return match spec {
            Ok(spec) => {
                print!("{}", spec.report());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("my_hypervisor-vmm-launcher: {}: {e}", file.display());
                ExitCode::FAILURE
            }
        };
    }
    let err = match launch(&args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("my_hypervisor-vmm-launcher: {err}; the VMM is not started");
    ExitCode::FAILURE
}

fn launch(args: &Args) -> Result<std::convert::Infallible, Error> {
    let spec: SandboxSpec =
        serde_json::from_str(args.spec.as_deref().unwrap_or_default()).map_err(step("read the sandbox spec"))?;
    let mut expected = vec![spec.cloud_hypervisor.clone()];
    expected.extend(spec.plan.args());
    if args.vmm != expected {
        return Err(Error::Spec("the VMM argv does not match the VM's plan".into()));
    }
    nix::unistd::setsid().map_err(step("setsid"))?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    set_rlimits()?;
    let status = landlock(&spec)?;
    let seccomp_filters = [
        seccomp::compile(&seccomp::vmm_allow_list(), spec.seccomp).map_err(step("compile the seccomp filter"))?,
        vmm_filter::vmm_second_filter(spec.seccomp),
    ];
    eprintln!(
        "my_hypervisor-vmm-launcher: vm {}: uid {}, landlock ABI {} {:?}, seccomp {:?}; exec {}",
        spec.vm, spec.uid, LANDLOCK_ABI as u32, status.ruleset, spec.seccomp, spec.cloud_hypervisor
    );
    for f in &seccomp_filters {
        seccompiler::apply_filter(f).map_err(step("install the seccomp filter"))?;
    }
    let err = Command::new(&args.vmm[0]).args(&args.vmm[1..]).env_clear().exec();
    Err(Error::Step { step: "exec cloud-hypervisor", source: Box::new(err) })
}

fn set_rlimits() -> Result<(), Error> {
    use nix::sys::resource::{Resource, setrlimit};
    for &(name, limit) in RLIMITS {
        let resource = match name {
            "RLIMIT_CORE" => Resource::RLIMIT_CORE,
            "RLIMIT_NOFILE" => Resource::RLIMIT_NOFILE,
            "RLIMIT_NPROC" => Resource::RLIMIT_NPROC,
            other => return Err(Error::Spec(format!("unknown rlimit {other}"))),
        };
        setrlimit(resource, limit, limit).map_err(step("setrlimit"))?;
    }
    Ok(())
}

/// Applies the VM's Landlock rules: every filesystem right is handled and only the listed
/// paths get any; all TCP binds and connects are denied; abstract Unix sockets and signals
/// are scoped to the VMM.
fn landlock(spec: &SandboxSpec) -> Result<RestrictionStatus, Error> {
    let level = if spec.landlock_best_effort { CompatLevel::BestEffort } else { CompatLevel::HardRequirement };
    let mut ruleset = Ruleset::default()
        .set_compatibility(level)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .and_then(|r| r.handle_access(AccessNet::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.scope(Scope::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.create())
        .map_err(step("landlock ruleset"))?;
    for rule in spec.landlock_rules() {
        let fd = match PathFd::new(&rule.path) {
            Ok(fd) => fd,
            Err(_) if rule.optional => continue,
            Err(e) => return Err(Error::Step { step: "landlock rule path", source: Box::new(e) }),
        };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, rule.access)).map_err(step("landlock rule"))?;
    }
    let status = ruleset.restrict_self().map_err(step("landlock restrict_self"))?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => {}
        _ if spec.landlock_best_effort => {
            eprintln!("my_hypervisor-vmm-launcher: warning: landlock only {:?} on this kernel", status.ruleset)
        }
        other => return Err(Error::Spec(format!("landlock is {other:?}, and a hard requirement"))),
    }
    Ok(status)
}
