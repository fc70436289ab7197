//! Builds the static `my_hypervisor-init` that goes into guest images, as part of any build of
//! this package (so `cargo build --workspace` makes it with no extra step).
//!
//! Stable cargo cannot give one workspace member other rustflags, and `+crt-static` for the
//! whole build would reach the proc-macros. So this script runs a nested cargo for this one
//! binary with `--target <the build's target>` (rustflags then skip build scripts and
//! proc-macros) and `-C target-feature=+crt-static`, into its own target dir. The result is
//! a static-pie executable, with no PT_INTERP, at
//! `<target-dir>/static-init/<target>/<profile>/my_hypervisor-init`; its path reaches this
//! package's tests as `MYHV_STATIC_INIT`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Set in the nested build, whose own run of this script must do nothing.
const NESTED: &str = "MYHV_INIT_STATIC_BUILD";

fn main() {
    println!("cargo:rerun-if-env-changed={NESTED}");
    if env::var_os(NESTED).is_some() {
        return;
    }
    for path in ["src", "build.rs", "Cargo.toml", "proto/src", "proto/Cargo.toml", "../Cargo.lock"] {
        println!("cargo:rerun-if-changed={path}");
    }
    let var = |k: &str| env::var(k).unwrap_or_else(|_| panic!("cargo did not set {k}"));
    let target = var("TARGET");
    let profile = var("PROFILE");
    let manifest = PathBuf::from(var("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().expect("guest-init sits in the workspace").to_path_buf();
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { workspace.join(d) })
        .unwrap_or_else(|| workspace.join("target"))
        .join("static-init");

    let mut cmd = Command::new(var("CARGO"));
    cmd.current_dir(&workspace)
        .args(["build", "--offline", "--locked", "-p", "my_hypervisor-init"])
        .args(["--bin", "my_hypervisor-init", "--target", &target, "--target-dir"])
        .arg(&target_dir)
        .env(NESTED, "1")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        // Under `cargo clippy` the outer build lints; the nested one only compiles.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS");
    if profile == "release" {
        cmd.arg("--release");
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run cargo for the static init: {e}"));
    if !status.success() {
        panic!("building the static my_hypervisor-init failed ({status}); see the output above");
    }
    let bin = target_dir.join(&target).join(&profile).join("my_hypervisor-init");
    println!("cargo:rustc-env=MYHV_STATIC_INIT={}", bin.display());
}
