//! `cargo xtask bootstrap`: installs what building and testing tcpshift needs — the nightly
//! toolchain with `rust-src`, bpf-linker built against nightly's own LLVM, and the Debian
//! packages the tests and the demo use. Every step checks first, so a second run is quick.

use std::{
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    cmd::{self, say},
    tools,
};

/// bpf-linker release known to build against the toolchain's LLVM (see toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the build, the tests and the demo need: `ip`, `nc`, `protoc` (the etcd
/// client crate compiles etcd's protobuf definitions at build time), etcd itself (the
/// fleet-store tests start real `etcd` processes and use `etcdctl`), `bpftool` (tests read
/// pinned maps and program ids with it) and `nft` (the signals test drops packets in its own
/// namespace to cause retransmission timeouts).
const REQUIRED_PACKAGES: &[&str] = &[
    "iproute2",
    "netcat-openbsd",
    "protobuf-compiler",
    "etcd-server",
    "etcd-client",
    "bpftool",
    "nftables",
];

/// Debian packages that help but are not needed.
const OPTIONAL_PACKAGES: &[&str] = &[];

/// What the other commands need from the bootstrap.
pub struct Tools {
    /// A working bpf-linker.
    pub bpf_linker: PathBuf,
}

/// Checks every tool and installs the missing ones.
pub fn bootstrap() -> Result<Tools> {
    ensure_nightly()?;
    let sysroot =
        tools::nightly_sysroot().context("cannot find the nightly toolchain's sysroot")?;
    ensure_rust_src(&sysroot)?;
    let bpf_linker = ensure_bpf_linker(&sysroot)?;
    ensure_packages()?;
    Ok(Tools { bpf_linker })
}

fn ensure_nightly() -> Result<()> {
    let out = cmd::output(Command::new("rustup").args(["toolchain", "list"]))?;
    let listed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with(&format!("{}-", tools::NIGHTLY)));
    if listed {
        say("nightly toolchain ... ok");
        return Ok(());
    }
    say("nightly toolchain ... installing");
    cmd::run(Command::new("rustup").args([
        "toolchain",
        "install",
        tools::NIGHTLY,
        "--profile",
        "minimal",
    ]))
}

fn ensure_rust_src(sysroot: &Path) -> Result<()> {
    if tools::has_rust_src(sysroot) {
        say("nightly rust-src ... ok");
        return Ok(());
    }
    say("nightly rust-src ... installing");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        tools::NIGHTLY,
    ]))?;
    if !tools::has_rust_src(sysroot) {
        bail!("rust-src is still missing from {}", sysroot.display());
    }
    Ok(())
}

fn ensure_bpf_linker(sysroot: &Path) -> Result<PathBuf> {
    if let Some(found) = tools::find_bpf_linker() {
        say(format_args!("bpf-linker ... ok ({})", found.display()));
        return Ok(found);
    }
    say("bpf-linker ... installing (a build of a few minutes)");
    install_bpf_linker(sysroot)?;
    let found = tools::find_bpf_linker().context("bpf-linker was installed but does not run")?;
    say(format_args!("bpf-linker ... ok ({})", found.display()));
    Ok(found)
}

/// Builds bpf-linker against the nightly toolchain's LLVM shared library, through a prefix
/// directory whose `lib/` links to it (the binary keeps an rpath to that prefix).
fn install_bpf_linker(sysroot: &Path) -> Result<()> {
    let tools_dir = tools::tools_dir()
        .context("cannot choose a tools directory: set TCPSHIFT_TOOLS_DIR or HOME")?;
    let soname = tools::llvm_soname(sysroot)
        .with_context(|| format!("no libLLVM.so.* in {}/lib", sysroot.display()))?;
    let major = tools::llvm_major(&soname)
        .with_context(|| format!("cannot read the LLVM major version from {soname}"))?;
    let prefix = tools::llvm_prefix(&tools_dir, &soname);
    link_llvm(&prefix, &sysroot.join("lib").join(&soname), &soname)?;
    let mut install = cmd::cargo();
    cmd::clean_toolchain_env(&mut install);
    install
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(tools::bpf_linker_root(&tools_dir, &soname))
        .env("LLVM_PREFIX", &prefix);
    cmd::run(&mut install)
}

/// Makes `<prefix>/lib/libLLVM.so` and `<prefix>/lib/<soname>` point at `library`.
fn link_llvm(prefix: &Path, library: &Path, soname: &str) -> Result<()> {
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in ["libLLVM.so", soname] {
        let link = lib.join(name);
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link)
                .with_context(|| format!("cannot replace {}", link.display()))?;
        }
        symlink(library, &link).with_context(|| format!("cannot create {}", link.display()))?;
    }
    Ok(())
}

fn ensure_packages() -> Result<()> {
    let all = || REQUIRED_PACKAGES.iter().chain(OPTIONAL_PACKAGES);
    if Command::new("dpkg").arg("--version").output().is_err() {
        say(
            "Debian packages ... skipped (no dpkg here; the build needs `protoc`, the tests `ip`, \
             `nc`, `etcd` and `etcdctl`)",
        );
        return Ok(());
    }
    let missing: Vec<&str> = all().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        say(format_args!(
            "Debian packages {} ... ok",
            all().copied().collect::<Vec<_>>().join(" ")
        ));
        return Ok(());
    }
    if !cmd::is_root() {
        say(format_args!(
            "Debian packages ... missing {}; install them with `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        ));
        return Ok(());
    }
    say(format_args!(
        "Debian packages ... installing {}",
        missing.join(" ")
    ));
    install_packages(&missing)
}

fn installed(package: &str) -> bool {
    Command::new("dpkg")
        .args(["-s", package])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
}

/// Installs the required packages (failing on error), then the optional ones one by one
/// (warning on error).
fn install_packages(missing: &[&str]) -> Result<()> {
    cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
    let required: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| REQUIRED_PACKAGES.contains(p))
        .collect();
    if !required.is_empty() {
        cmd::run(&mut apt_install(&required))?;
    }
    for optional in missing.iter().filter(|p| OPTIONAL_PACKAGES.contains(p)) {
        if let Err(e) = cmd::run(&mut apt_install(&[optional])) {
            say(format_args!(
                "warning: optional package {optional} not installed: {e:#}"
            ));
        }
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}
