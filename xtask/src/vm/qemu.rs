//! Running QEMU: the command line, the console (serial ttyS0 on QEMU's stdout, passed through
//! line by line), a watchdog, and the quick KVM check.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context, Result};

use super::initramfs::{KVM_PROBE_MARKER, ROOT_TAG, Share};
use crate::cmd;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// How QEMU runs the guest's CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// Software emulation on every host core (`-accel tcg,thread=multi -cpu max`).
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The virtual machine's shape.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
}

/// Kernel command line: console on the first serial port; a panic powers the VM off at once
/// (with `-no-reboot`); no speculative-execution mitigations (they only slow emulation).
const CMDLINE: &str = "console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off rdinit=/init";

/// The QEMU command that boots `image` with `initramfs`, the host's root shared read-only and
/// `shares` as given. Its stdout is the guest's serial console.
pub fn command(machine: &Machine, image: &Path, initramfs: &Path, shares: &[Share]) -> Command {
    let mut qemu = Command::new(QEMU);
    match machine.accel {
        Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    qemu.args(["-m", &machine.memory_mib.to_string()])
        .args(["-smp", &machine.cpus.to_string()])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-monitor", "none", "-serial", "stdio", "-nic", "none"])
        .arg("-kernel")
        .arg(image)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", CMDLINE]);
    let root = Share {
        tag: ROOT_TAG,
        path: PathBuf::from("/"),
        writable: false,
    };
    for share in std::iter::once(&root).chain(shares) {
        let mut spec = format!(
            "local,path={},mount_tag={},security_model=none,multidevs=remap",
            share.path.display().to_string().replace(',', ",,"),
            share.tag
        );
        if !share.writable {
            spec.push_str(",readonly=on");
        }
        qemu.arg("-virtfs").arg(spec);
    }
    qemu.stdin(Stdio::null());
    qemu
}

/// How a QEMU run ended.
pub struct Finished {
    /// QEMU's exit status (after a kill: the signal).
    pub status: ExitStatus,
    /// Whether the watchdog killed it.
    pub timed_out: bool,
}

/// Runs `qemu`, passing each line of its stdout and stderr (the guest console and QEMU's own
/// messages, `\r` removed) to `on_line`; kills it when `on_line` returns `false` or after
/// `timeout`.
pub fn run(
    mut qemu: Command,
    timeout: Duration,
    mut on_line: impl FnMut(&str) -> bool,
) -> Result<Finished> {
    let (reader, writer) = std::io::pipe().context("cannot create a pipe")?;
    qemu.stdout(writer.try_clone().context("cannot duplicate a pipe")?)
        .stderr(writer);
    let mut child = qemu.spawn().with_context(|| {
        format!(
            "cannot start `{}` (install qemu-system-x86)",
            cmd::show(&qemu)
        )
    })?;
    drop(qemu); // our copies of the pipe's write end: reading ends when QEMU exits
    let pid = child.id();
    let timed_out = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = {
        let timed_out = Arc::clone(&timed_out);
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                timed_out.store(true, Ordering::SeqCst);
                kill(pid);
            }
        })
    };
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    let mut stopped = false;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .context("cannot read QEMU's output")?;
        if n == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
        if !stopped && !on_line(&line) {
            stopped = true;
            kill(pid);
        }
    }
    // QEMU is gone (or a zombie until we wait): stop the watchdog before reaping.
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let status = child.wait().context("cannot wait for QEMU")?;
    Ok(Finished {
        status,
        timed_out: timed_out.load(Ordering::SeqCst),
    })
}

fn kill(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; `pid` is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Whether this process may use /dev/kvm at all.
pub fn kvm_device_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Boots `image` with KVM and the probe initramfs: true when the guest reached userspace.
/// Some nested KVMs abort QEMU on MSR writes or stop with an emulation failure; those fail
/// fast (or after `timeout`) and make the caller fall back to TCG.
pub fn kvm_boots(
    machine: &Machine,
    image: &Path,
    probe_initramfs: &Path,
    timeout: Duration,
) -> Result<bool> {
    let machine = Machine {
        accel: Accel::Kvm,
        ..*machine
    };
    let mut reached = false;
    let mut tail = Vec::new();
    let finished = run(
        command(&machine, image, probe_initramfs, &[]),
        timeout,
        |line| {
            if line.contains(KVM_PROBE_MARKER) {
                reached = true;
            }
            if !line.trim().is_empty() {
                tail.push(line.to_string());
            }
            // An emulation failure leaves the VM stopped: no need to wait for the timeout.
            !line.contains("KVM internal error")
        },
    )?;
    if !reached {
        let why = if finished.timed_out {
            format!("no userspace after {timeout:?}")
        } else {
            tail.iter()
                .rev()
                .take(2)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ")
        };
        cmd::say(format_args!("KVM check: {why}"));
    }
    Ok(reached)
}

/// QEMU's version line (for the KVM check's cache key).
pub fn version() -> Result<String> {
    let out = cmd::output(Command::new(QEMU).arg("--version"))
        .context("QEMU is not installed (Debian package qemu-system-x86)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}
