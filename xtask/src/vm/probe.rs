//! The guest's pre-flight check (`cargo xtask vm-test --guest-probe`, run by the guest script
//! before the suite): does this kernel have what tcpshift needs? A missing feature is named,
//! with the kernel's release and the version that introduced it, instead of letting every
//! test fail on an obscure loader error. Keep it in step with what tcpshift-ebpf uses: each
//! check loads the smallest program that needs the feature.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result, anyhow, bail};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_FUNC_GET_NETNS_COOKIE: u8 = 122;
const BPF_SK_LOOKUP: u32 = 36;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;

/// Prints what the kernel supports; fails naming the first missing feature.
pub fn run() -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("cannot read /proc/sys/kernel/osrelease")?;
    let release = release.trim();
    let missing = |feature: &str, detail: &dyn std::fmt::Display| {
        anyhow!("missing kernel feature: {feature}; kernel {release} lacks it ({detail})")
    };
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(missing(
            "BTF type information (CONFIG_DEBUG_INFO_BTF)",
            &"no /sys/kernel/btf/vmlinux",
        ));
    }
    // A throwaway namespace for the test link (it goes away with this process).
    // SAFETY: unshare only changes this single-threaded process's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!(
            "unshare(CLONE_NEWNET): {} (the probe runs as root in the guest)",
            io::Error::last_os_error()
        );
    }
    let prog = match load(BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP, &[MOV_R0_1, EXIT]) {
        Ok(fd) => fd,
        Err((e, log)) if is_unsupported(&e) => {
            return Err(missing(
                "sk_lookup BPF programs (BPF_PROG_TYPE_SK_LOOKUP, Linux >= 5.9)",
                &format!("BPF_PROG_LOAD: {e}; {log}"),
            ));
        }
        Err((e, log)) => bail!("cannot load a trivial sk_lookup program: {e}; verifier: {log}"),
    };
    let netns = File::open("/proc/self/ns/net").context("cannot open /proc/self/ns/net")?;
    match link_create(&prog, &netns) {
        Ok(_link) => {}
        Err(e) if is_unsupported(&e) => {
            return Err(missing(
                "BPF links on network namespaces for sk_lookup (BPF_LINK_CREATE, Linux >= 5.9)",
                &format!("BPF_LINK_CREATE: {e}"),
            ));
        }
        Err(e) => bail!("cannot attach a sk_lookup program to a network namespace: {e}"),
    }
    match sockhash() {
        Ok(_map) => {}
        Err(e) if is_unsupported(&e) => {
            return Err(missing(
                "sockhash maps (BPF_MAP_TYPE_SOCKHASH, Linux >= 4.18)",
                &format!("BPF_MAP_CREATE: {e}"),
            ));
        }
        Err(e) => bail!("cannot create a sockhash map: {e}"),
    }
    // Connection accounting (sock_ops.rs) tells namespaces apart by their cookie.
    let call_cookie = u64::from_le_bytes([0x85, 0, 0, 0, BPF_FUNC_GET_NETNS_COOKIE, 0, 0, 0]);
    match load(BPF_PROG_TYPE_SOCK_OPS, 0, &[call_cookie, MOV_R0_1, EXIT]) {
        Ok(_prog) => {}
        Err((e, log)) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EACCES) => {
            return Err(missing(
                "bpf_get_netns_cookie in sock_ops programs (connection accounting, Linux >= 5.15)",
                &format!("BPF_PROG_LOAD: {e}; verifier: {log}"),
            ));
        }
        Err((e, log)) => bail!("cannot load a trivial sock_ops program: {e}; verifier: {log}"),
    }
    println!(
        "tcpshift-vm: kernel {release} has BTF, sk_lookup programs, netns BPF links, sockhash maps \
         and bpf_get_netns_cookie in sock_ops"
    );
    Ok(())
}

/// The kernel's ENOTSUPP (not in libc: it is kernel-internal but reaches userspace from BPF).
const ENOTSUPP: i32 = 524;

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::E2BIG | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr, valid for its size; the kernel
    // treats the missing tail as zero.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf returned no fd"))?;
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `mov64 r0, 1` (SK_PASS, or "done" for sock_ops).
const MOV_R0_1: u64 = u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]);
/// `exit`.
const EXIT: u64 = u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]);

/// Loads `insns` as a program of `prog_type`; on failure returns the error and the verifier log.
fn load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
) -> std::result::Result<OwnedFd, (io::Error, String)> {
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: u32::try_from(insns.len()).unwrap_or(u32::MAX),
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: 4096,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type,
        ..Default::default()
    };
    bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end])
            .trim()
            .replace('\n', " | ");
        (e, text)
    })
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

fn link_create(prog: &OwnedFd, netns: &File) -> io::Result<OwnedFd> {
    let fd = |f: i32| u32::try_from(f).map_err(|_| io::Error::other("negative fd"));
    let mut attr = LinkCreateAttr {
        prog_fd: fd(prog.as_raw_fd())?,
        target_fd: fd(netns.as_raw_fd())?,
        attach_type: BPF_SK_LOOKUP,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &mut attr)
}

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

fn sockhash() -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_SOCKHASH,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    bpf(BPF_MAP_CREATE, &mut attr)
}
