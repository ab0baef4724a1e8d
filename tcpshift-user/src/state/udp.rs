//! UDP services' share of the state: the flow table's settings (its size, chosen at install,
//! and the idle timeout), the UDP subsets' counters and reading them back with the flow
//! table's occupancy (which gives the evictions).

use std::{
    collections::HashMap as StdHashMap,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap, PerCpuValues};
use tcpshift_common::{
    DEFAULT_UDP_FLOWS, MAX_SUBSETS, UdpCounters, UdpFlow, UdpFlowKey, map_names, slot,
};

use super::{State, commit::write, error::*};

/// Size of `TS_UDP_FLOWS` for the next install in this process (see [`set_flow_table_size`]).
static FLOW_TABLE_SIZE: AtomicU32 = AtomicU32::new(DEFAULT_UDP_FLOWS);

/// Sets the number of entries of the UDP flow table (`TS_UDP_FLOWS`, an LRU hash) created by
/// the next [`State::install`] of this process: the map's `max_entries`, fixed when the map
/// is created. A namespace already installed keeps its table; `tcpshiftctl uninstall` and a
/// new install change it. Each entry takes about 72 bytes of kernel memory.
pub fn set_flow_table_size(entries: u32) {
    FLOW_TABLE_SIZE.store(entries.max(1), Ordering::Relaxed);
}

/// The size [`set_flow_table_size`] chose (default [`DEFAULT_UDP_FLOWS`]).
pub(super) fn flow_table_size() -> u32 {
    FLOW_TABLE_SIZE.load(Ordering::Relaxed)
}

/// Creates zeroed UDP counters for `slot` unless they exist.
pub(super) fn ensure_udp_counters(
    counters: &mut PerCpuHashMap<MapData, u32, UdpCounters>,
    slot: u32,
) -> Result<()> {
    if counters.get(&slot, 0).is_ok() {
        return Ok(());
    }
    let n = aya::util::nr_cpus().map_err(|(what, e)| StateError::Io {
        what: "cannot count CPUs",
        path: PathBuf::from(what),
        error: e,
    })?;
    write("counters", "cannot create UDP counters", || {
        let zeros = PerCpuValues::try_from(vec![UdpCounters::default(); n])?;
        counters.insert(slot, zeros, 0)
    })
}

/// One UDP subset's counters, summed over CPUs, and its flows in the table now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UdpSubsetCounters {
    /// Flows started on the subset (new flows, and idle flows choosing again).
    pub flows_started: u64,
    /// Datagrams steered to the subset's socket.
    pub datagrams: u64,
    /// Flows moved here because their subset had no live socket.
    pub fallback_in: u64,
    /// Flows moved away because this subset had no live socket.
    pub fallback_out: u64,
    /// Datagrams that found no subset with a live socket.
    pub misses: u64,
    /// Flows that had been idle longer than the timeout when a datagram came.
    pub expired: u64,
    /// Flow table entries of the subset evicted by the kernel's LRU (the table was full):
    /// entries written minus entries given to another subset minus entries in the table now.
    pub evictions: u64,
    /// Entries of the subset in the flow table now (idle ones included until reused or
    /// evicted).
    pub flows_in_table: u64,
}

impl State {
    /// The idle timeout of UDP flows, in seconds.
    pub fn udp_idle_timeout(&self) -> Result<u32> {
        let g = self
            .maps
            .global
            .get(&0, 0)
            .map_err(map_err("cannot read the global settings"))?;
        Ok(if g.udp_idle_secs == 0 {
            tcpshift_common::DEFAULT_UDP_IDLE_SECS
        } else {
            g.udp_idle_secs
        })
    }

    /// Sets the idle timeout of UDP flows (`Global::udp_idle_secs`): a flow whose last
    /// datagram is older than `secs` seconds chooses its subset again. Takes effect at once
    /// for every flow. `secs` must be at least 1.
    pub fn set_udp_idle_timeout(&mut self, secs: u32) -> Result<()> {
        let _lock = self.lock()?;
        let mut g = self
            .maps
            .global
            .get(&0, 0)
            .map_err(map_err("cannot read the global settings"))?;
        g.udp_idle_secs = secs.max(1);
        self.maps
            .global
            .set(0, g, 0)
            .map_err(map_err("cannot write the global settings"))
    }

    /// The counters of every UDP subset of service `id` (`n_subsets` subsets), with the
    /// flow table's occupancy read once for all services in `occupancy`
    /// ([`State::udp_occupancy`]).
    pub fn udp_counters(
        &self,
        id: u32,
        n_subsets: u32,
        occupancy: &StdHashMap<u32, u64>,
    ) -> Result<Vec<UdpSubsetCounters>> {
        let mut out = Vec::new();
        for i in 0..n_subsets.min(MAX_SUBSETS as u32) {
            let s = slot(id, i);
            let sum = match self.maps.udp_counters.get(&s, 0) {
                Ok(per_cpu) => per_cpu.iter().fold(UdpCounters::default(), |mut a, c| {
                    a.flows += c.flows;
                    a.datagrams += c.datagrams;
                    a.fallback_in += c.fallback_in;
                    a.fallback_out += c.fallback_out;
                    a.misses += c.misses;
                    a.inserted += c.inserted;
                    a.retired += c.retired;
                    a.expired += c.expired;
                    a
                }),
                Err(MapError::KeyNotFound) => UdpCounters::default(),
                Err(e) => return Err(map_err("cannot read UDP counters")(e)),
            };
            let in_table = occupancy.get(&s).copied().unwrap_or(0);
            out.push(UdpSubsetCounters {
                flows_started: sum.flows,
                datagrams: sum.datagrams,
                fallback_in: sum.fallback_in,
                fallback_out: sum.fallback_out,
                misses: sum.misses,
                expired: sum.expired,
                evictions: sum
                    .inserted
                    .saturating_sub(sum.retired)
                    .saturating_sub(in_table),
                flows_in_table: in_table,
            });
        }
        Ok(out)
    }

    /// Entries of the UDP flow table per slot: one pass over the table.
    pub fn udp_occupancy(&self) -> Result<StdHashMap<u32, u64>> {
        let path = self.dir.join(map_names::UDP_FLOWS);
        let data = MapData::from_pin(&path).map_err(|e| pin_error(e, &path))?;
        let flows: HashMap<MapData, UdpFlowKey, UdpFlow> =
            HashMap::try_from(aya::maps::Map::LruHashMap(data))
                .map_err(map_err("UDP flow table"))?;
        let mut out = StdHashMap::new();
        for item in flows.iter() {
            // An entry removed while we iterate ends the walk early; the count is a snapshot.
            let Ok((k, v)) = item else { break };
            *out.entry(slot(k.id, v.subset)).or_insert(0) += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn flow_table_size_is_at_least_one() {
        super::set_flow_table_size(0);
        assert_eq!(super::flow_table_size(), 1);
        super::set_flow_table_size(tcpshift_common::DEFAULT_UDP_FLOWS);
        assert_eq!(super::flow_table_size(), tcpshift_common::DEFAULT_UDP_FLOWS);
    }
}
