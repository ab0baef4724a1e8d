//! One tcpshiftd per network namespace.
//!
//! tcpshiftd listens on the abstract unix socket `@tcpshift/tcpshiftd` of the namespace it
//! works in. Abstract names belong to a network namespace (so one name per namespace, whatever
//! the mount namespace or `/run` looks like), need no file or directory permissions (a
//! tcpshiftd running as a system user with capabilities only can take it), and vanish when
//! the process exits, however it exits: nothing stale is ever left to clean up. A second
//! tcpshiftd finds the name taken, connects, and reads the first one's pid from the
//! connection's peer credentials (`SO_PEERCRED`, filled in by the kernel).
//!
//! Any process of the namespace could take the name first; the one that did is named (pid,
//! uid, command) and tcpshiftd refuses to start rather than run beside an unknown owner.
//! `--takeover` stops the running tcpshiftd only if its command is `tcpshiftd`.

use std::{
    io,
    os::{
        fd::AsRawFd,
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tracing::{debug, info};

/// The abstract socket name (without the leading NUL).
const NAME: &[u8] = b"tcpshift/tcpshiftd";
/// How long `--takeover` waits for the running tcpshiftd to exit.
const TAKEOVER_WAIT: Duration = Duration::from_secs(30);

/// This process's claim on its network namespace; released when dropped (or at exit).
pub struct Instance {
    listener: UnixListener,
}

/// Who holds the name.
struct Holder {
    /// Its pid, as seen from here (`None`: in a PID namespace we cannot see).
    pid: Option<i32>,
    uid: u32,
    /// `/proc/PID/comm`, empty if unknown.
    comm: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}")?,
            None => write!(f, "a process of another PID namespace")?,
        }
        if !self.comm.is_empty() {
            write!(f, " ({})", self.comm)?;
        }
        write!(f, ", uid {}", self.uid)
    }
}

impl Instance {
    /// Takes the namespace's name, or fails naming the tcpshiftd that holds it. With
    /// `takeover`, stops that tcpshiftd first and waits until it has exited.
    pub fn claim(takeover: bool) -> Result<Self> {
        let addr = SocketAddr::from_abstract_name(NAME)
            .context("cannot build tcpshiftd's abstract socket address")?;
        let started = Instant::now();
        let mut stopped: Option<i32> = None;
        loop {
            match UnixListener::bind_addr(&addr) {
                Ok(listener) => {
                    if let Some(pid) = stopped {
                        info!(
                            pid,
                            "took over from the tcpshiftd that ran in this network namespace"
                        );
                    }
                    return Ok(Self { listener });
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
                Err(e) => {
                    return Err(e).context(
                        "cannot bind tcpshiftd's abstract unix socket @tcpshift/tcpshiftd \
                         (is AF_UNIX allowed, e.g. RestrictAddressFamilies= in the unit?)",
                    );
                }
            }
            if started.elapsed() > TAKEOVER_WAIT {
                bail!(
                    "the tcpshiftd of this network namespace ({}) did not exit within {TAKEOVER_WAIT:?} \
                     of SIGTERM; stop it with `kill -KILL PID` and start again",
                    stopped.map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}"))
                );
            }
            let holder = match holder(&addr) {
                Ok(h) => h,
                // It is exiting (the name is released with its last fd): try again.
                Err(e) => {
                    debug!("the tcpshiftd socket's holder went away: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            if stopped.is_some() && holder.pid == stopped {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            if !takeover {
                let how = match holder.pid {
                    Some(pid) => {
                        format!("`kill {pid}`, or `systemctl stop tcpshiftd` if systemd runs it")
                    }
                    None => "`systemctl stop tcpshiftd` if systemd runs it".to_string(),
                };
                bail!(
                    "another tcpshiftd runs in this network namespace: {holder}; \
                     stop it first ({how}), or start this one with --takeover to replace it. \
                     Nothing was changed"
                );
            }
            let pid = match holder.pid {
                Some(pid) if holder.comm == "tcpshiftd" => pid,
                _ => bail!(
                    "--takeover: tcpshiftd's socket @tcpshift/tcpshiftd in this network namespace \
                     is held by {holder}, which is not a tcpshiftd this process can stop; \
                     stop it yourself. Nothing was changed"
                ),
            };
            info!(
                pid,
                "--takeover: stopping the tcpshiftd that runs in this network namespace"
            );
            // SAFETY: kill(2) with a pid read from the kernel a moment ago.
            if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(e).with_context(|| format!("--takeover: cannot stop pid {pid}"));
                }
            }
            stopped = Some(pid);
        }
    }

    /// Accepts (and closes at once) the connections of tcpshiftd processes asking who runs
    /// here, so that they never wait on a full backlog. Must be called within the runtime.
    pub fn serve(&self) -> Result<()> {
        let listener = self
            .listener
            .try_clone()
            .context("cannot duplicate tcpshiftd's abstract socket")?;
        listener
            .set_nonblocking(true)
            .context("cannot make tcpshiftd's abstract socket non-blocking")?;
        let listener = tokio::net::UnixListener::from_std(listener)
            .context("cannot watch tcpshiftd's abstract socket")?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        Ok(())
    }
}

/// Connects to the name and reads the listener's credentials.
fn holder(addr: &SocketAddr) -> io::Result<Holder> {
    let stream = UnixStream::connect_addr(addr)?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let pid = (cred.pid > 0).then_some(cred.pid);
    let comm = pid
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
        .map(|c| c.trim_end().to_string())
        .unwrap_or_default();
    Ok(Holder {
        pid,
        uid: cred.uid,
        comm,
    })
}
