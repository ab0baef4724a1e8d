//! Registering the listening socket of every subset that has none (the loader's scan loop,
//! and `tcpshiftctl apply` for the subsets it just added).

use std::{
    collections::HashSet,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::PathBuf,
};

use super::{DiscoveryError, Listener, Owner, Snapshot, listeners::PROC_NET_TCP};
use crate::state::{Missing, OwnerCheck, SocketHolder, State, StateError};

/// What [`register_missing`] did for one subset without a live socket.
#[derive(Debug)]
pub enum Registration {
    /// Its server's listening socket is now registered.
    Registered {
        /// The subset.
        missing: Missing,
        /// The socket.
        listener: Listener,
        /// Who holds it.
        owner: Owner,
    },
    /// Nothing listens on its address (yet).
    NotListening(Missing),
    /// A listening socket was found, but its owner may not serve the subset (see
    /// [`State::register_owned_socket`]): not registered, counted in the pinned state.
    Refused {
        /// The subset.
        missing: Missing,
        /// The refused socket.
        listener: Listener,
        /// Who holds it.
        owner: Owner,
        /// The uid that created it.
        uid: u32,
        /// The uid the subset trusts (besides root).
        trusted_uid: u32,
        /// Refusals counted for the subset so far.
        refused_total: u64,
        /// Whether this socket was refused for the first time (the same socket found again
        /// by a later scan is neither counted nor reported as new).
        new: bool,
    },
    /// A listening socket was found but could not be taken.
    Failed {
        /// The subset.
        missing: Missing,
        /// Why.
        error: DiscoveryError,
    },
}

/// Registers the listening socket of every subset that has none, of every service or only
/// of `services` (names), with one [`Snapshot`] of the namespace. Used by the loader's scan
/// loop and by `tcpshiftctl apply` (so that new subsets are served at once). A failure to
/// take one socket is reported in the result; only a failure to write the maps is an error.
pub fn register_missing(
    state: &mut State,
    services: Option<&HashSet<String>>,
) -> Result<Vec<Registration>, StateError> {
    let missing: Vec<Missing> = state
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
        let acquired = if m.udp {
            snapshot.acquire_udp(m.backend)
        } else {
            snapshot.acquire(m.backend)
        };
        match acquired {
            Ok(Some((fd, listener, owner))) => {
                let uid = match socket_uid(fd.as_fd()) {
                    Ok(uid) => uid,
                    Err(source) => {
                        out.push(Registration::Failed {
                            missing: m,
                            error: DiscoveryError::Inspect {
                                owner,
                                op: "fstat",
                                source,
                            },
                        });
                        continue;
                    }
                };
                let holder = SocketHolder {
                    uid,
                    pid: owner.pid,
                    comm: owner.comm.clone(),
                    inode: listener.inode,
                    cgroup: owner.process().cgroup().ok().flatten(),
                };
                let check = state.register_owned_socket(&m, fd.as_fd(), &holder)?;
                // Our duplicate of the backend's socket is closed here: the map holds it.
                drop(fd);
                match check {
                    OwnerCheck::Registered { .. } => out.push(Registration::Registered {
                        missing: m,
                        listener,
                        owner,
                    }),
                    OwnerCheck::Refused {
                        trusted_uid,
                        refused_total,
                        new,
                    } => out.push(Registration::Refused {
                        missing: m,
                        listener,
                        owner,
                        uid,
                        trusted_uid,
                        refused_total,
                        new,
                    }),
                    // The subset changed meanwhile; the next scan sees the new one.
                    OwnerCheck::Stale => {}
                }
            }
            Ok(None) => out.push(Registration::NotListening(m)),
            Err(error) => out.push(Registration::Failed { missing: m, error }),
        }
    }
    Ok(out)
}

/// The uid that created the socket `fd` (its inode's owner: what `/proc/net/tcp` and `ss -e`
/// show as the socket's uid).
fn socket_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd (borrowed for the call) and out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_uid)
}
