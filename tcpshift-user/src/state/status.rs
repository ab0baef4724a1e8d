//! Reading what `tcpshiftctl status` shows: weights, shares, live sockets and the
//! data path's counters (open connections' bytes from sock_diag).

use std::{collections::HashMap as StdHashMap, net::SocketAddr, os::fd::AsFd, path::PathBuf};

use aya::maps::{Map, MapError};
use serde::Serialize;
use tcpshift_common::{
    Counters, MAX_SUBSETS, SRTT_BUCKETS, global_flags, mode, service_flags, slot, tag,
};

use crate::{
    discovery::ShadowedListener,
    model::{ServiceConfig, SubsetConfig},
    sockdiag,
    weights::{self},
};

use super::{
    LINK, OBSERVED_WINDOW_SECS, OwnerStatus, SOCKOPS_LINK, State, encode::*, error::*, sys::*,
};

/// One subset as shown by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct SubsetStatus {
    /// Subset name.
    pub name: String,
    /// Backend address.
    pub backend: SocketAddr,
    /// Relative weight.
    pub weight: u32,
    /// Share of new connections the weights give it, in percent.
    pub share: f64,
    /// Whether a live listening socket is registered for it.
    pub live: bool,
    /// Share of the service's new connections steered to this subset over the last
    /// [`Status::observed_window_secs`] seconds, in percent; `None` when there were none.
    pub observed_share: Option<f64>,
    /// Counters from the data path.
    pub counters: CounterStatus,
    /// Whose socket is registered, which uid is trusted, and refused sockets (`TS_OWNERS`).
    pub owner: OwnerStatus,
    /// For a service that steers UDP: its UDP flows' counters (`null` for TCP services).
    pub udp: Option<super::UdpSubsetCounters>,
    /// Connection limit, open connections, refusals at the limit, ejection (`TS_LIMITS`,
    /// `TS_LOAD`).
    pub limits: super::LimitStatus,
}

/// Data-path counters of one subset (one value shared by all CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterStatus {
    /// New connections whose hash chose this subset.
    pub chosen: u64,
    /// New connections assigned to this subset.
    pub steered: u64,
    /// Of those, connections that had chosen another subset without a live socket.
    pub fallback_in: u64,
    /// Connections that chose this subset but were sent elsewhere (no live socket).
    pub fallback_out: u64,
    /// Connections that chose this subset while no subset of the service was alive.
    pub misses: u64,
    /// Connections established on this subset through the service address.
    pub opened: u64,
    /// Of those, connections closed.
    pub closed: u64,
    /// Of those, connections open now (`opened - closed`).
    pub active: u64,
    /// Payload bytes received from clients, closed and open connections.
    pub bytes_received: u64,
    /// Payload bytes sent to clients (acknowledged), closed and open connections.
    pub bytes_sent: u64,
    /// New connections steered here during the last [`OBSERVED_WINDOW_SECS`] seconds.
    pub steered_recent: u64,
    /// Closed connections reset by the backend (it closed with unread data, with `SO_LINGER`
    /// 0, or shut down); a RST from the client is not counted.
    pub reset_by_backend: u64,
    /// Closed connections the backend closed first without a payload byte acknowledged by
    /// the client ("closed without a reply").
    pub closed_without_reply: u64,
    /// Retransmission timeouts on this subset's connections (one per expiry of the timer).
    pub retransmit_timeouts: u64,
    /// Smoothed RTT of closed connections at close, a log2 histogram (not cumulative):
    /// bucket `b` counts RTTs from [`tcpshift_common::srtt_bucket_floor_us`]`(b)` µs up to the
    /// next bucket's floor; the last bucket is open-ended.
    pub srtt_histogram: [u64; SRTT_BUCKETS],
}

impl CounterStatus {
    /// Connections that failed: reset by the backend, closed by it without a reply, or
    /// refused for lack of a live socket ([`CounterStatus::misses`]).
    pub fn failed(&self) -> u64 {
        self.reset_by_backend + self.closed_without_reply + self.misses
    }
}

/// One service as shown by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Internal id (slot base in the maps).
    pub id: u32,
    /// Where it listens: `*:PORT` or `ADDR:PORT`.
    pub listen: String,
    /// Selection mode.
    pub mode: &'static str,
    /// The subsets, in configuration order.
    pub subsets: Vec<SubsetStatus>,
    /// Listeners on its listen address that are not its subsets (their new connections go to
    /// the subsets), read from `/proc` when the status is taken.
    pub shadows: Vec<ShadowedListener>,
    /// Whether the service fails closed: while no subset has a live socket, its new
    /// connections are refused (counted in `misses`) instead of seeing the normal lookup.
    pub fail_closed: bool,
    /// What it steers: `tcp`, `udp` or `tcp+udp`.
    pub protocol: crate::model::Protocol,
}

/// The whole namespace as shown by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Inode of the network namespace.
    pub netns_inode: u64,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Id of the attached sk_lookup program, if the link is alive.
    pub program_id: Option<u32>,
    /// Id of the sock_ops program (connection accounting), if its link is pinned.
    pub accounting_program_id: Option<u32>,
    /// Seconds covered by the subsets' `observed_share`.
    pub observed_window_secs: u32,
    /// Whether the programs emit debug events (`tcpshiftd --log-level debug` running).
    pub debug_events: bool,
    /// Services, sorted by name.
    pub services: Vec<ServiceStatus>,
    /// Problems that make some numbers incomplete (e.g. open connections' bytes unavailable).
    pub warnings: Vec<String>,
    /// Read without root by a member of the read group (`State::open_read_only`): the pinned
    /// links open only read-write, so the program ids are unknown (`None`), not absent.
    pub read_only: bool,
    /// Idle timeout of UDP flows, in seconds.
    pub udp_idle_timeout_secs: u32,
}

impl State {
    pub(super) fn counters(&self, slot: u32) -> Result<CounterStatus> {
        // One value shared by all CPUs (the programs add to it atomically).
        let v: Counters = match self.maps.counters.get(&slot, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(CounterStatus::default()),
            Err(e) => return Err(map_err("cannot read counters")(e)),
        };
        let now = coarse_second();
        Ok(CounterStatus {
            steered_recent: v
                .recent
                .iter()
                .filter(|r| now.wrapping_sub(r.second) < OBSERVED_WINDOW_SECS)
                .map(|r| u64::from(r.steered))
                .sum(),
            chosen: v.chosen,
            steered: v.steered,
            fallback_in: v.fallback_in,
            fallback_out: v.fallback_out,
            misses: v.misses,
            opened: v.opened,
            closed: v.closed,
            active: v.opened.saturating_sub(v.closed),
            bytes_received: v.bytes_received,
            bytes_sent: v.bytes_sent,
            reset_by_backend: v.reset_by_backend,
            closed_without_reply: v.closed_without_reply,
            retransmit_timeouts: v.retransmit_timeouts,
            srtt_histogram: v.srtt_histogram.map(u64::from),
        })
    }

    pub(super) fn all_counters(&self, slots: &[u32]) -> Result<StdHashMap<u32, CounterStatus>> {
        slots
            .iter()
            .map(|&s| self.counters(s).map(|c| (s, c)))
            .collect()
    }

    /// Counters of `slots`, with the bytes of open connections added (from sock_diag).
    ///
    /// A connection's bytes move from "open" to the counters when it closes; to count each
    /// connection exactly once the counters are read before and after the dump of open
    /// connections, and the whole is read again if a connection closed in between (its
    /// `closed` count moved, or it was seen in the middle of its close: `tag::CLOSING`).
    pub(super) fn accounted(
        &self,
        slots: &[u32],
    ) -> Result<(StdHashMap<u32, CounterStatus>, Vec<String>)> {
        let Map::SkStorage(data) = &self.maps.socktag else {
            return Ok((self.all_counters(slots)?, Vec::new()));
        };
        let map_id = data
            .info()
            .map_err(map_err("cannot read the socket tag map's id"))?
            .id();
        let mut last = None;
        for _ in 0..50 {
            let before = self.all_counters(slots)?;
            let open = match sockdiag::tagged_connections(data.fd().as_fd(), map_id) {
                Ok(open) => open,
                Err(e) => {
                    let warning = if self.read_only {
                        format!(
                            "bytes of open connections need root (sock_diag of socket storage needs CAP_BPF: {e}); only closed connections' bytes are counted"
                        )
                    } else {
                        format!(
                            "bytes of open connections unavailable (sock_diag: {e}); only closed connections' bytes are counted"
                        )
                    };
                    return Ok((before, vec![warning]));
                }
            };
            let after = self.all_counters(slots)?;
            let settled = before
                .iter()
                .all(|(s, c)| after.get(s).is_some_and(|a| a.closed == c.closed))
                && !open.iter().any(|o| o.tag.kind == tag::CLOSING);
            let mut totals = after;
            for o in open.iter().filter(|o| o.tag.kind == tag::OPEN) {
                if let Some(c) = totals.get_mut(&o.tag.slot) {
                    c.bytes_received += o.bytes_received;
                    c.bytes_sent += o.bytes_sent;
                }
            }
            if settled {
                return Ok((totals, Vec::new()));
            }
            last = Some(totals);
            std::thread::yield_now();
        }
        match last {
            Some(totals) => Ok((totals, Vec::new())),
            None => Ok((self.all_counters(slots)?, Vec::new())),
        }
    }

    /// Everything `tcpshiftctl status` shows, read from the maps.
    pub fn status(&self) -> Result<Status> {
        let live = self.live_slots()?;
        let live_udp = self.live_udp_slots()?;
        let all = self.all_meta()?;
        let occupancy = if all.iter().any(|(_, m)| protocol_of(m.protocols).udp()) {
            self.udp_occupancy()?
        } else {
            StdHashMap::new()
        };
        let slots: Vec<u32> = all
            .iter()
            .flat_map(|(id, m)| (0..u32::from(m.n_subsets)).map(move |i| slot(*id, i)))
            .collect();
        let (mut counters, warnings) = self.accounted(&slots)?;
        let owners = self.open_owners()?;
        let mut services = Vec::new();
        let mut configs = Vec::new();
        for (id, meta) in all {
            let entry = self.entry(&meta)?.unwrap_or_default();
            let n = usize::from(meta.n_subsets).min(MAX_SUBSETS);
            let ws = &entry.weights[..n];
            let shares = weights::shares(ws);
            let protocol = protocol_of(meta.protocols);
            let mut udp = if protocol.udp() {
                self.udp_counters(id, n as u32, &occupancy)?
            } else {
                Vec::new()
            }
            .into_iter();
            let mut subsets = Vec::with_capacity(n);
            for (i, s) in meta.subsets[..n].iter().enumerate() {
                let slot = slot(id, i as u32);
                let backend = subset_addr(s);
                let owner =
                    State::owner_status(owners.as_ref(), slot, backend, live.contains(&slot))?;
                subsets.push(SubsetStatus {
                    name: name_str(&s.name),
                    backend,
                    weight: ws[i],
                    share: shares.get(i).copied().unwrap_or(0.0),
                    live: (!protocol.tcp() || live.contains(&slot))
                        && (!protocol.udp() || live_udp.contains(&slot)),
                    observed_share: None,
                    counters: counters.remove(&slot).unwrap_or_default(),
                    owner,
                    udp: udp.next(),
                    limits: self.limit_status(slot)?,
                });
            }
            let recent: u64 = subsets.iter().map(|s| s.counters.steered_recent).sum();
            if recent > 0 {
                for s in &mut subsets {
                    s.observed_share =
                        Some(s.counters.steered_recent as f64 * 100.0 / recent as f64);
                }
            }
            configs.push(ServiceConfig {
                name: name_str(&meta.name),
                listen: listen_of(&meta),
                subsets: (subsets.iter())
                    .map(|s| SubsetConfig {
                        name: s.name.clone(),
                        addr: s.backend,
                        weight: s.weight,
                        owner: Default::default(),
                    })
                    .collect(),
                take_over: false,
                fail_closed: entry.flags & service_flags::FAIL_CLOSED != 0,
                balance: Default::default(),
                protocol,
            });
            services.push(ServiceStatus {
                name: name_str(&meta.name),
                id,
                listen: listen_of(&meta).to_string(),
                mode: match entry.mode {
                    mode::HASH_SOURCE_IP => "source-ip",
                    mode::ROUND_ROBIN => "round-robin",
                    _ => "hash",
                },
                subsets,
                shadows: Vec::new(),
                fail_closed: entry.flags & service_flags::FAIL_CLOSED != 0,
                protocol,
            });
        }
        let mut warnings = warnings;
        match super::guard::shadowed_among(&configs) {
            Ok(mut shadowed) => {
                for svc in &mut services {
                    svc.shadows = shadowed.remove(&svc.name).unwrap_or_default();
                }
            }
            Err(e) => warnings.push(format!(
                "which listeners the services shadow is unknown: {e}"
            )),
        }
        let program_id = link_program(&self.dir.join(LINK)).ok();
        Ok(Status {
            netns_inode: self.netns_inode,
            state_dir: self.dir.clone(),
            program_id,
            accounting_program_id: link_program(&self.dir.join(SOCKOPS_LINK)).ok(),
            observed_window_secs: OBSERVED_WINDOW_SECS,
            debug_events: self
                .maps
                .global
                .get(&0, 0)
                .map_err(map_err("cannot read the global settings"))?
                .flags
                & global_flags::LOG_DEBUG
                != 0,
            services,
            warnings,
            read_only: self.read_only && program_id.is_none(),
            udp_idle_timeout_secs: self.udp_idle_timeout()?,
        })
    }
}

/// The current second of `CLOCK_MONOTONIC_COARSE`, as the data path counts seconds
/// (`bpf_ktime_get_coarse_ns() / 10⁹`, truncated to 32 bits).
pub(super) fn coarse_second() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

impl Serialize for crate::model::Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
