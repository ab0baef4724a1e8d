//! Network namespaces and the BPF filesystem.
//!
//! An sk_lookup program is attached to one network namespace, so everything tcpshift pins is
//! kept per namespace, under a directory named after the namespace's inode.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
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
        let file = File::open(path).map_err(open_err)?;
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
