//! `cargo xtask build`: bootstraps, then builds tcpshiftd, tcpshiftctl and tcp-echo (the eBPF
//! object is built by `tcpshift-user/build.rs` and embedded in tcpshiftd).

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::{
    bootstrap::bootstrap,
    cmd::{self, say},
};

/// The programs `tcpshift-user` builds.
pub const BINARIES: &[&str] = &["tcpshiftd", "tcpshiftctl", "tcp-echo"];

/// Cargo profile to build with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

/// Bootstraps and builds the binaries; returns the (absolute) directory that holds them.
pub fn build(profile: Profile) -> Result<PathBuf> {
    bootstrap()?;
    let mut cargo = cmd::cargo();
    cargo.arg("build");
    if profile == Profile::Release {
        cargo.arg("--release");
    }
    cmd::run(cargo.args(["--package", "tcpshift-user", "--bins"]))?;
    let dir = cmd::target_dir()?.join(profile.dir());
    for name in BINARIES {
        let path = dir.join(name);
        if !path.is_file() {
            bail!("cargo build succeeded but {} is missing", path.display());
        }
        say(format_args!("built {}", cmd::short(&path).display()));
    }
    Ok(dir)
}
