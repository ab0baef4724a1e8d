//! The rollouts of a namespace, kept with the rest of its state: `TS_ROLLOUTS`, a pinned
//! userspace-only map (created on first use, like `TS_ROUTES`) from a rollout's name to its
//! spec, state and history as JSON. tcpshiftd and `tcpshiftctl rollout` read and write it
//! under the state lock, so a restarted tcpshiftd goes on at the same step and pause.

use std::time::{SystemTime, UNIX_EPOCH};

use aya::maps::{HashMap, MapData, MapError};
use serde::{Deserialize, Serialize};

use super::{State, encode::BPF_F_NO_PREALLOC, error::*, open_map};
use crate::model::rollout::{Event, RolloutSpec, RolloutState};

/// Name of the map.
const ROLLOUTS: &str = tcpshift_common::map_names::ROLLOUTS;
/// Size of a key: the rollout's name, NUL-padded.
const KEY_SIZE: usize = 64;
/// Size of a value: a little-endian `u32` length, then the JSON.
const VALUE_SIZE: usize = 16 * 1024;
/// Most rollouts one namespace keeps.
const MAX_ROLLOUTS: u32 = 1024;
/// Events kept in a rollout's history (the oldest are dropped).
pub const MAX_HISTORY: usize = 40;

type Key = [u8; KEY_SIZE];
type Value = [u8; VALUE_SIZE];
type RolloutsMap = HashMap<MapData, Key, Value>;

/// One event of a rollout's history, with when it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// A rollout as stored: what it should do, where it is, what happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// The spec (from a `Rollout` document or `rollout start`).
    pub spec: RolloutSpec,
    /// Where it is.
    pub state: RolloutState,
    /// The last [`MAX_HISTORY`] events, oldest first.
    pub history: Vec<HistoryEntry>,
    /// In a fleet: the node whose tcpshiftd drives the rollout (wrote this record last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
}

impl RolloutRecord {
    /// A new record of `spec` in `state`, with no history.
    pub fn new(spec: RolloutSpec, state: RolloutState) -> Self {
        RolloutRecord {
            spec,
            state,
            history: Vec::new(),
            driver: None,
        }
    }

    /// Appends `events`, dropping the oldest beyond [`MAX_HISTORY`].
    pub fn record(&mut self, events: &[Event]) {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.history.extend(events.iter().map(|e| HistoryEntry {
            at,
            event: e.clone(),
        }));
        let excess = self.history.len().saturating_sub(MAX_HISTORY);
        self.history.drain(..excess);
    }
}

fn key(name: &str) -> Result<Key> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= KEY_SIZE {
        return Err(StateError::Rollout(format!(
            "rollout name {name:?}: give 1 to {} bytes",
            KEY_SIZE - 1
        )));
    }
    let mut k = [0; KEY_SIZE];
    k[..b.len()].copy_from_slice(b);
    Ok(k)
}

fn decode(v: &Value) -> Result<RolloutRecord> {
    let len = (u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as usize).min(VALUE_SIZE - 4);
    serde_json::from_slice(&v[4..4 + len]).map_err(|e| {
        StateError::Rollout(format!(
            "a stored rollout cannot be read ({e}); remove it with `tcpshiftctl rollout abort --forget NAME`"
        ))
    })
}

fn encode(record: &RolloutRecord) -> Result<Box<Value>> {
    let json = serde_json::to_vec(record)
        .map_err(|e| StateError::Rollout(format!("cannot encode the rollout: {e}")))?;
    if json.len() > VALUE_SIZE - 4 {
        return Err(StateError::Rollout(format!(
            "rollout {:?} is too large to store ({} bytes of at most {}): use fewer steps or metrics",
            record.spec.name,
            json.len(),
            VALUE_SIZE - 4
        )));
    }
    let mut v = Box::new([0u8; VALUE_SIZE]);
    v[..4].copy_from_slice(&(json.len() as u32).to_le_bytes());
    v[4..4 + json.len()].copy_from_slice(&json);
    Ok(v)
}

impl State {
    fn open_rollouts(&self) -> Result<Option<RolloutsMap>> {
        if !self.dir.join(ROLLOUTS).exists() {
            return Ok(None);
        }
        self.open_pinned(ROLLOUTS).map(Some)
    }

    fn create_rollouts(&self) -> Result<RolloutsMap> {
        if let Some(map) = self.open_rollouts()? {
            return Ok(map);
        }
        let map: RolloutsMap = HashMap::create(MAX_ROLLOUTS, BPF_F_NO_PREALLOC)
            .map_err(map_err("cannot create the rollout map"))?;
        let path = self.dir.join(ROLLOUTS);
        map.pin(&path).map_err(|e| StateError::Program {
            what: format!("cannot pin {}", path.display()),
            error: Box::new(e),
        })?;
        self.share_new_pin(&path)?;
        open_map(&self.dir, ROLLOUTS)
    }

    /// Every stored rollout, sorted by name.
    pub fn rollouts(&self) -> Result<Vec<RolloutRecord>> {
        let Some(map) = self.open_rollouts()? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for k in map.keys() {
            let k = k.map_err(map_err("cannot list the rollouts"))?;
            match map.get(&k, 0) {
                Ok(v) => out.push(decode(&v)?),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("cannot read a rollout")(e)),
            }
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }

    /// The rollout called `name`, if stored.
    pub fn rollout(&self, name: &str) -> Result<Option<RolloutRecord>> {
        let Some(map) = self.open_rollouts()? else {
            return Ok(None);
        };
        match map.get(&key(name)?, 0) {
            Ok(v) => decode(&v).map(Some),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("cannot read a rollout")(e)),
        }
    }

    /// Stores `record` under its spec's name (creating the map on first use).
    pub fn put_rollout(&self, record: &RolloutRecord) -> Result<()> {
        let k = key(&record.spec.name)?;
        let v = encode(record)?;
        let mut map = self.create_rollouts()?;
        map.insert(k, *v, 0)
            .map_err(map_err("cannot store the rollout"))
    }

    /// Removes the rollout called `name`; whether it was there.
    pub fn remove_rollout(&self, name: &str) -> Result<bool> {
        let Some(mut map) = self.open_rollouts()? else {
            return Ok(false);
        };
        match map.remove(&key(name)?) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
                Ok(false)
            }
            Err(e) => Err(map_err("cannot remove a rollout")(e)),
        }
    }

    /// Runs `change` on the stored rollout `name` under the state lock and stores the result
    /// (`change` must not write the kernel's weights: do that after, with
    /// [`State::set_weights`], which takes the lock itself).
    pub fn update_rollout<F, E>(
        &mut self,
        name: &str,
        change: F,
    ) -> std::result::Result<RolloutRecord, E>
    where
        F: FnOnce(RolloutRecord) -> std::result::Result<RolloutRecord, E>,
        E: From<StateError>,
    {
        let _lock = self.lock()?;
        let Some(record) = self.rollout(name)? else {
            let known: Vec<String> = self.rollouts()?.into_iter().map(|r| r.spec.name).collect();
            return Err(StateError::Rollout(format!(
                "no rollout named {name:?} (rollouts: {}); start one with `tcpshiftctl rollout start`",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
            .into());
        };
        let record = change(record)?;
        self.put_rollout(&record)?;
        Ok(record)
    }
}
