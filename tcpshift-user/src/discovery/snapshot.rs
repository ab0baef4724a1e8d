//! Taking many sockets at once: the namespace's listeners listed once, and their holders
//! found with one walk over `/proc`.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    ops::ControlFlow,
    os::fd::OwnedFd,
};

use super::{
    DiscoveryError, Listener, Owner, acquire_from, candidates, listeners,
    take::{take_from, take_socket},
    udp_sockets,
};
use crate::procfs::{self, Process};

/// A snapshot of the current thread's network namespace for taking many sockets at once:
/// its listening sockets, listed once, and — built on first need, with one pass over
/// `/proc/*/fd` — which process holds each of them. [`Snapshot::acquire`] is [`acquire`](super::acquire)
/// without re-reading `/proc` for every address, so registering thousands of subsets costs one
/// scan instead of thousands. A process that exited or closed its socket since the snapshot
/// is handled as [`acquire`](super::acquire) does (the next candidate is tried).
pub struct Snapshot {
    listeners: Vec<Listener>,
    /// The listeners by port (a candidate always has the address's port).
    by_port: HashMap<u16, Vec<Listener>>,
    /// The bound UDP sockets by port, listed on first need (for UDP subsets).
    udp_by_port: Option<HashMap<u16, Vec<Listener>>>,
    /// Socket inode → its first holder and the fd there (this process counts as any other).
    holders: Option<HashMap<u64, (Process, i32)>>,
    /// Processes whose fd tables could not be read for lack of permission.
    denied: usize,
}

impl Snapshot {
    /// Lists the listening sockets of the current thread's network namespace.
    pub fn take() -> Result<Self, DiscoveryError> {
        let listeners = listeners()?;
        let mut by_port: HashMap<u16, Vec<Listener>> = HashMap::new();
        for l in &listeners {
            by_port.entry(l.local.port()).or_default().push(*l);
        }
        Ok(Self {
            listeners,
            by_port,
            udp_by_port: None,
            holders: None,
            denied: 0,
        })
    }

    /// The listening sockets.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// Like [`acquire`](super::acquire), from the snapshot.
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
                Some((process, fd)) => match take_from(process, *fd, inode)? {
                    Some(found) => Ok(found),
                    // The process exited, closed the fd or reused its number: maybe another
                    // holds the socket; look it up afresh.
                    None => take_socket(inode),
                },
                None => Err(DiscoveryError::NotFound { inode, denied }),
            }
        })
    }

    /// Like [`Snapshot::acquire`], for the UDP socket bound to `addr` (a UDP subset's
    /// backend), chosen among the bound unconnected UDP sockets as a listener is.
    pub fn acquire_udp(
        &mut self,
        addr: SocketAddr,
    ) -> Result<Option<(OwnedFd, Listener, Owner)>, DiscoveryError> {
        if self.udp_by_port.is_none() {
            let mut by_port: HashMap<u16, Vec<Listener>> = HashMap::new();
            for l in udp_sockets()? {
                by_port.entry(l.local.port()).or_default().push(l);
            }
            self.udp_by_port = Some(by_port);
            // The holders index, if built, lacks the UDP sockets.
            self.holders = None;
        }
        let same_port = self
            .udp_by_port
            .as_ref()
            .and_then(|m| m.get(&addr.port()))
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
                Some((process, fd)) => match take_from(process, *fd, inode)? {
                    Some(found) => Ok(found),
                    None => take_socket(inode),
                },
                None => Err(DiscoveryError::NotFound { inode, denied }),
            }
        })
    }

    /// One pass over every process's fds, remembering who holds the listening sockets (and
    /// the UDP sockets, once listed).
    fn index(&mut self) -> Result<(), DiscoveryError> {
        let mut wanted: HashSet<u64> = self.listeners.iter().map(|l| l.inode).collect();
        if let Some(udp) = &self.udp_by_port {
            wanted.extend(udp.values().flatten().map(|l| l.inode));
        }
        let mut holders = HashMap::new();
        let walked = procfs::walk_sockets(|process, fd, inode| {
            if wanted.contains(&inode) {
                holders.entry(inode).or_insert((*process, fd));
            }
            ControlFlow::<()>::Continue(())
        })?;
        self.holders = Some(holders);
        self.denied = walked.denied;
        Ok(())
    }
}
