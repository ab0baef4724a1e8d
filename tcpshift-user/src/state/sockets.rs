//! Listening sockets: which subsets have none ([`Missing`]), registering one, and the
//! listener tags the sock_ops program reads a connection's subset from.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::maps::{MapData, SkStorage};
use tcpshift_common::{MAX_LISTENER_SLOTS, MAX_SUBSETS, NO_SLOT, SockTag, slot, slot_service, tag};
use tracing::warn;

use super::{State, encode::*, error::*};

/// A subset whose socket needs registering (see [`State::missing_sockets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// Service id.
    pub service_id: u32,
    /// Service name.
    pub service: String,
    /// Subset index.
    pub index: u32,
    /// Subset name.
    pub subset: String,
    /// Backend address.
    pub backend: SocketAddr,
    /// Whether the socket missing is the subset's UDP socket (else its TCP listener).
    pub udp: bool,
}

impl State {
    /// Subsets that have no live socket registered.
    pub fn missing_sockets(&self) -> Result<Vec<Missing>> {
        let live = self.live_slots()?;
        let live_udp = self.live_udp_slots()?;
        let mut out = Vec::new();
        for (id, meta) in self.all_meta()? {
            let protocol = protocol_of(meta.protocols);
            for (i, s) in meta.subsets[..usize::from(meta.n_subsets).min(MAX_SUBSETS)]
                .iter()
                .enumerate()
            {
                let s_slot = slot(id, i as u32);
                for (udp, wanted, have) in [
                    (false, protocol.tcp(), &live),
                    (true, protocol.udp(), &live_udp),
                ] {
                    if wanted && !have.contains(&s_slot) {
                        out.push(Missing {
                            service_id: id,
                            service: name_str(&meta.name),
                            index: i as u32,
                            subset: name_str(&s.name),
                            backend: subset_addr(s),
                            udp,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Registers `socket` (a listening TCP socket) for the subset described by `m`, if the
    /// subset still has that backend address. Returns whether it was registered.
    pub fn register_socket(&mut self, m: &Missing, socket: BorrowedFd<'_>) -> Result<bool> {
        let _lock = self.lock()?;
        if self
            .subset_definition(m.service_id, m.index)?
            .is_none_or(|sub| subset_addr(&sub) != m.backend)
        {
            return Ok(false);
        }
        self.insert_socket(slot(m.service_id, m.index), socket, m.udp)?;
        Ok(true)
    }

    /// Puts `socket` in the slot `s` of `TS_UDP_SOCKETS` when `udp`, else tags it with `s`
    /// and puts it in `TS_SOCKETS` (the caller holds the lock and has checked the subset).
    pub(super) fn insert_socket(
        &mut self,
        s: u32,
        socket: BorrowedFd<'_>,
        udp: bool,
    ) -> Result<()> {
        if udp {
            return self
                .maps
                .udp_sockets
                .insert(s, socket.as_raw_fd(), 0)
                .map_err(map_err("cannot register a UDP socket"));
        }
        // Tag first: a connection steered to the socket must find its slot in the tag.
        self.tag_listener(socket, s)?;
        self.maps
            .sockets
            .insert(s, socket.as_raw_fd(), 0)
            .map_err(map_err("cannot register a socket"))
    }

    /// Records in the listening socket's `TS_SOCKTAG` storage that it serves `slot` (replacing
    /// a slot of the same service). The kernel copies the tag into every connection accepted
    /// from it; the sock_ops program finds the connection's subset there.
    pub(super) fn tag_listener(&mut self, socket: BorrowedFd<'_>, slot: u32) -> Result<()> {
        let mut storage: SkStorage<&mut MapData, SockTag> =
            SkStorage::try_from(&mut self.maps.socktag).map_err(map_err("socket tag map"))?;
        let mut t = match storage.get(&socket, 0) {
            Ok(t) if t.kind == tag::LISTENER => t,
            _ => SockTag::default(),
        };
        let tagged = tag_with(&mut t, slot);
        if let Some(evicted) = tagged {
            warn!(
                evicted_service = slot_service(evicted),
                "a listening socket serves more than {MAX_LISTENER_SLOTS} services; connections of the oldest are not accounted"
            );
        }
        storage
            .insert(&socket, t, 0)
            .map_err(map_err("cannot tag a listening socket"))
    }
}

/// evicted because the tag was full (the oldest).
pub(super) fn tag_with(t: &mut SockTag, slot: u32) -> Option<u32> {
    let service = slot_service(slot);
    let slots = &mut t.listener_slots;
    if let Some(same) = slots
        .iter_mut()
        .find(|s| **s != NO_SLOT && slot_service(**s) == service)
    {
        *same = slot;
        return None;
    }
    if let Some(free) = slots.iter_mut().find(|s| **s == NO_SLOT) {
        *free = slot;
        return None;
    }
    let evicted = slots[0];
    slots.rotate_left(1);
    slots[MAX_LISTENER_SLOTS - 1] = slot;
    Some(evicted)
}

#[cfg(test)]
mod accounting_tests {
    use super::*;

    #[test]
    pub(super) fn a_listener_tag_keeps_one_slot_per_service() {
        let mut t = SockTag::default();
        assert_eq!(tag_with(&mut t, slot(3, 0)), None);
        assert_eq!(tag_with(&mut t, slot(5, 2)), None);
        // The same service again (its subset's backend moved to this socket): replaced.
        assert_eq!(tag_with(&mut t, slot(3, 1)), None);
        let used: Vec<u32> = t
            .listener_slots
            .iter()
            .copied()
            .filter(|s| *s != NO_SLOT)
            .collect();
        assert_eq!(used, vec![slot(3, 1), slot(5, 2)]);
        assert_eq!(t.kind, tag::LISTENER);
    }

    #[test]
    pub(super) fn a_full_listener_tag_evicts_the_oldest_service() {
        let mut t = SockTag::default();
        for id in 0..MAX_LISTENER_SLOTS as u32 {
            assert_eq!(tag_with(&mut t, slot(id, 0)), None);
        }
        assert_eq!(tag_with(&mut t, slot(100, 1)), Some(slot(0, 0)));
        assert_eq!(t.listener_slots[MAX_LISTENER_SLOTS - 1], slot(100, 1));
        assert!(!t.listener_slots.contains(&slot(0, 0)));
    }
}
