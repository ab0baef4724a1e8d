//! Taking a listening socket from the process that holds it: found with the `/proc` walker
//! ([`procfs::walk_sockets`]), duplicated with `pidfd_getfd(2)`, then checked.

use std::{
    io,
    ops::ControlFlow,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use super::{DiscoveryError, Owner};
use crate::procfs::{self, Process};

/// Takes a reference to the socket with this inode from whichever process holds it.
///
/// Walks `/proc/PID/fd/*` (our own fd table first, then processes by ascending pid, see
/// [`procfs::walk_sockets`]) for the socket, then duplicates it with `pidfd_open(2)` +
/// `pidfd_getfd(2)`, or with `fcntl(F_DUPFD_CLOEXEC)` if we hold it ourselves. The duplicate
/// is checked to be the same inode (`fstat`) and a listening TCP socket (`SO_ACCEPTCONN` = 1,
/// `SO_PROTOCOL` = `IPPROTO_TCP`). Processes or fds that vanish during the scan are skipped.
/// The returned fd is close-on-exec and owned by the caller, who should drop it once done with
/// it so that no extra reference to the backend's socket stays open.
pub fn take_socket(inode: u64) -> Result<(OwnedFd, Owner), DiscoveryError> {
    let walked = procfs::walk_sockets(|process, fd, socket| {
        if socket != inode {
            return ControlFlow::Continue(());
        }
        match take_from(process, fd, inode) {
            Ok(Some(found)) => ControlFlow::Break(Ok(found)),
            // The process exited or closed the fd, or the number was reused: look further.
            Ok(None) => ControlFlow::Continue(()),
            Err(e) => ControlFlow::Break(Err(e)),
        }
    })?;
    match walked.found {
        Some(found) => found,
        None => Err(DiscoveryError::NotFound {
            inode,
            denied: walked.denied,
        }),
    }
}

/// Duplicates fd `fd` of `process` (which the walker saw as socket `inode`) and checks it.
/// `Ok(None)` if the process or the fd is gone, or the fd number now names another file.
pub(super) fn take_from(
    process: &Process,
    fd: i32,
    inode: u64,
) -> Result<Option<(OwnedFd, Owner)>, DiscoveryError> {
    let owner = Owner {
        pid: process.pid(),
        fd,
        comm: process.comm(),
    };
    let dup = if process.is_current() {
        dup_own(fd)?
    } else {
        getfd(&owner)?
    };
    match dup {
        Some(dup) => verify(dup, inode, owner),
        None => Ok(None),
    }
}

/// Duplicates one of our own fds (no pidfd needed). `Ok(None)` if it was closed meanwhile.
fn dup_own(fd: i32) -> Result<Option<OwnedFd>, DiscoveryError> {
    // SAFETY: fcntl on a raw fd number; if it was closed meanwhile this fails with EBADF, and
    // if it was reused the inode check of `verify` catches it.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EBADF) {
            return Ok(None);
        }
        return Err(DiscoveryError::Dup { fd, source: err });
    }
    // SAFETY: `dup` is a fresh fd we own.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(dup) }))
}

/// Duplicates `owner.fd` of process `owner.pid` into this process. `Ok(None)` if the process
/// or the fd is gone.
pub(super) fn getfd(owner: &Owner) -> Result<Option<OwnedFd>, DiscoveryError> {
    // SAFETY: plain syscall with integer arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, owner.pid, 0) };
    if pidfd < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(None);
        }
        return Err(DiscoveryError::PidfdOpen {
            pid: owner.pid,
            source: err,
        });
    }
    // SAFETY: pidfd_open returned a fresh fd, which we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), owner.fd, 0) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        // ESRCH: the process exited (or is exiting); EBADF: it closed the fd.
        if matches!(err.raw_os_error(), Some(libc::ESRCH | libc::EBADF)) {
            return Ok(None);
        }
        return Err(DiscoveryError::PidfdGetfd {
            pid: owner.pid,
            fd: owner.fd,
            comm: owner.comm.clone(),
            source: err,
        });
    }
    // SAFETY: pidfd_getfd returned a fresh (close-on-exec) fd, which we now own.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
}

/// Checks that `fd` is socket `inode` and a listening TCP socket. `Ok(None)` if it is another
/// file (the fd number was reused after we read the link).
pub(super) fn verify(
    fd: OwnedFd,
    inode: u64,
    owner: Owner,
) -> Result<Option<(OwnedFd, Owner)>, DiscoveryError> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(DiscoveryError::Inspect {
            owner,
            op: "fstat",
            source: io::Error::last_os_error(),
        });
    }
    if st.st_ino != inode || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Ok(None);
    }
    let inspect = |op, source| DiscoveryError::Inspect {
        owner: owner.clone(),
        op,
        source,
    };
    let protocol = getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)
        .map_err(|e| inspect("getsockopt(SO_PROTOCOL)", e))?;
    let accepting = getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
        .map_err(|e| inspect("getsockopt(SO_ACCEPTCONN)", e))?;
    let reason = if protocol == libc::IPPROTO_UDP {
        // A UDP server's socket (found in /proc/net/udp, unconnected): nothing to accept.
        None
    } else if protocol != libc::IPPROTO_TCP {
        Some(format!("protocol {protocol}, neither TCP nor UDP"))
    } else if accepting != 1 {
        Some("not listening (SO_ACCEPTCONN is 0)".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(DiscoveryError::NotListeningTcp {
            inode,
            owner,
            reason,
        }),
        None => Ok(Some((fd, owner))),
    }
}

/// `getsockopt` for an `int` option.
pub(super) fn getsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(val)
}
