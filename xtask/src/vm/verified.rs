//! How many instructions the kernel's verifier walked for each of tcpshift's programs
//! (`cargo xtask vm-test --guest-verified`, run by the guest script after the pre-flight
//! check; it runs on the host too). The sk_lookup program must stay under half of the
//! kernel's limit of 1 000 000 on every kernel tested.
//!
//! In a throwaway network namespace it starts `tcpshiftd` (from `TCPSHIFT_BIN_DIR`) with one
//! service, takes the programs' ids from `tcpshiftctl status --json` (`program_id`,
//! `accounting_program_id`), reads each program's `bpf_prog_info.verified_insns` (Linux 5.16
//! and later) and prints one line per program, [`LINE_PREFIX`]` NAME COUNT`, which the host
//! reads from the console ([`parse_line`]). tcpshiftd is then stopped and the state removed.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// What each line of the result starts with.
pub const LINE_PREFIX: &str = "tcpshift-vm: verified";

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// Offset of `verified_insns` in `struct bpf_prog_info` (include/uapi/linux/bpf.h).
const VERIFIED_INSNS_OFFSET: usize = 216;
/// Offset of `name[16]` in `struct bpf_prog_info`.
const NAME_OFFSET: usize = 64;

/// Starts tcpshiftd in a new network namespace and prints each program's verified
/// instruction count.
pub fn run(bin_dir: &Path, time_scale: u32) -> Result<()> {
    // SAFETY: unshare only changes this single-threaded process's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
    }
    let ok = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("cannot run `ip link set lo up`")?;
    if !ok.success() {
        bail!("`ip link set lo up` failed");
    }
    let dir = std::env::temp_dir().join(format!("tcpshift-verified-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("tcpshift.yaml");
    std::fs::write(
        &config,
        "services:\n  s:\n    listen: 31400\n    subsets: {v1: 127.0.0.1:9001}\n",
    )?;
    let log_path = dir.join("tcpshiftd.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut daemon = Command::new(bin_dir.join("tcpshiftd"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bin_dir.join("tcpshiftd").display()))?;
    let ctl = bin_dir.join("tcpshiftctl");
    let result = (|| {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60 * u64::from(time_scale.max(1)));
        let status: serde_json::Value = loop {
            let out = Command::new(&ctl).args(["status", "--json"]).output()?;
            if out.status.success()
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                && v["program_id"].is_u64()
            {
                break v;
            }
            let daemon_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(exit) = daemon.try_wait()? {
                bail!(
                    "tcpshiftd stopped ({exit}) before installing its programs; its log:\n{}",
                    daemon_log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "tcpshiftd did not install its programs within {} s; its log:\n{}",
                    deadline.duration_since(started).as_secs(),
                    daemon_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        for key in ["program_id", "accounting_program_id"] {
            let Some(id) = status[key].as_u64().and_then(|i| u32::try_from(i).ok()) else {
                println!("{LINE_PREFIX} ({key} not loaded) -");
                continue;
            };
            let (name, insns) = prog_info(id)?;
            println!("{LINE_PREFIX} {name} {insns}");
        }
        Ok(())
    })();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = Command::new(&ctl).arg("uninstall").output();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `(name, verified_insns)` of the program with id `id`.
fn prog_info(id: u32) -> Result<(String, u64)> {
    #[repr(C)]
    struct GetFd {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = GetFd {
        prog_id: id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
        .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
    // SAFETY: the kernel just returned this new descriptor to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = [0u8; 256];
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = GetInfo {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    if (attr.info_len as usize) < VERIFIED_INSNS_OFFSET + 4 {
        bail!("this kernel reports no verified instruction count (Linux >= 5.16 does)");
    }
    Ok(decode_info(&info))
}

/// `(name, verified_insns)` from the bytes of a `struct bpf_prog_info`.
fn decode_info(info: &[u8; 256]) -> (String, u64) {
    let name = &info[NAME_OFFSET..NAME_OFFSET + 16];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let mut count = [0u8; 4];
    count.copy_from_slice(&info[VERIFIED_INSNS_OFFSET..VERIFIED_INSNS_OFFSET + 4]);
    (
        String::from_utf8_lossy(&name[..end]).into_owned(),
        u64::from(u32::from_ne_bytes(count)),
    )
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr, valid for its size; the kernel
    // treats the missing tail as zero.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(r).map_err(|_| io::Error::other("bpf returned an out-of-range value"))
}

/// A console line printed by [`run`]: `(program name, verified instruction count)`.
pub fn parse_line(line: &str) -> Option<(String, u64)> {
    let rest = line.trim().strip_prefix(LINE_PREFIX)?;
    let mut words = rest.split_whitespace();
    let name = words.next()?;
    let count = words.next()?.parse().ok()?;
    Some((name.to_string(), count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_prog_info_are_read() {
        assert_eq!(
            parse_line("tcpshift-vm: verified tcpshift_sk_lookup 412345"),
            Some(("tcpshift_sk_lookup".into(), 412_345))
        );
        assert_eq!(
            parse_line("  tcpshift-vm: verified tcpshift_sock_op 1234\r"),
            Some(("tcpshift_sock_op".into(), 1234))
        );
        assert_eq!(
            parse_line("tcpshift-vm: verified (accounting_program_id not loaded) -"),
            None
        );
        assert_eq!(parse_line("tcpshift-vm: kernel 6.1.0"), None);
        let mut info = [0u8; 256];
        info[NAME_OFFSET..NAME_OFFSET + 18 - 2].copy_from_slice(b"tcpshift_sk_look");
        info[VERIFIED_INSNS_OFFSET..VERIFIED_INSNS_OFFSET + 4]
            .copy_from_slice(&697_000u32.to_ne_bytes());
        assert_eq!(decode_info(&info), ("tcpshift_sk_look".into(), 697_000));
    }
}
