//! Connection limits and outlier ejections in the kernel: `TS_LIMITS` (written here only,
//! read by sk_lookup) and `TS_LOAD` (written by the programs only, read here).
//!
//! - [`State::set_traffic_policies`] writes the services' traffic policies (limits and
//!   outlier-detection settings per slot), keeping each slot's ejection record;
//! - [`State::outlier_services`] and [`State::store_outlier_records`] are what tcpshiftd's
//!   outlier loop reads and writes (the decisions are [`crate::outlier`]'s);
//! - [`State::limit_status`] is what `status`, `top` and the metrics show.
//!
//! Every write of `TS_LIMITS` happens under the state's lock, as a read-modify-write of the
//! whole value; `Global::flags & LIMITS` is set while the map has an entry, so a namespace
//! without limits costs sk_lookup one bit test per connection.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aya::maps::{HashMap, MapData, MapError};
use serde::Serialize;
use tcpshift_common::{
    MAX_SLOTS, MAX_SUBSETS, SlotLimits, SlotLoad, eject_reason, global_flags, map_names,
    service_summary_key, slot, slot_service, slot_subset,
};

use super::{State, encode::name_str, error::*};
use crate::model::traffic_policy::{OutlierDetection, ServicePolicy, TrafficPolicy, Trigger};
use crate::outlier::{Record, Subset};
use crate::state::CounterStatus;

type LimitsMap = HashMap<MapData, u32, SlotLimits>;
type LoadMap = HashMap<MapData, u32, SlotLoad>;

/// A subset's connection limit and ejection state, as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LimitStatus {
    /// Most open connections; `None`: no limit.
    pub max_connections: Option<u32>,
    /// Open connections now, counted exactly by the kernel (`TS_LOAD`).
    pub open: u64,
    /// New connections refused because every subset was full or ejected (counted on the
    /// subset the hash chose).
    pub refused_at_limit: u64,
    /// New connections that chose this subset and went to another because it was full or
    /// ejected.
    pub diverted: u64,
    /// Outlier detection and ejection; `None` when it is off for this subset.
    pub outlier: Option<OutlierStatus>,
}

/// A subset's outlier detection settings and ejection record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutlierStatus {
    /// Ejected now: it gets no new connection.
    pub ejected: bool,
    /// When the last ejection began, ms since the Unix epoch (0: never ejected).
    pub ejected_since_ms: u64,
    /// When the current ejection ends, ms since the Unix epoch.
    pub ejected_until_ms: u64,
    /// Times ejected (the current ejection included).
    pub times_ejected: u32,
    /// Why it was ejected last: `consecutiveGatewayErrors` or `consecutive5xxErrors`
    /// connection errors in a row; `None`: never ejected.
    pub reason: Option<String>,
    /// Errors in a row so far.
    pub errors_in_row: u32,
    /// Errors in a row that eject.
    pub consecutive_errors: u32,
    /// How often the counters are read, ms.
    pub interval_ms: u32,
    /// The first ejection's length, ms.
    pub base_ejection_ms: u32,
    /// Most subsets ejected at once, percent.
    pub max_ejection_percent: u32,
}

/// One service whose subsets have outlier detection, for tcpshiftd's outlier loop.
#[derive(Debug, Clone)]
pub struct OutlierService {
    /// Service id.
    pub id: u32,
    /// Service name.
    pub name: String,
    /// The shortest `interval` of its subsets.
    pub interval: Duration,
    /// Every subset (slot and decision input; `interval` not filled in).
    pub subsets: Vec<(u32, Subset)>,
}

/// Milliseconds since the Unix epoch, as the ejection records count time.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn reason_name(reason: u32) -> Option<String> {
    match reason {
        eject_reason::GATEWAY_ERRORS => Some("consecutiveGatewayErrors".into()),
        eject_reason::ERRORS_5XX => Some("consecutive5xxErrors".into()),
        _ => None,
    }
}

fn reason_of(trigger: Option<Trigger>) -> u32 {
    match trigger {
        Some(Trigger::GatewayErrors) => eject_reason::GATEWAY_ERRORS,
        Some(Trigger::Errors5xx) => eject_reason::ERRORS_5XX,
        None => eject_reason::NONE,
    }
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The detection stored in `l`, if on.
fn detection_of(l: &SlotLimits) -> Option<OutlierDetection> {
    (l.consecutive_errors > 0).then(|| OutlierDetection {
        consecutive_errors: l.consecutive_errors,
        trigger: if l.reason == eject_reason::ERRORS_5XX {
            Trigger::Errors5xx
        } else {
            Trigger::GatewayErrors
        },
        interval: Duration::from_millis(u64::from(l.interval_ms.max(1))),
        base_ejection_time: Duration::from_millis(u64::from(l.base_ejection_ms)),
        max_ejection_percent: l.max_ejection_percent,
    })
}

/// The ejection record stored in `l`.
fn record_of(l: &SlotLimits) -> Record {
    Record {
        ejected: l.ejected != 0,
        times_ejected: l.times_ejected,
        since_ms: l.ejected_at_ms,
        until_ms: l.eject_until_ms,
        reason: match l.reason {
            eject_reason::GATEWAY_ERRORS => Some(Trigger::GatewayErrors),
            eject_reason::ERRORS_5XX => Some(Trigger::Errors5xx),
            _ => None,
        },
        errors_in_row: l.errors_in_row,
    }
}

/// `l` with `policy`'s settings, its ejection record kept (cleared when detection is off).
fn with_policy(mut l: SlotLimits, policy: &TrafficPolicy) -> SlotLimits {
    l.max_connections = policy.max_connections.unwrap_or(0);
    match policy.outlier_detection {
        Some(d) => {
            l.consecutive_errors = d.consecutive_errors.max(1);
            l.max_ejection_percent = d.max_ejection_percent;
            l.interval_ms = ms(d.interval).max(1);
            l.base_ejection_ms = ms(d.base_ejection_time);
            if l.times_ejected == 0 {
                l.reason = reason_of(Some(d.trigger));
            }
        }
        None => {
            let max = l.max_connections;
            l = SlotLimits::default();
            l.max_connections = max;
        }
    }
    l
}

/// Rewrites service `id`'s summary entry from its slots' entries: the mask of ejected subsets
/// and the mask of subsets with a limit (removed when both are empty).
fn write_summary(map: &mut LimitsMap, id: u32) -> Result<()> {
    let mut summary = SlotLimits::default();
    for i in 0..MAX_SUBSETS as u32 {
        match map.get(&slot(id, i), 0) {
            Ok(l) => {
                if l.ejected != 0 {
                    summary.ejected |= 1 << i;
                }
                if l.max_connections > 0 {
                    summary.max_connections |= 1 << i;
                }
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err("cannot read a connection limit")(e)),
        }
    }
    let key = service_summary_key(id);
    if summary == SlotLimits::default() {
        return ignore_missing(map.remove(&key), "cannot remove a connection limit");
    }
    map.insert(key, summary, 0)
        .map_err(map_err("cannot write a connection limit"))
}

/// Clears the bytes of subsets `from..to` in the summary entry `key` of `TS_LOAD` (the
/// subsets are gone). Read-modify-write: a byte sock_ops stores meanwhile for another subset
/// may be lost, and is written again at that subset's next open or close.
fn clear_full_bytes(map: &mut LoadMap, key: u32, from: u32, to: u32) -> Result<()> {
    let mut v = match map.get(&key, 0) {
        Ok(v) => v,
        Err(MapError::KeyNotFound) => return Ok(()),
        Err(e) => return Err(map_err("cannot read open connections")(e)),
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&v.open.to_ne_bytes());
    bytes[8..].copy_from_slice(&v.refused.to_ne_bytes());
    let old = bytes;
    for b in &mut bytes[from as usize..to as usize] {
        *b = 0;
    }
    if bytes == old {
        return Ok(());
    }
    let [a, b] = [&bytes[..8], &bytes[8..]].map(|h| {
        let mut w = [0u8; 8];
        w.copy_from_slice(h);
        u64::from_ne_bytes(w)
    });
    v.open = a;
    v.refused = b;
    map.insert(key, v, 0)
        .map_err(map_err("cannot write open connections"))
}

impl State {
    fn limits_map(&self) -> Result<LimitsMap> {
        self.open_pinned(map_names::LIMITS)
    }

    fn load_map(&self) -> Result<LoadMap> {
        self.open_pinned(map_names::LOAD)
    }

    /// Writes the traffic policy of every service named in `policies` into `TS_LIMITS`: each
    /// subset's limit and outlier-detection settings (an empty policy removes them). The
    /// ejection records of subsets that keep outlier detection stay; entries of services or
    /// subsets that no longer exist are removed. Services not named are left as they are.
    pub fn set_traffic_policies(&mut self, policies: &[ServicePolicy]) -> Result<()> {
        let _lock = self.lock()?;
        let mut map = self.limits_map()?;
        let all = self.all_meta()?;
        for (id, meta) in &all {
            let name = name_str(&meta.name);
            let Some(policy) = policies.iter().find(|p| p.service == name) else {
                continue;
            };
            let n = usize::from(meta.n_subsets).min(MAX_SUBSETS);
            for (i, s) in meta.subsets[..n].iter().enumerate() {
                let key = slot(*id, i as u32);
                let p = policy.for_subset(&name_str(&s.name));
                let old = match map.get(&key, 0) {
                    Ok(l) => Some(l),
                    Err(MapError::KeyNotFound) => None,
                    Err(e) => return Err(map_err("cannot read a connection limit")(e)),
                };
                if p.is_empty() {
                    if old.is_some() {
                        ignore_missing(map.remove(&key), "cannot remove a connection limit")?;
                    }
                    continue;
                }
                let new = with_policy(old.unwrap_or_default(), &p);
                if old != Some(new) {
                    map.insert(key, new, 0)
                        .map_err(map_err("cannot write a connection limit"))?;
                }
            }
            write_summary(&mut map, *id)?;
        }
        // Entries of services or subsets that are gone.
        let keys: Vec<u32> = map
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err("cannot list the connection limits"))?;
        for key in &keys {
            let alive = if *key >= MAX_SLOTS {
                all.iter().any(|(id, _)| service_summary_key(*id) == *key)
            } else {
                all.iter().any(|(id, meta)| {
                    *id == slot_service(*key) && slot_subset(*key) < u32::from(meta.n_subsets)
                })
            };
            if !alive {
                ignore_missing(map.remove(key), "cannot remove a connection limit")?;
            }
        }
        let any = map.keys().next().is_some();
        self.set_limits_flag(any)
    }

    /// Removes the `TS_LIMITS` and `TS_LOAD` entries of slots `from..to` of service `id` (a
    /// deleted service or subset, or leftovers of a service that had the id before), and the
    /// service's summary entries with them (`from` = 0) or the removed subsets' part of them;
    /// clears `LIMITS` when no limit is left. Called under the caller's lock, once no service
    /// entry routes to these slots any more.
    ///
    /// A connection of a removed slot that closes later does not create its `TS_LOAD` entry
    /// again (sock_ops takes a close off an existing entry only), so nothing is left behind.
    pub(super) fn clear_limit_slots(&mut self, id: u32, from: u32, to: u32) -> Result<()> {
        let mut limits = self.limits_map()?;
        let mut load = self.load_map()?;
        let to = to.min(MAX_SUBSETS as u32);
        for i in from..to {
            let key = slot(id, i);
            ignore_missing(limits.remove(&key), "cannot remove a connection limit")?;
            ignore_missing(load.remove(&key), "cannot remove open connections")?;
        }
        let summary = service_summary_key(id);
        if from == 0 {
            ignore_missing(load.remove(&summary), "cannot remove open connections")?;
        } else if from < to {
            clear_full_bytes(&mut load, summary, from, to)?;
        }
        write_summary(&mut limits, id)?;
        let any = limits.keys().next().is_some();
        self.set_limits_flag(any)
    }

    /// Sets or clears `LIMITS` in the global flags (under the caller's lock).
    fn set_limits_flag(&mut self, on: bool) -> Result<()> {
        let mut g = self
            .maps
            .global
            .get(&0, 0)
            .map_err(map_err("cannot read the global settings"))?;
        let flags = if on {
            g.flags | global_flags::LIMITS
        } else {
            g.flags & !global_flags::LIMITS
        };
        if flags == g.flags {
            return Ok(());
        }
        g.flags = flags;
        self.maps
            .global
            .set(0, g, 0)
            .map_err(map_err("cannot write the global settings"))
    }

    /// A subset's limit, load and ejection state (`slot` = service id × 16 + subset).
    pub fn limit_status(&self, slot: u32) -> Result<LimitStatus> {
        let limits = match self.limits_map()?.get(&slot, 0) {
            Ok(l) => Some(l),
            Err(MapError::KeyNotFound) => None,
            Err(e) => return Err(map_err("cannot read a connection limit")(e)),
        };
        let load = match self.load_map()?.get(&slot, 0) {
            Ok(l) => l,
            Err(MapError::KeyNotFound) => SlotLoad::default(),
            Err(e) => return Err(map_err("cannot read open connections")(e)),
        };
        Ok(LimitStatus {
            max_connections: limits
                .and_then(|l| (l.max_connections > 0).then_some(l.max_connections)),
            open: (load.open as i64).max(0) as u64,
            refused_at_limit: load.refused,
            diverted: load.diverted,
            outlier: limits
                .filter(|l| l.consecutive_errors > 0 || l.ejected != 0)
                .map(|l| OutlierStatus {
                    ejected: l.ejected != 0,
                    ejected_since_ms: l.ejected_at_ms,
                    ejected_until_ms: l.eject_until_ms,
                    times_ejected: l.times_ejected,
                    reason: if l.times_ejected > 0 || l.ejected != 0 {
                        reason_name(l.reason)
                    } else {
                        None
                    },
                    errors_in_row: l.errors_in_row,
                    consecutive_errors: l.consecutive_errors,
                    interval_ms: l.interval_ms,
                    base_ejection_ms: l.base_ejection_ms,
                    max_ejection_percent: l.max_ejection_percent,
                }),
        })
    }

    /// The counters of one subset, for the outlier loop.
    pub fn subset_counters(&self, slot: u32) -> Result<CounterStatus> {
        self.counters(slot)
    }

    /// Every service with outlier detection on (or a subset still ejected), with every
    /// subset's settings and record.
    pub fn outlier_services(&self) -> Result<Vec<OutlierService>> {
        let map = self.limits_map()?;
        let mut entries = Vec::new();
        for item in map.iter() {
            entries.push(item.map_err(map_err("cannot read the connection limits"))?);
        }
        let mut out = Vec::new();
        for (id, meta) in self.all_meta()? {
            let mine: Vec<&(u32, SlotLimits)> = entries
                .iter()
                .filter(|(k, l)| {
                    *k < MAX_SLOTS
                        && slot_service(*k) == id
                        && (l.consecutive_errors > 0 || l.ejected != 0)
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            let n = usize::from(meta.n_subsets).min(MAX_SUBSETS);
            let mut subsets = Vec::with_capacity(n);
            let mut interval = Duration::MAX;
            for (i, s) in meta.subsets[..n].iter().enumerate() {
                let key = slot(id, i as u32);
                let l = mine.iter().find(|(k, _)| *k == key).map(|(_, l)| *l);
                let detection = l.as_ref().and_then(detection_of);
                if let Some(d) = detection {
                    interval = interval.min(d.interval);
                }
                subsets.push((
                    key,
                    Subset {
                        name: name_str(&s.name),
                        detection,
                        record: l.as_ref().map(record_of).unwrap_or_default(),
                        interval: None,
                    },
                ));
            }
            out.push(OutlierService {
                id,
                name: name_str(&meta.name),
                interval: if interval == Duration::MAX {
                    Duration::from_secs(1)
                } else {
                    interval
                },
                subsets,
            });
        }
        Ok(out)
    }

    /// Stores the ejection records of `records` (slot, record) in `TS_LIMITS`, keeping the
    /// settings there; a slot whose entry is gone (policy removed meanwhile) is skipped.
    pub fn store_outlier_records(&mut self, records: &[(u32, Record)]) -> Result<()> {
        let _lock = self.lock()?;
        let mut map = self.limits_map()?;
        for (key, r) in records {
            let mut l = match map.get(key, 0) {
                Ok(l) => l,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err("cannot read a connection limit")(e)),
            };
            if l.consecutive_errors == 0 && !r.ejected {
                // Detection was turned off meanwhile: leave the entry as the policy wrote it.
                continue;
            }
            l.ejected = u32::from(r.ejected);
            l.times_ejected = r.times_ejected;
            l.ejected_at_ms = r.since_ms;
            l.eject_until_ms = r.until_ms;
            if r.reason.is_some() {
                l.reason = reason_of(r.reason);
            }
            l.errors_in_row = r.errors_in_row;
            map.insert(*key, l, 0)
                .map_err(map_err("cannot write an ejection"))?;
        }
        let mut ids: Vec<u32> = records.iter().map(|(k, _)| slot_service(*k)).collect();
        ids.dedup();
        for id in ids {
            write_summary(&mut map, id)?;
        }
        Ok(())
    }
}
