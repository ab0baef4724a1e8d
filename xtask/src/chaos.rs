//! `cargo xtask chaos`: builds the binaries and runs the fault suite (`tcpshift-chaos`, crate
//! `tcpshift-tests`) as root; the table goes to stdout, the report to target/chaos/.

use anyhow::{Result, bail};

use crate::{
    build::{Profile, build},
    cmd::{self, say},
};

/// Options of `cargo xtask chaos`.
#[derive(clap::Args, Debug, Default)]
pub struct ChaosArgs {
    /// The short variant (the one `cargo xtask test` runs): fewer faults, about 20 s.
    #[arg(long)]
    pub short: bool,
    /// Weight changes in the weights phase (default 1000; 100 with --short).
    #[arg(long, value_name = "N")]
    pub weight_changes: Option<usize>,
}

/// Runs the fault suite.
pub fn run(args: &ChaosArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the fault suite needs root (it creates a network namespace and loads BPF programs): run `sudo cargo xtask chaos`"
        );
    }
    let bin_dir = build(Profile::Release)?;
    let mut cargo = cmd::cargo();
    cmd::run(cargo.args([
        "build",
        "--release",
        "--package",
        "tcpshift-tests",
        "--bin",
        "tcpshift-chaos",
    ]))?;
    let out_dir = cmd::target_dir()?.join("chaos");
    std::fs::create_dir_all(&out_dir)?;
    let json = out_dir.join("results.json");
    let mut chaos = std::process::Command::new(bin_dir.join("tcpshift-chaos"));
    chaos
        .arg("--json")
        .arg(&json)
        .env("TCPSHIFT_BIN_DIR", &bin_dir);
    if args.short {
        chaos.arg("--short");
    }
    if let Some(n) = args.weight_changes {
        chaos.arg("--weight-changes").arg(n.to_string());
    }
    let status = chaos
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run tcpshift-chaos: {e}"))?;
    match status.code() {
        Some(0) => {
            say(format_args!(
                "fault suite: every goal met; report in {}",
                cmd::short(&json).display()
            ));
            Ok(())
        }
        Some(1) => bail!(
            "fault suite: a goal was missed (rows marked MISSED above); report in {}",
            cmd::short(&json).display()
        ),
        _ => bail!("fault suite failed to run ({status})"),
    }
}
