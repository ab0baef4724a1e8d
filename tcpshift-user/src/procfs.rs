//! Processes as `/proc` shows them: which there are, which sockets they hold, and who they
//! are (command name, user, cgroup, network namespace).
//!
//! The one place that walks `/proc`: [`discovery`](crate::discovery) finds the holder of a
//! listening socket with [`walk_sockets`], and `tcpshiftctl apply` looks for a running
//! `tcpshiftd` with [`processes`]. Per-thread things (the fd table, which a thread may have
//! unshared, and the network namespace, which `setns(2)` changes per thread) are read for this
//! process through `/proc/thread-self`, never `/proc/self`.

use std::{
    fs, io,
    ops::ControlFlow,
    path::{Path, PathBuf},
};

use crate::netns::{Netns, NetnsError};

/// `/proc` could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ProcError {
    /// The path that failed.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: io::Error,
}

/// A process, by its id in this PID namespace. It may exit at any time: every method then
/// fails (or returns an empty value) instead of panicking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Process {
    pid: i32,
    /// Whether this is the calling process (read through `/proc/thread-self`).
    current: bool,
}

impl Process {
    /// The process with this id.
    pub fn new(pid: i32) -> Self {
        Self {
            pid,
            current: pid == std::process::id() as i32,
        }
    }

    /// The calling process.
    pub fn current() -> Self {
        Self::new(std::process::id() as i32)
    }

    /// Its process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether it is the calling process.
    pub fn is_current(&self) -> bool {
        self.current
    }

    /// `/proc/PID`: what the whole process shares.
    fn dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}", self.pid))
    }

    /// Where its per-thread files are: `/proc/thread-self` for the calling thread.
    fn thread_dir(&self) -> PathBuf {
        if self.current {
            PathBuf::from("/proc/thread-self")
        } else {
            self.dir()
        }
    }

    /// Its command name (`/proc/PID/comm`, at most 15 bytes); empty if it cannot be read.
    pub fn comm(&self) -> String {
        fs::read_to_string(self.dir().join("comm"))
            .map(|s| s.trim_end_matches('\n').to_owned())
            .unwrap_or_default()
    }

    /// Its effective user id (the `Uid:` line of `/proc/PID/status`, as `ps -o uid` shows).
    pub fn uid(&self) -> io::Result<u32> {
        let status = fs::read_to_string(self.dir().join("status"))?;
        parse_status_uid(&status).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no effective uid on the Uid: line",
            )
        })
    }

    /// Its cgroup v2 path (the `0::PATH` line of `/proc/PID/cgroup`, relative to the cgroup2
    /// root); `None` when it is in no v2 hierarchy.
    pub fn cgroup(&self) -> io::Result<Option<String>> {
        let text = fs::read_to_string(self.dir().join("cgroup"))?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_owned))
    }

    /// Its network namespace (for the calling process: the calling thread's).
    pub fn netns(&self) -> Result<Netns, NetnsError> {
        Netns::open(&self.thread_dir().join("ns/net"))
    }

    /// The path of one of its file descriptors (`/proc/PID/fd/FD`).
    pub fn fd_path(&self, fd: i32) -> PathBuf {
        self.thread_dir().join("fd").join(fd.to_string())
    }

    /// Its open file descriptor numbers, ascending.
    pub fn fds(&self) -> io::Result<Vec<i32>> {
        numbers(&self.thread_dir().join("fd"))
    }

    /// The inode of the socket that its fd `fd` is, or `None` (not a socket, closed, or not
    /// readable).
    pub fn socket_inode(&self, fd: i32) -> Option<u64> {
        let link = fs::read_link(self.fd_path(fd)).ok()?;
        link.to_str()?
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    }
}

/// The effective uid on the `Uid:` line of a `/proc/PID/status` text.
fn parse_status_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The entries of a directory that are numbers (pids, fds), ascending.
fn numbers(dir: &Path) -> io::Result<Vec<i32>> {
    let mut out: Vec<i32> = fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Every process visible in `/proc`: the calling one first, then the others by ascending pid.
pub fn processes() -> Result<Vec<Process>, ProcError> {
    let me = Process::current();
    let pids = numbers(Path::new("/proc")).map_err(|source| ProcError {
        path: PathBuf::from("/proc"),
        source,
    })?;
    Ok(std::iter::once(me)
        .chain(pids.into_iter().filter(|&p| p != me.pid).map(Process::new))
        .collect())
}

/// What [`walk_sockets`] ended with.
#[derive(Debug)]
pub struct Walked<B> {
    /// What the visitor stopped with, if it stopped.
    pub found: Option<B>,
    /// How many processes' fd tables could not be read for lack of permission.
    pub denied: usize,
}

/// Calls `visit(process, fd, socket inode)` for every socket fd of every process, in the order
/// of [`processes`] and then of ascending fd, until it breaks. Processes that exit and fds
/// that close meanwhile are skipped; fd tables that may not be read are counted in
/// [`Walked::denied`].
pub fn walk_sockets<B>(
    mut visit: impl FnMut(&Process, i32, u64) -> ControlFlow<B>,
) -> Result<Walked<B>, ProcError> {
    let mut denied = 0;
    for process in processes()? {
        let fds = match process.fds() {
            Ok(fds) => fds,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                denied += 1;
                continue;
            }
            // Gone (ENOENT/ESRCH), a zombie, or otherwise unreadable: skip.
            Err(_) => continue,
        };
        for fd in fds {
            let Some(inode) = process.socket_inode(fd) else {
                continue;
            };
            if let ControlFlow::Break(found) = visit(&process, fd, inode) {
                return Ok(Walked {
                    found: Some(found),
                    denied,
                });
            }
        }
    }
    Ok(Walked {
        found: None,
        denied,
    })
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::fd::AsRawFd};

    use super::*;

    #[test]
    fn this_process_comes_first_and_once() {
        let all = processes().expect("/proc");
        let me = std::process::id() as i32;
        assert_eq!(all[0].pid(), me);
        assert!(all[0].is_current());
        assert_eq!(all.iter().filter(|p| p.pid() == me).count(), 1);
        assert!(all[1..].windows(2).all(|w| w[0].pid() < w[1].pid()));
    }

    #[test]
    fn finds_our_own_socket_with_its_fd() {
        let sock = TcpListener::bind("127.0.0.1:0").expect("bind");
        let me = Process::current();
        let inode = me.socket_inode(sock.as_raw_fd()).expect("a socket");
        let walked = walk_sockets(|p, fd, ino| {
            if ino == inode {
                ControlFlow::Break((p.pid(), fd))
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect("/proc");
        assert_eq!(walked.found, Some((me.pid(), sock.as_raw_fd())));
        assert!(me.fds().expect("fds").contains(&sock.as_raw_fd()));
    }

    #[test]
    fn who_a_process_is() {
        let me = Process::current();
        assert!(!me.comm().is_empty());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(me.uid().expect("status"), unsafe { libc::geteuid() });
        assert_eq!(
            me.netns().expect("netns").inode(),
            Netns::current().expect("netns").inode()
        );
        me.cgroup().expect("cgroup");
        assert_eq!(parse_status_uid("Name:\tx\nUid:\t1\t2\t3\t4\n"), Some(2));
        assert_eq!(parse_status_uid("Name:\tx\n"), None);
    }
}
