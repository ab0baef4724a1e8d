//! Network namespaces and the BPF filesystem.
//!
//! An sk_lookup program is attached to one network namespace, so everything tcpshift pins is
//! kept per namespace, under a directory named after the namespace's inode.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

/// Where bpffs is normally mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors about namespaces and bpffs.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error(
        "cannot open network namespace {path}: {error} (give a path such as /run/netns/NAME or /proc/PID/ns/net)"
    )]
    Open {
        /// The path given.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    /// The file is not a network namespace.
    #[error(
        "{path} is not a network namespace (give a path such as /run/netns/NAME or /proc/PID/ns/net)"
    )]
    NotNetns {
        /// The path given.
        path: PathBuf,
    },
    /// setns(2) failed.
    #[error("cannot enter network namespace {path}: {error} (this needs root)")]
    Enter {
        /// The path given.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    /// bpffs is not mounted and could not be mounted.
    #[error(
        "cannot mount bpffs on {path}: {error} (mount it with `mount -t bpf bpf {path}` as root)"
    )]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    inode: u64,
}

impl Netns {
    /// The network namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Opens the network namespace at `path` (e.g. `/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let open_err = |error| NetnsError::Open {
            path: path.to_path_buf(),
            error,
        };
        // O_NONBLOCK: a FIFO given by mistake must not block the open waiting for a writer.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(open_err)?;
        let inode = file.metadata().map_err(open_err)?.ino();
        // SAFETY: ioctl on an fd we own; NS_GET_NSTYPE takes no argument.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if nstype != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            inode,
        })
    }

    /// Moves the calling thread into this namespace. Threads started afterwards inherit it.
    pub fn enter(&self) -> Result<(), NetnsError> {
        // SAFETY: setns on an fd we own.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetnsError::Enter {
                path: self.path.clone(),
                error: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The namespace's inode number: its identity while it exists.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The file the namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open namespace file (to attach programs to).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// `NS_GET_NSTYPE` from linux/nsfs.h: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// `SO_NETNS_COOKIE` from asm-generic/socket.h (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace: the value `bpf_get_netns_cookie`
/// returns for its sockets. Read with `SO_NETNS_COOKIE` on a throwaway socket.
pub fn current_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned to us.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid out-pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Where the cgroup v2 hierarchy is mounted (its root as seen by this process), from
/// `/proc/self/mountinfo`; `None` when no cgroup2 filesystem is mounted.
pub fn cgroup2_root() -> io::Result<Option<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_cgroup2_root(&text))
}

/// The mount point of the first `cgroup2` line of a mountinfo text.
fn parse_cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split(' ').nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `path` is a mounted bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Mounts bpffs on `path` unless it is already there. Returns whether it mounted it.
pub fn ensure_bpffs(path: &Path) -> Result<bool, NetnsError> {
    if is_bpffs(path) {
        return Ok(false);
    }
    let err = |error| NetnsError::Mount {
        path: path.to_path_buf(),
        error,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    let target = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let mode = c"mode=0700";
    // SAFETY: valid C strings; no pointers retained by the kernel.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            mode.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_point() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_root(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure_v2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_root(pure_v2),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_root("31 23 0:28 / /x rw - tmpfs tmpfs rw\n"),
            None
        );
        let escaped = "41 31 0:38 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_root(escaped),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
    }

    #[test]
    fn netns_cookie_is_stable() {
        let a = current_cookie().expect("SO_NETNS_COOKIE");
        assert_eq!(a, current_cookie().expect("SO_NETNS_COOKIE"));
    }
}
