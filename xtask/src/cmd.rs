//! Small helpers for running commands and finding the workspace.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context, Result, bail};

/// Environment variables a parent cargo or rustup sets that must not leak into a nested build
/// that uses a different toolchain (the same list as `tcpshift-user/build.rs`).
const TOOLCHAIN_VARS: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTUP_TOOLCHAIN",
    "CARGO",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_MAKEFLAGS",
];

/// Prints one progress line.
pub fn say(msg: impl std::fmt::Display) {
    println!("tcpshift: {msg}");
}

/// The workspace root (the parent of this crate's directory).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in a subdirectory of the workspace")
}

/// `cargo` (the one that runs xtask), working in the workspace root.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(root());
    cmd
}

/// `rustup run nightly cargo`, working in the workspace root, with the stable toolchain's
/// variables removed.
pub fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", crate::tools::NIGHTLY, "cargo"])
        .current_dir(root());
    clean_toolchain_env(&mut cmd);
    cmd
}

/// Removes toolchain-selecting variables inherited from the cargo that runs xtask.
pub fn clean_toolchain_env(cmd: &mut Command) {
    for key in TOOLCHAIN_VARS {
        cmd.env_remove(key);
    }
}

/// Cargo's target directory for this workspace (honours `CARGO_TARGET_DIR` and config).
pub fn target_dir() -> Result<PathBuf> {
    let out = output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cannot parse `cargo metadata` output")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("`cargo metadata` has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// Runs `cmd` with inherited stdio, echoing it first; fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    echo(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` capturing its output; fails (with its stderr) unless it exits successfully.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// The command line of `cmd`, for messages (`cargo` instead of its full path).
pub fn show(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let program = program.file_name().unwrap_or(program.as_os_str());
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints `$ VAR=value ... command args` before running `cmd`.
pub fn echo(cmd: &Command) {
    let vars: String = cmd
        .get_envs()
        .filter_map(|(key, value)| Some(format!("{}={} ", key.display(), value?.display())))
        .collect();
    println!("$ {vars}{}", show(cmd));
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `path` relative to the current directory when it is below it (for commands to paste).
pub fn short(path: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
}
