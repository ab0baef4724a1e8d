//! Finding a backend's listening socket and taking a reference to it.
//!
//! The loader is given backend addresses such as `127.0.0.1:9001` and must put the listening
//! socket that serves each one into a BPF sockhash, without the backend's cooperation. This
//! module does that in three steps:
//!
//! 1. [`listeners`] lists the listening TCP sockets of the current thread's network namespace
//!    from `/proc/thread-self/net/tcp` and `tcp6`;
//! 2. [`find_listener`] picks the one that serves an address (exact match, then wildcards,
//!    dual-stack and v4-mapped listeners);
//! 3. [`take_socket`] finds the process holding that socket (by its inode, through
//!    `/proc/PID/fd`) and duplicates it into this process with `pidfd_getfd(2)`.
//!
//! [`acquire`] does all three. Network namespaces are per thread, so everything here reads
//! `/proc/thread-self/...`, never `/proc/self/...`: a thread that entered another namespace
//! with `setns(2)` sees that namespace's sockets.

use std::{
    collections::HashSet,
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

/// Where the current thread's IPv4 TCP sockets are listed.
const PROC_NET_TCP: &str = "/proc/thread-self/net/tcp";
/// Where the current thread's IPv6 TCP sockets are listed.
const PROC_NET_TCP6: &str = "/proc/thread-self/net/tcp6";
/// The current thread's network namespace.
const PROC_NS_NET: &str = "/proc/thread-self/ns/net";
/// The current thread's file descriptors (the fd table is per process unless a thread
/// unshared it, in which case this is the right one to read).
const PROC_THREAD_SELF_FD: &str = "/proc/thread-self/fd";
/// `TCP_LISTEN` in the `st` column of `/proc/net/tcp`.
const TCP_LISTEN: u8 = 0x0A;

/// A listening TCP socket seen in the current thread's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Listener {
    /// The socket's inode number (unique among open sockets on the host).
    pub inode: u64,
    /// The address the socket is bound to, as listed by the kernel (no IPv6 scope id).
    pub local: SocketAddr,
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (socket inode {})", self.local, self.inode)
    }
}

/// Who holds a socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// The holder's process id (as seen in this PID namespace).
    pub pid: i32,
    /// The file descriptor number of the socket in the holder.
    pub fd: i32,
    /// The holder's command name (`/proc/PID/comm`); empty if it could not be read.
    pub comm: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({}) fd {}", self.pid, self.comm, self.fd)
    }
}

/// Errors while discovering or taking sockets.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A `/proc` file or directory could not be read.
    #[error("cannot read {path}: {source} (is /proc mounted, and is this Linux?)")]
    ReadProc {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A line of `/proc/thread-self/net/tcp{,6}` did not have the expected format.
    #[error(
        "cannot parse line {line_no} of {path} ({reason}): {line:?} (unexpected kernel output format)"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line_no: usize,
        /// The offending line.
        line: String,
        /// What was wrong with it.
        reason: String,
    },
    /// No process visible to us holds the socket.
    #[error(
        "no process holds socket inode {inode}{}: the backend may have exited or closed the socket, \
         or it runs in a PID namespace this process cannot see (run the loader in the host PID namespace)",
        if *.denied > 0 { format!(" among the processes we may inspect ({} skipped: permission denied; run as root)", .denied) } else { String::new() }
    )]
    NotFound {
        /// The socket's inode.
        inode: u64,
        /// How many processes' fd tables could not be read for lack of permission.
        denied: usize,
    },
    /// `pidfd_open(2)` failed for a reason other than the process having exited.
    #[error("pidfd_open({pid}) failed: {source} (needs Linux >= 5.3)")]
    PidfdOpen {
        /// The process.
        pid: i32,
        /// The underlying error.
        source: io::Error,
    },
    /// `pidfd_getfd(2)` failed for a reason other than the process or fd having gone.
    #[error(
        "cannot take fd {fd} from pid {pid} ({comm}) with pidfd_getfd: {source} \
         (needs Linux >= 5.6 and ptrace access to the process: run as root or with CAP_SYS_PTRACE, \
         and check kernel.yama.ptrace_scope)"
    )]
    PidfdGetfd {
        /// The process.
        pid: i32,
        /// The fd in that process.
        fd: i32,
        /// The process' command name.
        comm: String,
        /// The underlying error.
        source: io::Error,
    },
    /// Duplicating one of our own fds failed.
    #[error("cannot duplicate our own fd {fd}: {source} (too many open files? check `ulimit -n`)")]
    Dup {
        /// The fd.
        fd: i32,
        /// The underlying error.
        source: io::Error,
    },
    /// `fstat`/`getsockopt` on the duplicated fd failed.
    #[error("cannot inspect the socket taken from {owner}: {op}: {source}")]
    Inspect {
        /// Who held the socket.
        owner: Owner,
        /// Which call failed.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The socket with that inode is not (or no longer) a listening TCP socket.
    #[error(
        "socket inode {inode} held by {owner} is not a listening TCP socket ({reason}); \
         did the backend stop listening?"
    )]
    NotListeningTcp {
        /// The socket's inode.
        inode: u64,
        /// Who holds it.
        owner: Owner,
        /// What did not match.
        reason: String,
    },
    /// The only listener for an IPv4 address is an IPv6 wildcard socket with `IPV6_V6ONLY`
    /// set, which cannot accept IPv4 connections.
    #[error(
        "{listener} held by {owner} is IPv6-only (IPV6_V6ONLY) and cannot serve IPv4 address {addr}; \
         make the backend listen on 0.0.0.0 or dual-stack [::], or use an IPv6 backend address"
    )]
    V6Only {
        /// The backend address asked for.
        addr: SocketAddr,
        /// The IPv6-only listener.
        listener: Listener,
        /// Who holds it.
        owner: Owner,
    },
}

/// Listening sockets in the current thread's netns, from `/proc/thread-self/net/tcp` and
/// `tcp6` (state `0A`).
///
/// Addresses are decoded as the kernel prints them: an IPv4 address is one 32-bit word and an
/// IPv6 address four, each the raw network-order bytes printed as a host-order hex number
/// (so little-endian hosts show `127.0.0.1` as `0100007F`); ports are printed in host order.
/// A missing `tcp6` (IPv6 disabled) is not an error. The result is sorted by address, then
/// inode.
pub fn listeners() -> Result<Vec<Listener>, DiscoveryError> {
    let mut out = Vec::new();
    for (path, optional) in [(PROC_NET_TCP, false), (PROC_NET_TCP6, true)] {
        let path = Path::new(path);
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if optional && e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(DiscoveryError::ReadProc {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        out.extend(parse_proc_net_tcp(&text, path)?);
    }
    out.sort_by_key(|l| (l.local, l.inode));
    Ok(out)
}

/// Parses the text of a `/proc/net/tcp` or `/proc/net/tcp6` file and returns its listening
/// sockets (state `0A`, non-zero inode). `path` is only used in error messages.
pub fn parse_proc_net_tcp(text: &str, path: &Path) -> Result<Vec<Listener>, DiscoveryError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // The first line is the column header.
        if i == 0 || line.trim().is_empty() {
            continue;
        }
        let parsed = parse_line(line).map_err(|reason| DiscoveryError::Parse {
            path: path.to_path_buf(),
            line_no: i + 1,
            line: line.to_owned(),
            reason,
        })?;
        if let Some(listener) = parsed {
            out.push(listener);
        }
    }
    Ok(out)
}

/// Parses one socket line; `Ok(None)` for sockets that are not listening.
fn parse_line(line: &str) -> Result<Option<Listener>, String> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        return Err(format!("expected at least 10 fields, got {}", fields.len()));
    }
    let state =
        u8::from_str_radix(fields[3], 16).map_err(|e| format!("bad state {:?}: {e}", fields[3]))?;
    if state != TCP_LISTEN {
        return Ok(None);
    }
    let local = parse_hex_sockaddr(fields[1])?;
    let inode: u64 = fields[9]
        .parse()
        .map_err(|e| format!("bad inode {:?}: {e}", fields[9]))?;
    if inode == 0 {
        // Not backed by a file: nothing can hold it, so nothing can take it.
        return Ok(None);
    }
    Ok(Some(Listener { inode, local }))
}

/// Parses `ADDR:PORT` in `/proc/net/tcp{,6}` hex notation.
fn parse_hex_sockaddr(s: &str) -> Result<SocketAddr, String> {
    let (addr, port) = s
        .split_once(':')
        .ok_or_else(|| format!("bad address {s:?}: no ':'"))?;
    let port = u16::from_str_radix(port, 16).map_err(|e| format!("bad port in {s:?}: {e}"))?;
    let word = |hex: &str| -> Result<[u8; 4], String> {
        u32::from_str_radix(hex, 16)
            .map(u32::to_ne_bytes)
            .map_err(|e| format!("bad address {s:?}: {e}"))
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                let hex = addr
                    .get(i * 8..i * 8 + 8)
                    .ok_or_else(|| format!("bad address {s:?}: not hex"))?;
                chunk.copy_from_slice(&word(hex)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        n => {
            return Err(format!(
                "bad address {s:?}: {n} hex digits, expected 8 or 32"
            ));
        }
    };
    Ok(SocketAddr::new(ip, port))
}

/// How well a listener's address serves a backend address; lower is better, `None` means not
/// at all.
fn rank(addr: SocketAddr, local: SocketAddr) -> Option<u8> {
    if local.port() != addr.port() {
        return None;
    }
    // A v4-mapped backend address is reached by IPv4 packets: treat it as IPv4.
    let want = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let have = local.ip();
    match want {
        IpAddr::V4(w) if w.is_unspecified() => match have {
            IpAddr::V4(h) if h.is_unspecified() => Some(0),
            IpAddr::V6(h) if h.is_unspecified() => Some(1),
            IpAddr::V4(_) => Some(2),
            IpAddr::V6(_) => Some(3),
        },
        IpAddr::V6(w) if w.is_unspecified() => match have {
            IpAddr::V6(h) if h.is_unspecified() => Some(0),
            IpAddr::V4(h) if h.is_unspecified() => Some(1),
            IpAddr::V6(_) => Some(2),
            IpAddr::V4(_) => Some(3),
        },
        IpAddr::V4(w) => match have {
            IpAddr::V4(h) if h == w => Some(0),
            IpAddr::V6(h) if h.to_ipv4_mapped() == Some(w) => Some(1),
            IpAddr::V4(h) if h.is_unspecified() => Some(2),
            IpAddr::V6(h) if h.is_unspecified() => Some(3),
            _ => None,
        },
        IpAddr::V6(w) => match have {
            IpAddr::V6(h) if h == w => Some(0),
            IpAddr::V6(h) if h.is_unspecified() => Some(1),
            _ => None,
        },
    }
}

/// The listeners among `all` that can serve backend address `addr`, best first.
///
/// Order: an exact address match; for an IPv4 address, a v4-mapped `[::ffff:a.b.c.d]:P`
/// listener; a wildcard of the same family (`0.0.0.0:P` / `[::]:P`); for an IPv4 address, a
/// `[::]:P` listener (which serves IPv4 if it is dual-stack, see [`acquire`]). A v4-mapped
/// IPv6 `addr` is treated as the IPv4 address. If `addr`'s IP is unspecified (`0.0.0.0` or
/// `::`), every listener on the port qualifies: the same-family wildcard, the other wildcard,
/// then specific addresses of the same family, then of the other. Ties (e.g. `SO_REUSEPORT`
/// groups) are broken by address, then inode, so the choice is deterministic. The IPv6 scope
/// id of `addr` is ignored.
pub fn candidates(addr: SocketAddr, all: &[Listener]) -> Vec<Listener> {
    let mut ranked: Vec<(u8, Listener)> = all
        .iter()
        .filter_map(|l| rank(addr, l.local).map(|r| (r, *l)))
        .collect();
    ranked.sort_by_key(|(r, l)| (*r, l.local, l.inode));
    ranked.into_iter().map(|(_, l)| l).collect()
}

/// The best listener for backend address `addr`: exact address match first; else a wildcard of
/// the same family on that port (`0.0.0.0:P` for IPv4, `[::]:P` for IPv6); for an IPv4 addr
/// also a `[::]:P` listener (dual-stack) and a v4-mapped `[::ffff:a.b.c.d]:P` listener. If
/// addr's IP is unspecified (`0.0.0.0` or `::`), any listener on that port (wildcards
/// preferred). The full order is documented on [`candidates`]; the choice is deterministic.
pub fn find_listener(addr: SocketAddr) -> Result<Option<Listener>, DiscoveryError> {
    Ok(candidates(addr, &listeners()?).into_iter().next())
}

/// Takes a reference to the socket with this inode from whichever process holds it.
///
/// Scans `/proc/PID/fd/*` (our own fd table first, then processes by ascending pid) for the
/// link `socket:[INODE]`, then duplicates it with `pidfd_open(2)` + `pidfd_getfd(2)`, or with
/// `fcntl(F_DUPFD_CLOEXEC)` if we hold it ourselves. The duplicate is checked to be the same
/// inode (`fstat`) and a listening TCP socket (`SO_ACCEPTCONN` = 1, `SO_PROTOCOL` =
/// `IPPROTO_TCP`). Processes or fds that vanish during the scan are skipped. The returned fd
/// is close-on-exec and owned by the caller, who should drop it once done with it so that no
/// extra reference to the backend's socket stays open.
pub fn take_socket(inode: u64) -> Result<(OwnedFd, Owner), DiscoveryError> {
    let target = format!("socket:[{inode}]");
    let my_pid = std::process::id() as i32;

    // Ourselves first: no pidfd needed.
    if let Some(fds) = read_fd_dir(Path::new(PROC_THREAD_SELF_FD))? {
        for fd in fds {
            if !link_is(
                &Path::new(PROC_THREAD_SELF_FD).join(fd.to_string()),
                &target,
            ) {
                continue;
            }
            // SAFETY: fcntl on a raw fd number; if it was closed meanwhile this fails with
            // EBADF, and if it was reused the inode check below catches it.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EBADF) {
                    continue;
                }
                return Err(DiscoveryError::Dup { fd, source: err });
            }
            // SAFETY: `dup` is a fresh fd we own.
            let owned = unsafe { OwnedFd::from_raw_fd(dup) };
            let owner = Owner {
                pid: my_pid,
                fd,
                comm: read_comm(my_pid),
            };
            if let Some(found) = verify(owned, inode, owner)? {
                return Ok(found);
            }
        }
    }

    let mut pids: Vec<i32> = fs::read_dir("/proc")
        .map_err(|source| DiscoveryError::ReadProc {
            path: PathBuf::from("/proc"),
            source,
        })?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| pid != my_pid)
        .collect();
    pids.sort_unstable();

    let mut denied = 0;
    for pid in pids {
        let dir = PathBuf::from(format!("/proc/{pid}/fd"));
        let fds = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                denied += 1;
                continue;
            }
            // Gone (ENOENT/ESRCH), a zombie, or otherwise unreadable: skip.
            Err(_) => continue,
        };
        let mut fds: Vec<i32> = fds
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort_unstable();
        for fd in fds {
            if !link_is(&dir.join(fd.to_string()), &target) {
                continue;
            }
            let owner = Owner {
                pid,
                fd,
                comm: read_comm(pid),
            };
            let Some(owned) = getfd(&owner)? else {
                // The process exited or closed the fd: look further.
                continue;
            };
            if let Some(found) = verify(owned, inode, owner)? {
                return Ok(found);
            }
        }
    }
    Err(DiscoveryError::NotFound { inode, denied })
}

/// `find_listener` + `take_socket`. `Ok(None)` when nothing listens on `addr`.
///
/// Tries the candidates of [`candidates`] in order. For an IPv4 `addr` served by an IPv6
/// wildcard socket, the socket must be dual-stack (`IPV6_V6ONLY` off); an IPv6-only one is
/// skipped, and if no other candidate is left the result is [`DiscoveryError::V6Only`].
/// A listener that disappears between listing and taking is skipped as well.
pub fn acquire(addr: SocketAddr) -> Result<Option<(OwnedFd, Listener, Owner)>, DiscoveryError> {
    acquire_from(addr, candidates(addr, &listeners()?), take_socket)
}

/// [`acquire`] over `candidates` (in order), taking each socket with `take`.
fn acquire_from(
    addr: SocketAddr,
    candidates: Vec<Listener>,
    mut take: impl FnMut(u64) -> Result<(OwnedFd, Owner), DiscoveryError>,
) -> Result<Option<(OwnedFd, Listener, Owner)>, DiscoveryError> {
    let mut v6only = None;
    let mut last_not_found = None;
    for listener in candidates {
        let (fd, owner) = match take(listener.inode) {
            Ok(found) => found,
            // Closed since we listed it; another candidate may still serve.
            Err(e @ DiscoveryError::NotFound { .. }) => {
                last_not_found = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let wants_v4 = match addr.ip() {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
        };
        if wants_v4 && listener.local.is_ipv6() {
            let only =
                getsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).map_err(|source| {
                    DiscoveryError::Inspect {
                        owner: owner.clone(),
                        op: "getsockopt(IPV6_V6ONLY)",
                        source,
                    }
                })?;
            if only != 0 {
                v6only.get_or_insert(DiscoveryError::V6Only {
                    addr,
                    listener,
                    owner,
                });
                continue;
            }
        }
        return Ok(Some((fd, listener, owner)));
    }
    match v6only {
        Some(e) => Err(e),
        // Every candidate vanished: nothing listens any more, unless permissions hid it.
        None => match last_not_found {
            Some(e @ DiscoveryError::NotFound { denied, .. }) if denied > 0 => Err(e),
            _ => Ok(None),
        },
    }
}

/// A snapshot of the current thread's network namespace for taking many sockets at once:
/// its listening sockets, listed once, and — built on first need, with one pass over
/// `/proc/*/fd` — which process holds each of them. [`Snapshot::acquire`] is [`acquire`]
/// without re-reading `/proc` for every address, so registering thousands of subsets costs one
/// scan instead of thousands. A process that exited or closed its socket since the snapshot
/// is handled as [`acquire`] does (the next candidate is tried).
pub struct Snapshot {
    listeners: Vec<Listener>,
    /// The listeners by port (a candidate always has the address's port).
    by_port: std::collections::HashMap<u16, Vec<Listener>>,
    /// Socket inode → (pid, fd) of its first holder (this process counts as any other).
    holders: Option<std::collections::HashMap<u64, (i32, i32)>>,
    /// Processes whose fd tables could not be read for lack of permission.
    denied: usize,
}

impl Snapshot {
    /// Lists the listening sockets of the current thread's network namespace.
    pub fn take() -> Result<Self, DiscoveryError> {
        let listeners = listeners()?;
        let mut by_port: std::collections::HashMap<u16, Vec<Listener>> =
            std::collections::HashMap::new();
        for l in &listeners {
            by_port.entry(l.local.port()).or_default().push(*l);
        }
        Ok(Self {
            listeners,
            by_port,
            holders: None,
            denied: 0,
        })
    }

    /// The listening sockets.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// Like [`acquire`], from the snapshot.
    pub fn acquire(
        &mut self,
        addr: SocketAddr,
    ) -> Result<Option<(OwnedFd, Listener, Owner)>, DiscoveryError> {
        let same_port = self
            .by_port
            .get(&addr.port())
            .map_or(&[][..], Vec::as_slice);
        let candidates = candidates(addr, same_port);
        if candidates.is_empty() {
            return Ok(None);
        }
        if self.holders.is_none() {
            self.index()?;
        }
        let holders = self.holders.as_ref();
        let denied = self.denied;
        acquire_from(addr, candidates, |inode| {
            match holders.and_then(|h| h.get(&inode)) {
                Some(&(pid, fd)) => {
                    let owner = Owner {
                        pid,
                        fd,
                        comm: read_comm(pid),
                    };
                    let dup = if pid == std::process::id() as i32 {
                        // SAFETY: fcntl on a raw fd number; the inode check below catches reuse.
                        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                        // SAFETY: `dup` is a fresh fd we own.
                        (dup >= 0).then(|| unsafe { OwnedFd::from_raw_fd(dup) })
                    } else {
                        getfd(&owner)?
                    };
                    match dup {
                        Some(dup) => match verify(dup, inode, owner)? {
                            Some(found) => Ok(found),
                            // The fd number was reused: look the socket up afresh.
                            None => take_socket(inode),
                        },
                        // The process exited or closed the fd: maybe another holds it.
                        None => take_socket(inode),
                    }
                }
                None => Err(DiscoveryError::NotFound { inode, denied }),
            }
        })
    }

    /// One pass over every process's fds, remembering who holds the listening sockets.
    fn index(&mut self) -> Result<(), DiscoveryError> {
        let wanted: HashSet<u64> = self.listeners.iter().map(|l| l.inode).collect();
        let mut holders = std::collections::HashMap::new();
        let mut pids: Vec<i32> = fs::read_dir("/proc")
            .map_err(|source| DiscoveryError::ReadProc {
                path: PathBuf::from("/proc"),
                source,
            })?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        let my_pid = std::process::id() as i32;
        // Ourselves first (and through thread-self: this thread may have its own fd table).
        pids.retain(|&p| p != my_pid);
        pids.insert(0, my_pid);
        let mut denied = 0;
        for pid in pids {
            let dir = if pid == my_pid {
                PathBuf::from(PROC_THREAD_SELF_FD)
            } else {
                PathBuf::from(format!("/proc/{pid}/fd"))
            };
            let entries = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    denied += 1;
                    continue;
                }
                Err(_) => continue,
            };
            let mut fds: Vec<i32> = entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            fds.sort_unstable();
            for fd in fds {
                let Ok(link) = fs::read_link(dir.join(fd.to_string())) else {
                    continue;
                };
                let Some(inode) = link
                    .to_str()
                    .and_then(|l| l.strip_prefix("socket:["))
                    .and_then(|l| l.strip_suffix(']'))
                    .and_then(|l| l.parse::<u64>().ok())
                else {
                    continue;
                };
                if wanted.contains(&inode) {
                    holders.entry(inode).or_insert((pid, fd));
                }
            }
        }
        self.holders = Some(holders);
        self.denied = denied;
        Ok(())
    }
}

/// What [`register_missing`] did for one subset without a live socket.
#[derive(Debug)]
pub enum Registration {
    /// Its server's listening socket is now registered.
    Registered {
        /// The subset.
        missing: crate::state::Missing,
        /// The socket.
        listener: Listener,
        /// Who holds it.
        owner: Owner,
    },
    /// Nothing listens on its address (yet).
    NotListening(crate::state::Missing),
    /// A listening socket was found but could not be taken.
    Failed {
        /// The subset.
        missing: crate::state::Missing,
        /// Why.
        error: DiscoveryError,
    },
}

/// Registers the listening socket of every subset that has none, of every service or only
/// of `services` (names), with one [`Snapshot`] of the namespace. Used by the loader's scan
/// loop and by `tcpshiftctl apply` (so that new subsets are served at once). A failure to
/// take one socket is reported in the result; only a failure to write the maps is an error.
pub fn register_missing(
    state: &mut crate::state::State,
    services: Option<&HashSet<String>>,
) -> Result<Vec<Registration>, crate::state::StateError> {
    let missing: Vec<crate::state::Missing> = state
        .missing_sockets()?
        .into_iter()
        .filter(|m| services.is_none_or(|s| s.contains(&m.service)))
        .collect();
    let mut out = Vec::with_capacity(missing.len());
    if missing.is_empty() {
        return Ok(out);
    }
    let mut snapshot = match Snapshot::take() {
        Ok(s) => s,
        Err(e) => {
            let message = e.to_string();
            for m in missing {
                out.push(Registration::Failed {
                    missing: m,
                    error: DiscoveryError::ReadProc {
                        path: PathBuf::from(PROC_NET_TCP),
                        source: io::Error::other(message.clone()),
                    },
                });
            }
            return Ok(out);
        }
    };
    for m in missing {
        match snapshot.acquire(m.backend) {
            Ok(Some((fd, listener, owner))) => {
                use std::os::fd::AsFd;
                let done = state.register_socket(&m, fd.as_fd())?;
                // Our duplicate of the backend's socket is closed here: the map holds it.
                drop(fd);
                if done {
                    out.push(Registration::Registered {
                        missing: m,
                        listener,
                        owner,
                    });
                }
                // Not done: the subset changed meanwhile; the next scan sees the new one.
            }
            Ok(None) => out.push(Registration::NotListening(m)),
            Err(error) => out.push(Registration::Failed { missing: m, error }),
        }
    }
    Ok(out)
}

/// The inode of the current thread's network namespace (`/proc/thread-self/ns/net`), for
/// diagnostics.
pub fn current_netns_inode() -> Result<u64, DiscoveryError> {
    fs::metadata(PROC_NS_NET)
        .map(|m| m.ino())
        .map_err(|source| DiscoveryError::ReadProc {
            path: PathBuf::from(PROC_NS_NET),
            source,
        })
}

/// The fd numbers in an fd directory, sorted; `None` if it cannot be read.
fn read_fd_dir(dir: &Path) -> Result<Option<Vec<i32>>, DiscoveryError> {
    match fs::read_dir(dir) {
        Ok(rd) => {
            let mut fds: Vec<i32> = rd
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            fds.sort_unstable();
            Ok(Some(fds))
        }
        Err(source) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DiscoveryError::ReadProc {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Whether the symlink at `path` points to `target` (false if it cannot be read).
fn link_is(path: &Path, target: &str) -> bool {
    fs::read_link(path).is_ok_and(|l| l.as_os_str() == target)
}

/// `/proc/PID/comm` without the newline, or an empty string.
fn read_comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end_matches('\n').to_owned())
        .unwrap_or_default()
}

/// Duplicates `owner.fd` of process `owner.pid` into this process. `Ok(None)` if the process
/// or the fd is gone.
fn getfd(owner: &Owner) -> Result<Option<OwnedFd>, DiscoveryError> {
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
fn verify(
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
    let reason = if protocol != libc::IPPROTO_TCP {
        Some(format!("protocol {protocol}, not TCP"))
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
fn getsockopt_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{BufRead, BufReader},
        net::{SocketAddrV4, TcpListener},
        process::{Child, Command, Stdio},
    };

    fn inode_of(fd: &impl AsRawFd) -> u64 {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out-pointer.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        st.st_ino
    }

    fn l(inode: u64, local: &str) -> Listener {
        Listener {
            inode,
            local: local.parse().unwrap(),
        }
    }

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    #[test]
    #[cfg(target_endian = "little")]
    fn parse_v4_lines() {
        let text = format!(
            "{HEADER}   0: 0100007F:2329 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0\n\
             \x20  1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
             \x20  2: 0100007F:2329 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 5555 1 0000000000000000 20 4 30 10 -1\n\
             \x20  3: 0A01A8C0:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 777 1 0000000000000000 100 0 0 10 0\n"
        );
        let got = parse_proc_net_tcp(&text, Path::new("tcp")).unwrap();
        assert_eq!(
            got,
            vec![
                l(31337, "127.0.0.1:9001"),
                l(4242, "0.0.0.0:22"),
                l(777, "192.168.1.10:8080"),
            ]
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parse_v6_lines() {
        let text = format!(
            "{HEADER}   0: 00000000000000000000000001000000:2329 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0000000000000000 100 0 0 10 0\n\
             \x20  1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 200 1 0000000000000000 100 0 0 10 0\n\
             \x20  2: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 300 1 0000000000000000 100 0 0 10 0\n\
             \x20  3: B80D0120000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 400 1 0000000000000000 100 0 0 10 0\n\
             \x20  4: 00000000000000000000000001000000:2329 00000000000000000000000001000000:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 500 1 0000000000000000 20 4 30 10 -1\n"
        );
        let got = parse_proc_net_tcp(&text, Path::new("tcp6")).unwrap();
        assert_eq!(
            got,
            vec![
                l(100, "[::1]:9001"),
                l(200, "[::]:80"),
                l(300, "[::ffff:127.0.0.1]:8080"),
                l(400, "[2001:db8::1]:443"),
            ]
        );
    }

    #[test]
    fn parse_errors_name_the_line() {
        let text = format!("{HEADER}   0: 0100007F:2329 garbage\n");
        let err = parse_proc_net_tcp(&text, Path::new("tcp")).unwrap_err();
        assert!(
            matches!(err, DiscoveryError::Parse { line_no: 2, .. }),
            "{err}"
        );
        let text = format!(
            "{HEADER}   0: 0100007:2329 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        );
        assert!(parse_proc_net_tcp(&text, Path::new("tcp")).is_err());
        let text = format!(
            "{HEADER}   0: 0100007F:ZZ 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        );
        assert!(parse_proc_net_tcp(&text, Path::new("tcp")).is_err());
        // Empty files (just the header) are fine.
        assert!(
            parse_proc_net_tcp(HEADER, Path::new("tcp"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn candidate_order() {
        let all = [
            l(1, "[::]:80"),
            l(2, "0.0.0.0:80"),
            l(3, "127.0.0.1:80"),
            l(4, "[::ffff:127.0.0.1]:80"),
            l(5, "[::1]:80"),
            l(6, "10.0.0.1:80"),
            l(7, "127.0.0.1:81"),
        ];
        let inodes = |addr: &str| -> Vec<u64> {
            candidates(addr.parse().unwrap(), &all)
                .iter()
                .map(|l| l.inode)
                .collect()
        };
        assert_eq!(inodes("127.0.0.1:80"), [3, 4, 2, 1]);
        assert_eq!(inodes("[::ffff:127.0.0.1]:80"), [3, 4, 2, 1]);
        assert_eq!(inodes("127.0.0.2:80"), [2, 1]);
        assert_eq!(inodes("[::1]:80"), [5, 1]);
        assert_eq!(inodes("[::2]:80"), [1]);
        assert_eq!(inodes("0.0.0.0:80"), [2, 1, 6, 3, 5, 4]);
        assert_eq!(inodes("[::]:80"), [1, 2, 5, 4, 6, 3]);
        assert_eq!(inodes("127.0.0.1:82"), Vec::<u64>::new());
        // SO_REUSEPORT groups: lowest inode wins, whatever the input order.
        let group = [l(9, "0.0.0.0:80"), l(8, "0.0.0.0:80")];
        assert_eq!(
            candidates("1.2.3.4:80".parse().unwrap(), &group)[0].inode,
            8
        );
    }

    #[test]
    fn finds_v4_listener() {
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let ino = inode_of(&sock);
        let all = listeners().unwrap();
        assert!(
            all.contains(&Listener {
                inode: ino,
                local: addr
            }),
            "{all:?}"
        );
        let found = find_listener(addr).unwrap().unwrap();
        assert_eq!(
            found,
            Listener {
                inode: ino,
                local: addr
            }
        );
        // The unspecified address finds it too.
        let any = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
        assert_eq!(find_listener(any).unwrap().unwrap().inode, ino);
    }

    #[test]
    fn finds_v6_and_dual_stack_listener() {
        let sock = TcpListener::bind("[::]:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let ino = inode_of(&sock);
        let found = find_listener(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port))
            .unwrap()
            .unwrap();
        assert_eq!(found.inode, ino);
        assert_eq!(
            found.local,
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)
        );
        let v4 = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        assert_eq!(find_listener(v4).unwrap().unwrap().inode, ino);
        // std leaves IPV6_V6ONLY at the net.ipv6.bindv6only default (normally 0: dual-stack),
        // and acquire accepts a [::] socket for IPv4 only if it is dual-stack.
        let v6only =
            fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|s| s.trim() == "1");
        match acquire(v4) {
            Ok(Some((fd, listener, _))) if !v6only => {
                assert_eq!(listener.inode, ino);
                assert_eq!(inode_of(&fd), ino);
            }
            Err(DiscoveryError::V6Only { .. }) if v6only => {}
            other => panic!("bindv6only={v6only}: {other:?}"),
        }
    }

    #[test]
    fn nothing_on_unused_port() {
        // Bind then close, so the port is (almost certainly) free.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        assert_eq!(find_listener(addr).unwrap(), None);
        assert!(acquire(addr).unwrap().is_none());
    }

    #[test]
    fn take_own_socket() {
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = inode_of(&sock);
        let (fd, owner) = take_socket(ino).unwrap();
        assert_eq!(inode_of(&fd), ino);
        assert_ne!(fd.as_raw_fd(), sock.as_raw_fd());
        assert_eq!(owner.pid, std::process::id() as i32);
        assert_eq!(owner.fd, sock.as_raw_fd());
    }

    #[test]
    fn take_rejects_non_listening_and_unknown() {
        // A bound but not listening TCP socket is not in /proc/net/tcp as 0A, but
        // take_socket by inode must still refuse it.
        // SAFETY: plain socket(2) call.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0);
        // SAFETY: fresh fd.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let err = take_socket(inode_of(&sock)).unwrap_err();
        assert!(
            matches!(err, DiscoveryError::NotListeningTcp { .. }),
            "{err}"
        );
        let err = take_socket(u64::MAX).unwrap_err();
        assert!(matches!(err, DiscoveryError::NotFound { .. }), "{err}");
    }

    #[test]
    fn rejects_v6only_for_ipv4() {
        let raw =
            unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0);
        // SAFETY: fresh fd.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: valid fd, pointer and length.
        let rc = unsafe {
            libc::setsockopt(
                raw,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        // SAFETY: valid fd and sockaddr.
        let rc = unsafe {
            libc::bind(
                raw,
                (&sa as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: valid fd.
        assert_eq!(unsafe { libc::listen(raw, 16) }, 0);
        let port = std::net::TcpListener::from(sock.try_clone().unwrap())
            .local_addr()
            .unwrap()
            .port();
        let v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port);
        let (fd, ..) = acquire(v6).unwrap().unwrap();
        assert_eq!(inode_of(&fd), inode_of(&sock));
        let v4 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let err = acquire(v4).unwrap_err();
        assert!(matches!(err, DiscoveryError::V6Only { .. }), "{err}");
    }

    #[test]
    fn netns_inode() {
        assert_ne!(current_netns_inode().unwrap(), 0);
    }

    /// Kills and reaps the child when dropped, even if the test fails.
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn acquire_from_other_process() {
        // The other process is this test binary again (always there, unlike an interpreter),
        // running only this test with LISTENER_VAR set: it listens, prints its port, waits.
        const LISTENER_VAR: &str = "TCPSHIFT_DISCOVERY_TEST_LISTENER";
        if std::env::var_os(LISTENER_VAR).is_some() {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            println!("PORT {}", l.local_addr().unwrap().port());
            std::thread::sleep(std::time::Duration::from_secs(30));
            return;
        }
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "discovery::tests::acquire_from_other_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(LISTENER_VAR, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot run this test binary again as the listening process");
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().unwrap();
        let mut port = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            // The test harness may print the test's name first, on the same line.
            if let Some((_, p)) = line.split_once("PORT ") {
                port = Some(p.trim().parse::<u16>().unwrap());
                break;
            }
        }
        let port = port.expect("the listening process printed no port");
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);

        let (fd, listener, owner) = acquire(addr).unwrap().unwrap();
        assert_eq!(listener.local, addr);
        assert_eq!(inode_of(&fd), listener.inode);
        assert_eq!(owner.pid, child.0.id() as i32, "{owner}");
        // The taken fd is a working listener: a connection made to it is accepted here.
        let taken = TcpListener::from(fd);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (_conn, _) = taken.accept().unwrap();
        drop(child);
    }
}
