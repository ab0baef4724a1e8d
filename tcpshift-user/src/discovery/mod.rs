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
//! 3. [`take_socket`] finds the process holding that socket (by its inode, with the `/proc`
//!    walker of [`crate::procfs`]) and duplicates it into this process with `pidfd_getfd(2)`.
//!
//! [`acquire`] does all three. Network namespaces are per thread, so everything here reads
//! `/proc/thread-self/...`, never `/proc/self/...`: a thread that entered another namespace
//! with `setns(2)` sees that namespace's sockets.
//!
//! Rooms: `listeners` (reading `/proc/net/tcp{,6}`, choosing a listener), `take` (taking one
//! socket from its holder), `snapshot` (taking many with one walk over `/proc`) and `register`
//! (putting the taken sockets into the maps).

mod listeners;
mod register;
mod shadowed;
mod snapshot;
mod take;

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    path::PathBuf,
};

pub use listeners::{
    candidates, find_listener, listeners, listeners_from_proc, parse_proc_net_tcp, udp_sockets,
};
pub use register::{Registration, register_missing};
pub use shadowed::{
    ListenersByPort, ShadowedListener, describe, overlaps, shadowed_by, shadowed_by_protocol,
    shadowed_in,
};
pub use snapshot::Snapshot;
pub use take::take_socket;

use crate::procfs::{ProcError, Process};
use take::getsockopt_int;

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

impl Owner {
    /// The holding process, to ask who it is ([`Process::uid`], [`Process::cgroup`], ...).
    pub fn process(&self) -> Process {
        Process::new(self.pid)
    }
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

impl From<ProcError> for DiscoveryError {
    fn from(e: ProcError) -> Self {
        DiscoveryError::ReadProc {
            path: e.path,
            source: e.source,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        fs,
        io::{BufRead, BufReader},
        net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, TcpListener},
        os::fd::{AsRawFd, FromRawFd},
        process::{Child, Command, Stdio},
    };

    fn inode_of(fd: &impl AsRawFd) -> u64 {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out-pointer.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        st.st_ino
    }

    /// The socket diagnostics and `/proc/net/tcp{,6}` list the same listeners, with the same
    /// inodes, for IPv4, IPv6 and dual-stack wildcard sockets; a connected socket is in
    /// neither list.
    #[test]
    fn socket_diagnostics_and_proc_agree() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").ok();
        let any6 = TcpListener::bind("[::]:0").ok();
        let client = std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let from_diag: Vec<Listener> = crate::sockdiag::listening_tcp()
            .expect("sock_diag answers")
            .into_iter()
            .map(|(local, inode)| Listener { inode, local })
            .collect();
        let from_proc = listeners_from_proc().unwrap();
        for sock in [Some(&v4), v6.as_ref(), any6.as_ref()]
            .into_iter()
            .flatten()
        {
            let want = Listener {
                inode: inode_of(sock),
                local: sock.local_addr().unwrap(),
            };
            assert!(from_diag.contains(&want), "{want:?} in {from_diag:?}");
            assert!(from_proc.contains(&want), "{want:?} in {from_proc:?}");
        }
        // The listings are taken one after the other while other tests open sockets, so only
        // ours are compared exactly; nothing but listeners is in either.
        let ports: Vec<u16> = from_diag.iter().map(|l| l.local.port()).collect();
        assert!(!ports.contains(&client.local_addr().unwrap().port()));
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
    fn owner_process_is_the_holder() {
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        let (_fd, owner) = take_socket(inode_of(&sock)).unwrap();
        let process = owner.process();
        assert!(process.is_current());
        assert_eq!(process.comm(), owner.comm);
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
