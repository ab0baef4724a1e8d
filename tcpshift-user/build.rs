//! Builds the eBPF object from `tcpshift-ebpf` with the nightly toolchain and bpf-linker, and
//! leaves it in `OUT_DIR/tcpshift.bpf.o` for `include_bytes!`. When a tool is missing it fails
//! with one line naming the command that installs everything: `cargo xtask build`.

#[path = "build/tools.rs"]
#[allow(dead_code)]
mod tools;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, exit},
};

fn fail(msg: &str) -> ! {
    // cargo prints build-script stderr; keep it to one actionable line.
    eprintln!(
        "error: {msg}; run `cargo xtask build` once (it installs nightly rust-src and bpf-linker)"
    );
    exit(1);
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest.parent().expect("workspace root").to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    for dir in [
        "tcpshift-ebpf/src",
        "tcpshift-ebpf/Cargo.toml",
        "tcpshift-common/src",
        "tcpshift-common/Cargo.toml",
        "tcpshift-user/build",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=TCPSHIFT_TOOLS_DIR");
    println!("cargo:rerun-if-env-changed=TCPSHIFT_EBPF_OBJECT");

    let dest = out_dir.join("tcpshift.bpf.o");
    // Escape hatch for packagers: a prebuilt object.
    if let Some(obj) = env::var_os("TCPSHIFT_EBPF_OBJECT") {
        if let Err(e) = std::fs::copy(&obj, &dest) {
            fail(&format!(
                "cannot copy TCPSHIFT_EBPF_OBJECT={}: {e}",
                Path::new(&obj).display()
            ));
        }
        return;
    }

    let Some(sysroot) = tools::nightly_sysroot() else {
        fail("the nightly Rust toolchain is missing");
    };
    if !tools::has_rust_src(&sysroot) {
        fail("nightly's rust-src component is missing");
    }
    let Some(linker) = tools::find_bpf_linker() else {
        fail("bpf-linker is missing");
    };

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        tools::NIGHTLY,
        "cargo",
        "build",
        "--package",
        "tcpshift-ebpf",
        "--bin",
        "tcpshift",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&root)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        // BPF ISA v3 (kernel >= 5.1; atomics with fetch need >= 5.12, tcpshift needs 6.1):
        // the round-robin cursor's atomic fetch-add needs it.
        ["-Cdebuginfo=2", "-Clink-arg=--btf", "-Ctarget-cpu=v3"].join("\x1f"),
    )
    .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker);
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "CARGO_ENCODED_RUSTFLAGS_HOST",
    ] {
        cmd.env_remove(key);
    }
    // Cargo reads a build script's stdout as directives: send the nested build's output to stderr.
    cmd.stdout(std::process::Stdio::from(std::io::stderr()));
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => fail(&format!("cannot run rustup ({e})")),
    };
    if !status.success() {
        // A compile error in the eBPF crate, not a missing tool: no install hint.
        eprintln!("error: building the eBPF programs (tcpshift-ebpf) failed, see the errors above");
        exit(1);
    }
    let built = target_dir.join("bpfel-unknown-none/release/tcpshift");
    if let Err(e) = std::fs::copy(&built, &dest) {
        fail(&format!(
            "eBPF object {} not found after build: {e}",
            built.display()
        ));
    }
}
