//! `cargo xtask`: one entry point to bootstrap, build, lint, test and demo tcpshift.
//!
//! Building tcpshift needs more than cargo: the eBPF programs are compiled with nightly
//! (`-Z build-std=core`, so nightly's `rust-src`) and linked by bpf-linker, which is built
//! against nightly's own LLVM. Every command that builds installs what is missing first.

// Where the build tools live: shared with tcpshift-user/build.rs, so both agree.
#[path = "../../tcpshift-user/build/tools.rs"]
#[allow(dead_code)]
mod tools;

mod bench;
mod bootstrap;
mod build;
mod chaos;
mod cmd;
mod demo;
mod demo_fleet;
mod etcd;
mod lint;
mod package;
mod test;
mod vm;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Build, test and demo automation for tcpshift.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    after_help = "Examples:\n  cargo xtask build\n  cargo xtask test\n  cargo xtask test --unprivileged\n  cargo xtask chaos        (as root)\n  \
                  cargo xtask test -- -p tcpshift-tests -- --nocapture\n  cargo xtask run          (as root)\n\n\
                  Tools are kept in $TCPSHIFT_TOOLS_DIR (default ~/.cache/tcpshift)."
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Install the build tools and test dependencies that are missing.
    ///
    /// Checks, and installs when missing: the nightly toolchain and its rust-src component,
    /// bpf-linker (built against nightly's own LLVM, into $TCPSHIFT_TOOLS_DIR) and, when run
    /// as root, the Debian packages iproute2, netcat-openbsd and bpftool (optional). Every
    /// command that builds runs this first.
    Bootstrap,
    /// Build tcpshiftd, tcpshiftctl and tcp-echo.
    ///
    /// Bootstraps, then runs `cargo build --release -p tcpshift-user --bins`; the eBPF object
    /// is compiled by tcpshift-user's build script and embedded in tcpshiftd.
    Build {
        /// Build the debug profile (target/debug) instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Check formatting and run clippy, warnings as errors.
    ///
    /// Runs `cargo fmt --check`, clippy on the whole workspace, and clippy on the eBPF crate
    /// with nightly for bpfel-unknown-none; runs all three, then fails if any failed.
    Lint,
    /// Build the release binaries and run every test in the workspace.
    ///
    /// Runs `cargo test --workspace --release --no-fail-fast` with TCPSHIFT_BIN_DIR set to
    /// the release binaries, then prints a summary of every test binary. The privileged
    /// integration tests need root and BPF (each uses its own network namespace); without
    /// them they fail and say why, unless skipped with --unprivileged.
    Test {
        /// Skip the privileged tests explicitly (sets TCPSHIFT_SKIP_PRIVILEGED=1).
        #[arg(long)]
        unprivileged: bool,
        /// After the tests, run the full fault suite (`cargo xtask chaos`; the tests already
        /// include its short variant).
        #[arg(long, conflicts_with = "unprivileged")]
        chaos: bool,
        /// Extra arguments for `cargo test`, after `--` (e.g. `-- seed -- --nocapture`).
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        cargo_args: Vec<String>,
    },
    /// Run the traffic-shifting demo (as root) in this network namespace.
    ///
    /// Istio's "TCP Traffic Shifting" task on one machine: two tcp-echo servers (v1, v2) on
    /// loopback, tcpshiftd steering the service port to them by weight (100/0 at first), and
    /// a line showing weights and steered connections whenever they change. Ctrl-C or
    /// SIGTERM stops everything it started and uninstalls tcpshift.
    Run(demo::DemoArgs),
    /// Run the privileged integration suite on other kernels, each booted in a QEMU VM.
    ///
    /// Boots each kernel (Debian's 6.1 and 6.12 by default, downloaded once into target/vm/)
    /// with the host's root shared read-only over virtio-9p, runs the test binaries built on
    /// the host inside it as root, and prints per kernel: version, tests passed and failed,
    /// wall time. Uses KVM when it can boot the kernel, else QEMU's (slow) emulation.
    VmTest(vm::VmTestArgs),
    /// Benchmark tcpshift against direct, nftables DNAT, HAProxy and nginx (as root).
    ///
    /// In a fresh network namespace on loopback: connection rate, latency at a fixed rate,
    /// bulk throughput and split accuracy for every target, then tcpshift with up to 10 000
    /// services and its weight-change latency. Installs the peers from Debian's packages
    /// when missing; writes target/bench/results.json, results.md and chart.png.
    Bench(bench::BenchArgs),
    /// Run the fault suite (as root): no connection lost while tcpshift is disturbed.
    ///
    /// In a fresh network namespace, under a sustained load of new connections plus
    /// long-lived ones (every reply checked byte for byte): 1 000 weight changes, the loader
    /// SIGKILLed and stopped and restarted, the programs replaced in place, each backend
    /// killed and restarted, malformed input. Prints a table per fault (attempted,
    /// succeeded, refused, broken, mismatched, re-registration time) and fails when a goal
    /// is missed; writes target/chaos/results.json.
    Chaos(chaos::ChaosArgs),
    /// Build a Debian package (target/debian/tcpshift_VERSION_ARCH.deb) with dpkg-deb: the
    /// three programs, the systemd unit, the default configuration, man pages, completions.
    Package,
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpshift: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Bootstrap => bootstrap::bootstrap().map(drop),
        Task::Build { debug } => {
            let profile = if debug {
                build::Profile::Debug
            } else {
                build::Profile::Release
            };
            build::build(profile).map(drop)
        }
        Task::Lint => lint::lint(),
        Task::Test {
            unprivileged,
            chaos,
            cargo_args,
        } => {
            test::test(unprivileged, &cargo_args)?;
            if chaos {
                chaos::run(&chaos::ChaosArgs::default())?;
            }
            Ok(())
        }
        Task::Run(args) => demo::run(&args),
        Task::VmTest(args) => vm::vm_test(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Chaos(args) => chaos::run(&args),
        Task::Package => package::run().map(drop),
    }
}
