//! `cargo xtask lint`: rustfmt and clippy for the host crates, and clippy for the eBPF crate on
//! its own target with nightly. Runs every check, then fails if any failed.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    bootstrap::bootstrap,
    cmd::{self, say},
};

/// Runs all checks and reports the failed ones.
pub fn lint() -> Result<()> {
    let tools = bootstrap()?;
    let mut fmt = cmd::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let mut clippy = cmd::cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    let mut ebpf = cmd::nightly_cargo();
    ebpf.args([
        "clippy",
        "--package",
        "tcpshift-ebpf",
        "--target",
        "bpfel-unknown-none",
    ])
    .args(["-Z", "build-std=core", "--release", "--target-dir"])
    .arg(cmd::target_dir()?.join("ebpf-clippy"))
    .args(["--", "-D", "warnings"])
    .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &tools.bpf_linker);

    let checks: [(&str, &mut Command); 3] = [
        ("rustfmt", &mut fmt),
        ("clippy", &mut clippy),
        ("clippy (eBPF)", &mut ebpf),
    ];
    let mut failed = Vec::new();
    for (name, cmd) in checks {
        if let Err(e) = cmd::run(cmd) {
            say(format_args!("{name} ... FAILED: {e:#}"));
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    say("lint ... ok (rustfmt, clippy, clippy (eBPF))");
    Ok(())
}
