//! Where tcpshift's eBPF build tools live. Shared by `tcpshift-user/build.rs` (which uses them)
//! and `xtask` (which installs them), so both agree on one location.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Toolchain used to build the eBPF crate (needs `-Z build-std=core`).
pub const NIGHTLY: &str = "nightly";

/// Directory holding tcpshift's build tools: `$TCPSHIFT_TOOLS_DIR`, else
/// `$XDG_CACHE_HOME/tcpshift`, else `$HOME/.cache/tcpshift`.
pub fn tools_dir() -> Option<PathBuf> {
    if let Some(d) = env::var_os("TCPSHIFT_TOOLS_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = env::var_os("XDG_CACHE_HOME") {
        return Some(Path::new(&d).join("tcpshift"));
    }
    env::var_os("HOME").map(|h| Path::new(&h).join(".cache").join("tcpshift"))
}

/// Sysroot of the nightly toolchain, if rustup has it.
pub fn nightly_sysroot() -> Option<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(s.trim()))
}

/// File name (soname) of the LLVM shared library shipped with the nightly toolchain, e.g.
/// `libLLVM.so.22.1-rust-1.97.0-nightly`.
pub fn llvm_soname(sysroot: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sysroot.join("lib"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("libLLVM.so."))
        .collect();
    names.sort();
    names.pop()
}

/// LLVM major version of that library (`22` for `libLLVM.so.22.1-...`).
pub fn llvm_major(soname: &str) -> Option<u32> {
    soname
        .strip_prefix("libLLVM.so.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Where bpf-linker built against `soname` is installed (`<root>/bin/bpf-linker`).
pub fn bpf_linker_root(tools: &Path, soname: &str) -> PathBuf {
    tools.join("bpf-linker").join(soname)
}

/// The LLVM prefix bpf-linker is linked against (`<prefix>/lib/libLLVM.so` -> sysroot).
pub fn llvm_prefix(tools: &Path, soname: &str) -> PathBuf {
    tools.join("llvm").join(soname)
}

/// A bpf-linker that runs: ours for the current nightly, else one on `PATH`.
pub fn find_bpf_linker() -> Option<PathBuf> {
    let ours = (|| {
        let sysroot = nightly_sysroot()?;
        let soname = llvm_soname(&sysroot)?;
        Some(
            bpf_linker_root(&tools_dir()?, &soname)
                .join("bin")
                .join("bpf-linker"),
        )
    })();
    let on_path = env::var_os("PATH").and_then(|p| {
        env::split_paths(&p)
            .map(|d| d.join("bpf-linker"))
            .find(|c| c.is_file())
    });
    [ours, on_path].into_iter().flatten().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Whether nightly has the `rust-src` component (needed by `-Z build-std=core`).
pub fn has_rust_src(sysroot: &Path) -> bool {
    sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
}
