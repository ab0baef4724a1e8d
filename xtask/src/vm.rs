//! `cargo xtask vm-test`: the privileged integration suite on other kernels, each booted in a
//! QEMU virtual machine.
//!
//! For every kernel: find it (Debian's `linux-image-<series>.*-amd64`, cached under
//! `target/vm/kernels/`, or the user's own), build a small initramfs (busybox-static and the
//! virtio-9p modules), and boot it with the host's root shared read-only over virtio-9p and the
//! work tree read-write. The guest mounts proc, sys, dev, cgroup2, bpffs and debugfs, chroots
//! into the host's root and runs the test binaries built on the host — as root, each test in a
//! network namespace of its own, as on the host. The guest's console streams to ours (and to
//! `console.log`); the guest writes its exit status to the shared run directory and powers off.
//!
//! QEMU uses KVM when a quick boot with it works and software emulation (TCG) otherwise;
//! nested KVM often cannot run Debian's kernels. Under TCG the guest runs 5–14× slower than
//! the host, which the tests' timeouts allow for.

mod initramfs;
mod kernel;
mod probe;
mod qemu;
mod verified;

use std::{
    fs::File,
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use self::{
    initramfs::{Payload, Share, quote, quote_path},
    kernel::Kernel,
    qemu::{Accel, Machine},
};
use crate::{
    build::{Profile, build},
    cmd::{self, say},
};

/// Kernels tested when no `--kernel` is given: Debian 12's own and its 6.12 kernel.
const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12"];

/// Debian packages the VM needs on the host.
const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils"];

/// The package whose integration tests run in the guest.
const SUITE_PACKAGE: &str = "tcpshift-tests";

/// How long the KVM check may take before KVM counts as not working.
const KVM_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Stretches the tests' timeouts (read by tests/src/lib.rs).
const TIME_SCALE_VAR: &str = "TCPSHIFT_TEST_TIME_SCALE";

/// Guest exit status meaning "the kernel lacks a feature tcpshift needs" (see probe.rs).
const EXIT_MISSING_FEATURE: i32 = 3;

/// Options of `cargo xtask vm-test`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    cargo xtask vm-test                          (Debian's 6.1 and 6.12)\n  \
    cargo xtask vm-test --kernel 6.1 -- set_weight   (only tests whose name has \"set_weight\")\n  \
    cargo xtask vm-test --kernel ./linux-image-6.6.0-1-amd64.deb\n  \
    cargo xtask vm-test --kernel 6.12 --command 'bpftool feature probe kernel'\n\n\
    Kernels are cached in target/vm/kernels/, each run's console log and guest script in\n\
    target/vm/runs/<release>/. Run as root to let it install qemu-system-x86, busybox-static,\n\
    kmod and xz-utils; the guest itself always runs the tests as root.")]
pub struct VmTestArgs {
    /// Kernel to boot; repeat for several (they run one after another) [default: 6.1 and 6.12].
    ///
    /// A series such as `6.1` or `6.12` means the newest generic `linux-image-<series>.*-amd64`
    /// package apt knows (on Debian 12: from bookworm and bookworm-security),
    /// downloaded once and cached in target/vm/kernels/. Also accepted: a package name
    /// (`linux-image-6.1.0-47-amd64`), a kernel .deb, a directory laid out like one
    /// (`boot/vmlinuz-*`, `lib/modules/*`), or a bare bzImage with virtio-pci, virtio-9p, BPF
    /// and BTF built in.
    #[arg(long = "kernel", value_name = "6.1|6.12|PACKAGE|PATH")]
    kernels: Vec<String>,
    /// How QEMU runs the guest: `kvm`, `tcg` (software emulation, slow but works anywhere) or
    /// `auto` (KVM if a quick boot of the kernel with it works; the result is cached).
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Guest memory, in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    memory: u32,
    /// Guest virtual CPUs.
    #[arg(long, default_value_t = 2, value_name = "N")]
    cpus: u32,
    /// Stop a VM that runs longer than this (boot, tests and power-off), in minutes.
    #[arg(long, default_value_t = 30, value_name = "MINUTES")]
    timeout: u64,
    /// Run this shell command in the guest (as root, chrooted into the host's root, in the
    /// work tree) instead of the test suite; its exit status decides. For example
    /// `--command 'bpftool feature probe kernel'`.
    #[arg(long, value_name = "SHELL_COMMAND", conflicts_with = "test_args")]
    command: Option<String>,
    /// Run inside the guest: check the kernel for what tcpshift needs (used by the guest script).
    #[arg(long, hide = true)]
    guest_probe: bool,
    /// Run inside the guest (or on the host): print the verified instruction count of each of
    /// tcpshift's programs, loaded by the tcpshiftd of `TCPSHIFT_BIN_DIR` (default
    /// target/release) in a throwaway network namespace.
    #[arg(long, hide = true)]
    guest_verified: bool,
    /// Arguments for every test binary, after `--`: a test-name filter, `--test-threads 1`,
    /// `--nocapture`, ...
    #[arg(last = true, value_name = "TEST_ARGS")]
    test_args: Vec<String>,
}

/// `--accel`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// What the guest runs.
enum Plan {
    /// The integration suite: test binaries built on the host, and the directory of the
    /// binaries they start.
    Suite {
        bin_dir: PathBuf,
        tests: Vec<PathBuf>,
    },
    /// A shell command.
    Command(String),
}

/// Everything every kernel's run shares.
struct Setup {
    plan: Plan,
    args_for_tests: Vec<String>,
    busybox: PathBuf,
    xtask: PathBuf,
    target_dir: PathBuf,
    vm_dir: PathBuf,
    workspace: PathBuf,
    machine: Machine,
    accel: AccelChoice,
    timeout: Duration,
    color: bool,
}

/// One kernel's outcome.
struct Outcome {
    label: String,
    release: Option<String>,
    source: String,
    accel: Option<Accel>,
    passed: u64,
    failed: u64,
    ignored: u64,
    wall: Option<Duration>,
    failures: Vec<String>,
    /// `None`: the kernel passed.
    problem: Option<String>,
    log: Option<PathBuf>,
    /// (program, instructions its verifier walked), as the guest printed them.
    verified: Vec<(String, u64)>,
}

impl Outcome {
    fn broken(label: &str, problem: String) -> Self {
        Self {
            label: label.to_string(),
            release: None,
            source: String::new(),
            accel: None,
            passed: 0,
            failed: 0,
            ignored: 0,
            wall: None,
            failures: Vec::new(),
            problem: Some(problem),
            log: None,
            verified: Vec::new(),
        }
    }
}

/// Runs `cargo xtask vm-test`.
pub fn vm_test(args: &VmTestArgs) -> Result<()> {
    if args.guest_probe {
        return probe::run();
    }
    if args.guest_verified {
        let bin_dir = match std::env::var_os("TCPSHIFT_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => cmd::target_dir()?.join("release"),
        };
        let scale = std::env::var(TIME_SCALE_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        return verified::run(&bin_dir, scale);
    }
    if args.memory < 512 || args.cpus == 0 || args.timeout == 0 {
        bail!("--memory must be at least 512 (MiB), --cpus and --timeout at least 1");
    }
    let specs: Vec<String> = if args.kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect()
    } else {
        args.kernels.clone()
    };
    let busybox = ensure_host_tools()?;
    let plan = match &args.command {
        Some(c) => Plan::Command(c.clone()),
        None => build_suite()?,
    };
    let target_dir = cmd::target_dir()?;
    let setup = Setup {
        plan,
        args_for_tests: args.test_args.clone(),
        busybox,
        xtask: std::env::current_exe().context("cannot find the xtask binary")?,
        vm_dir: target_dir.join("vm"),
        target_dir,
        workspace: cmd::root().to_path_buf(),
        machine: Machine {
            accel: Accel::Tcg,
            memory_mib: args.memory,
            cpus: args.cpus,
        },
        accel: args.accel,
        timeout: Duration::from_secs(args.timeout * 60),
        color: std::io::stdout().is_terminal(),
    };
    let mut outcomes = Vec::new();
    let mut booted: Vec<String> = Vec::new();
    for spec in &specs {
        let outcome = kernel::prepare(spec, &setup.vm_dir)
            .and_then(|k| {
                let index = booted.iter().filter(|id| **id == k.id()).count();
                booted.push(k.id());
                run_kernel(&setup, index, &k)
            })
            .unwrap_or_else(|e| Outcome::broken(spec, format!("{e:#}")));
        outcomes.push(outcome);
    }
    summarize(&outcomes)
}

/// Installs (as root) or asks for the host's QEMU, busybox-static, kmod and xz; returns the
/// static busybox.
fn ensure_host_tools() -> Result<PathBuf> {
    let missing = |busybox: &Option<PathBuf>| -> Vec<&str> {
        let mut m = Vec::new();
        if which(qemu::QEMU).is_none() {
            m.push(HOST_PACKAGES[0]);
        }
        if busybox.is_none() {
            m.push(HOST_PACKAGES[1]);
        }
        if kernel::sbin("modprobe").is_err() || kernel::sbin("depmod").is_err() {
            m.push(HOST_PACKAGES[2]);
        }
        if which("xz").is_none() {
            m.push(HOST_PACKAGES[3]);
        }
        m
    };
    let mut busybox = static_busybox();
    let absent = missing(&busybox);
    if absent.is_empty() {
        say(format_args!(
            "VM tools ({}) ... ok",
            HOST_PACKAGES.join(" ")
        ));
    } else {
        if which("apt-get").is_none() || which("dpkg-deb").is_none() {
            bail!(
                "vm-test needs {} and Debian's apt and dpkg to fetch kernels",
                absent.join(", ")
            );
        }
        if !cmd::is_root() {
            bail!(
                "vm-test needs the Debian packages {0}; install them with \
                 `sudo apt-get install --no-install-recommends {0}`",
                absent.join(" ")
            );
        }
        say(format_args!("VM tools ... installing {}", absent.join(" ")));
        cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&absent)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        busybox = static_busybox();
        let still = missing(&busybox);
        if !still.is_empty() {
            bail!("still missing after apt-get install: {}", still.join(" "));
        }
    }
    busybox.context("no statically linked busybox (Debian package busybox-static)")
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// busybox-static's binary (the guest has no libc before it mounts the host's root).
fn static_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| is_static_elf(p))
}

/// Whether `path` is an x86-64 ELF executable without a program interpreter.
fn is_static_elf(path: &Path) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if !data.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..usize::from(count)).all(|i| {
        let o = phoff + i * usize::from(size);
        data.get(o..o + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != PT_INTERP)
    })
}

/// Test binaries left out of the guests. Kernel-independent: the fleet tests drive etcd
/// clusters (slow under emulation) and the package tests check a `.deb` built on the host.
/// Not yet run in a guest (added in this stage; they run on the host's kernel with
/// `cargo xtask test`, and their first 6.1/6.12 run is still to do): the daemon, signals,
/// ownership, take-over, rollout, Gateway API and least-privilege suites. The memory test
/// reads the kernel's accounting of each map, which counts a hash map's elements only from
/// Linux 6.4 on (before, `memlock` is an estimate from `max_entries`).
const HOST_ONLY: &[&str] = &[
    "memory",
    "fleet_store",
    "fleet",
    "fleet_rollout",
    "package",
    "daemon",
    "signals",
    "ownership",
    "read_only",
    "takeover",
    "rollout",
    "gateway_api",
    "least_privilege",
];

/// Builds the release binaries and the suite's test binaries on the host.
fn build_suite() -> Result<Plan> {
    let bin_dir = build(Profile::Release)?;
    let mut cargo = cmd::cargo();
    cargo
        .args(["test", "--release", "--package", SUITE_PACKAGE, "--no-run"])
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit());
    let out = cmd::output(&mut cargo)?;
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && let Some(exe) = msg["executable"].as_str()
        {
            tests.push(PathBuf::from(exe));
        }
    }
    tests.retain(|t| !HOST_ONLY.contains(&test_name(t).as_str()));
    tests.sort_by_key(|t| test_name(t));
    if tests.is_empty() {
        bail!("`cargo test --no-run -p {SUITE_PACKAGE}` reported no test executables");
    }
    say(format_args!(
        "suite: {}",
        tests
            .iter()
            .map(|t| test_name(t))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(Plan::Suite { bin_dir, tests })
}

/// `seed` from `target/release/deps/seed-0123abcd`.
fn test_name(exe: &Path) -> String {
    let file = exe
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.rsplit_once('-')
        .map_or(file.clone(), |(name, _)| name.to_string())
}

/// Boots `kernel`, runs the plan in it and collects the outcome.
fn run_kernel(setup: &Setup, index: usize, kernel: &Kernel) -> Result<Outcome> {
    // runs/<release>, or runs/<release>-<n> when one invocation boots a kernel twice.
    let mut name = kernel.id();
    if index > 0 {
        name = format!("{name}-{}", index + 1);
    }
    let run_dir = setup.vm_dir.join("runs").join(name);
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("cannot remove {}", run_dir.display()))?;
    }
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let accel = choose_accel(setup, kernel)?;
    let status_file = run_dir.join("exit-status");
    let script = run_dir.join("guest.sh");
    std::fs::write(&script, guest_script(setup, accel, &status_file)?)
        .with_context(|| format!("cannot write {}", script.display()))?;

    let mut shares = vec![Share {
        tag: "tcpshift_work",
        path: setup.workspace.clone(),
        writable: true,
    }];
    // The target directory holds the binaries and this run's directory; share it on its own
    // when it is elsewhere (CARGO_TARGET_DIR), e.g. below /tmp, which the guest replaces.
    if !setup.target_dir.starts_with(&setup.workspace) {
        shares.push(Share {
            tag: "tcpshift_target",
            path: setup.target_dir.clone(),
            writable: true,
        });
    }
    let initramfs = run_dir.join("initramfs.cpio");
    let payload = Payload::Script {
        shares: &shares,
        script: &script,
    };
    std::fs::write(
        &initramfs,
        initramfs::build(&setup.busybox, &kernel.modules, &payload)?,
    )
    .with_context(|| format!("cannot write {}", initramfs.display()))?;

    let machine = Machine {
        accel,
        ..setup.machine
    };
    let log_path = run_dir.join("console.log");
    let mut log =
        File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    say(format_args!(
        "booting {} ({}) with {}, {} vCPUs, {} MiB; console log: {}",
        kernel.release.as_deref().unwrap_or(&kernel.label),
        kernel.source,
        match accel {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG (software emulation: slow)",
        },
        machine.cpus,
        machine.memory_mib,
        cmd::short(&log_path).display()
    ));
    let qemu = qemu::command(&machine, &kernel.image, &initramfs, &shares);
    cmd::echo(&qemu);
    let mut console = Console::default();
    let prefix = format!("[{}] ", kernel.short_name());
    let started = Instant::now();
    let finished = qemu::run(qemu, setup.timeout, |line| {
        let _ = writeln!(log, "{line}");
        let plain = strip_ansi(line);
        println!("{prefix}{}", if setup.color { line } else { &plain });
        console.observe(&plain);
        true
    })?;
    let wall = started.elapsed();
    let status = std::fs::read_to_string(&status_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let problem = match status {
        _ if finished.timed_out => Some(format!(
            "timed out after {} minutes (--timeout)",
            setup.timeout.as_secs() / 60
        )),
        Some(0) => None,
        Some(EXIT_MISSING_FEATURE) => Some(
            console
                .missing_feature
                .clone()
                .unwrap_or_else(|| "the kernel lacks a feature tcpshift needs".into()),
        ),
        Some(code) => Some(match &setup.plan {
            Plan::Suite { .. } if console.failed > 0 || !console.failures.is_empty() => {
                let n = console.failed.max(console.failures.len() as u64);
                format!("{n} test{} failed", if n == 1 { "" } else { "s" })
            }
            Plan::Suite { .. } => format!("a test binary failed (exit status {code})"),
            Plan::Command(_) => format!("the command exited with status {code}"),
        }),
        None => {
            let mut why = match &console.guest_error {
                Some(e) => format!("the guest stopped: {e}"),
                None => format!(
                    "the guest stopped without reporting an exit status (QEMU: {}; kernel panic \
                     or boot failure?)",
                    finished.status
                ),
            };
            if !kernel.missing.is_empty() {
                why.push_str(&format!(
                    " (this kernel has no module {}: build it in or pass a tree with its modules)",
                    kernel.missing.join(", ")
                ));
            }
            Some(why)
        }
    };
    Ok(Outcome {
        label: kernel.label.clone(),
        release: console.release.clone().or_else(|| kernel.release.clone()),
        source: kernel.source.clone(),
        accel: Some(accel),
        passed: console.passed,
        failed: console.failed,
        ignored: console.ignored,
        wall: Some(wall),
        failures: console.failures,
        problem,
        log: Some(log_path),
        verified: console.verified,
    })
}

/// KVM or TCG for `kernel`, per `--accel` (`auto` boots it once with KVM; cached).
fn choose_accel(setup: &Setup, kernel: &Kernel) -> Result<Accel> {
    match setup.accel {
        AccelChoice::Kvm => return Ok(Accel::Kvm),
        AccelChoice::Tcg => return Ok(Accel::Tcg),
        AccelChoice::Auto => {}
    }
    if !qemu::kvm_device_usable() {
        say("KVM: /dev/kvm is missing or not accessible; using TCG");
        return Ok(Accel::Tcg);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let key = format!(
        "{}|{}|{}|{}",
        kernel.image.display(),
        kernel.release.as_deref().unwrap_or(""),
        host.trim(),
        qemu::version()?
    );
    let dir = setup.vm_dir.join("kvm-check");
    let verdict_file = dir.join(format!("{}-{:016x}", kernel.id(), fnv(&key)));
    if let Ok(v) = std::fs::read_to_string(&verdict_file) {
        let accel = if v.trim() == "kvm" {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        say(format_args!(
            "KVM check (cached in {}): {}",
            cmd::short(&verdict_file).display(),
            if accel == Accel::Kvm {
                "works"
            } else {
                "does not boot this kernel; using TCG"
            }
        ));
        return Ok(accel);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let probe = dir.join("probe.cpio");
    std::fs::write(
        &probe,
        initramfs::build(&setup.busybox, &[], &Payload::Probe)?,
    )
    .with_context(|| format!("cannot write {}", probe.display()))?;
    say("KVM check: booting the kernel once with KVM");
    let works = qemu::kvm_boots(&setup.machine, &kernel.image, &probe, KVM_CHECK_TIMEOUT)?;
    let accel = if works { Accel::Kvm } else { Accel::Tcg };
    say(format_args!(
        "KVM check: {}",
        if works {
            "works; using KVM"
        } else {
            "KVM cannot boot this kernel here; using TCG"
        }
    ));
    std::fs::write(&verdict_file, accel.to_string())
        .with_context(|| format!("cannot write {}", verdict_file.display()))?;
    Ok(accel)
}

/// FNV-1a, for cache file names that must stay stable across builds.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The tests' timeout factor in the guest (`TCPSHIFT_TEST_TIME_SCALE`, see tests/src/lib.rs):
/// the caller's, else 10 under TCG (code runs 5–20× slower than on the host), 2 under KVM.
fn time_scale(accel: Accel) -> String {
    std::env::var(TIME_SCALE_VAR)
        .ok()
        .filter(|v| v.parse::<u32>().is_ok_and(|f| f >= 1))
        .unwrap_or_else(|| {
            match accel {
                Accel::Tcg => "10",
                Accel::Kvm => "2",
            }
            .to_string()
        })
}

/// The script the guest runs (with /bin/sh, chrooted into the host's root).
fn guest_script(setup: &Setup, accel: Accel, status_file: &Path) -> Result<String> {
    let status = quote_path(status_file)?;
    let mut s = format!(
        "#!/bin/sh\n\
         # Runs in tcpshift's test VM (generated by `cargo xtask vm-test`): as root, chrooted into\n\
         # the host's root. Writes its exit status to {status}.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export HOME=/root LANG=C.UTF-8 RUST_BACKTRACE=1\n\
         cd {workspace} || {{ echo 2 > {status}; exit 0; }}\n\
         echo \"tcpshift-vm: kernel $(uname -r) $(uname -v)\"\n",
        workspace = quote_path(&setup.workspace)?,
    );
    match &setup.plan {
        Plan::Command(command) => {
            s.push_str(&format!(
                "/bin/sh -c {}\necho $? > {status}\n",
                quote(command)
            ));
        }
        Plan::Suite { bin_dir, tests } => {
            s.push_str(&format!(
                "export TCPSHIFT_BIN_DIR={} {TIME_SCALE_VAR}={}\n\
                 if ! {xtask} vm-test --guest-probe; then echo {EXIT_MISSING_FEATURE} > {status}; exit 0; fi\n\
                 {xtask} vm-test --guest-verified || echo \"tcpshift-vm: verified counts unavailable\"\n\
                 rc=0\n",
                quote_path(bin_dir)?,
                time_scale(accel),
                xtask = quote_path(&setup.xtask)?
            ));
            let args: Vec<String> = setup.args_for_tests.iter().map(|a| quote(a)).collect();
            for test in tests {
                s.push_str(&format!(
                    "echo \"tcpshift-vm: running {name}\"\n{exe} {args} || rc=1\n",
                    name = test_name(test),
                    exe = quote_path(test)?,
                    args = args.join(" ")
                ));
            }
            s.push_str(&format!("echo \"$rc\" > {status}\n"));
        }
    }
    Ok(s)
}

/// What the guest's console told us.
#[derive(Default)]
struct Console {
    release: Option<String>,
    passed: u64,
    failed: u64,
    ignored: u64,
    failures: Vec<String>,
    missing_feature: Option<String>,
    guest_error: Option<String>,
    verified: Vec<(String, u64)>,
}

impl Console {
    fn observe(&mut self, line: &str) {
        let line = line.trim();
        if let Some(v) = verified::parse_line(line) {
            self.verified.push(v);
        } else if let Some(rest) = line.strip_prefix("tcpshift-vm: kernel ") {
            if self.release.is_none() {
                self.release = rest.split_whitespace().next().map(str::to_string);
            }
        } else if let Some(result) = line.strip_prefix("test result: ") {
            self.passed += count(result, "passed");
            self.failed += count(result, "failed");
            self.ignored += count(result, "ignored");
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
            // With one test thread, the test's own output may split "test NAME ... FAILED";
            // libtest then still prints "---- NAME stdout ----" for it.
            .or_else(|| {
                line.strip_prefix("---- ")
                    .and_then(|l| l.strip_suffix(" stdout ----"))
            })
        {
            if !self.failures.iter().any(|f| f == name) {
                self.failures.push(name.to_string());
            }
        } else if let Some(pos) = line.find("missing kernel feature: ") {
            self.missing_feature = Some(line[pos..].to_string());
        } else if let Some(e) = line.strip_prefix("tcpshift-vm: error: ") {
            self.guest_error = Some(e.to_string());
        } else if line.contains("Kernel panic - not syncing") {
            self.guest_error = Some(line.to_string());
        }
    }
}

/// The number before `word` in `ok. 3 passed; 0 failed; ...`.
fn count(result: &str, word: &str) -> u64 {
    result
        .split([';', '.'])
        .filter_map(|part| part.trim().strip_suffix(word))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// `line` without ANSI escape sequences (colours, cursor movement).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            // Other control characters (shift-in/out, bells) would only garble the text.
            if !c.is_control() || c == '\t' {
                out.push(c);
            }
            continue;
        }
        match chars.next() {
            // CSI: parameters, then one final byte in '@'..='~'.
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            // Character set selection: ESC ( B and the like.
            Some('(' | ')' | '*' | '+') => {
                chars.next();
            }
            _ => {}
        }
    }
    out
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

/// Prints one line per kernel; fails if any kernel failed.
fn summarize(outcomes: &[Outcome]) -> Result<()> {
    println!();
    say("vm-test summary");
    let name = |o: &Outcome| o.release.as_deref().unwrap_or(&o.label).to_string();
    let source = |o: &Outcome| {
        if o.source.is_empty() {
            "-".to_string()
        } else {
            o.source.clone()
        }
    };
    let w1 = outcomes
        .iter()
        .map(|o| name(o).len())
        .max()
        .unwrap_or(0)
        .max(6);
    let w2 = outcomes
        .iter()
        .map(|o| source(o).len())
        .max()
        .unwrap_or(0)
        .max(4);
    println!(
        "  {:<w1$}  {:<w2$}  {:<5} {:>6} {:>6} {:>7} {:>7}  RESULT",
        "KERNEL", "FROM", "ACCEL", "PASSED", "FAILED", "IGNORED", "WALL"
    );
    for o in outcomes {
        println!(
            "  {:<w1$}  {:<w2$}  {:<5} {:>6} {:>6} {:>7} {:>7}  {}",
            name(o),
            source(o),
            o.accel.map_or("-".to_string(), |a| a.to_string()),
            o.passed,
            o.failed,
            o.ignored,
            o.wall.map_or("-".to_string(), minutes),
            if o.problem.is_none() { "ok" } else { "FAILED" }
        );
    }
    // Instructions each program's verifier walked (the limit is 1 000 000; sk_lookup must stay
    // under half of it).
    for o in outcomes.iter().filter(|o| !o.verified.is_empty()) {
        let counts: Vec<String> = (o.verified.iter())
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        println!(
            "  {}: verified instructions: {}",
            name(o),
            counts.join(", ")
        );
    }
    let bad: Vec<&Outcome> = outcomes.iter().filter(|o| o.problem.is_some()).collect();
    for o in &bad {
        println!(
            "  {}: {}",
            o.release.as_deref().unwrap_or(&o.label),
            o.problem.as_deref().unwrap_or_default()
        );
        for name in &o.failures {
            println!("      failed: {name}");
        }
        if let Some(log) = &o.log {
            println!("      console log: {}", cmd::short(log).display());
        }
    }
    let names = |list: &[&Outcome]| {
        list.iter()
            .map(|o| o.release.as_deref().unwrap_or(&o.label).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !bad.is_empty() {
        bail!("vm-test FAILED on {}", names(&bad));
    }
    let all: Vec<&Outcome> = outcomes.iter().collect();
    say(format_args!("vm-test ok on {}", names(&all)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_colours_are_removed() {
        assert_eq!(
            strip_ansi("test x ... \x1b[32mok\x1b[m and \x1b[2mdim\x1b[0m"),
            "test x ... ok and dim"
        );
        assert_eq!(
            strip_ansi("test y ... \x1b[31mFAILED\x1b(B\x1b[m\x0f"),
            "test y ... FAILED"
        );
    }

    #[test]
    fn console_counts_results_and_failures() {
        let mut c = Console::default();
        for line in [
            "tcpshift-vm: kernel 6.1.0-56-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2",
            "test a ... ok",
            "test b ... FAILED",
            "---- b stdout ----",
            "---- c stdout ----",
            "test result: FAILED. 7 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out",
            "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
        ] {
            c.observe(line);
        }
        assert_eq!(c.release.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!((c.passed, c.failed, c.ignored), (12, 1, 2));
        assert_eq!(c.failures, ["b", "c"]);
    }

    #[test]
    fn test_names_drop_the_hash() {
        assert_eq!(
            test_name(Path::new("/t/release/deps/seed-0123abcd")),
            "seed"
        );
    }
}
