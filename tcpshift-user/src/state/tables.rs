//! Which bucket table a service gets when its weights or mode change: the table of its mode,
//! built afresh, or — for source-IP affinity — rebuilt from the table the kernel uses now so
//! that as few clients as possible move ([`crate::weights::rebuild_table`]).

use std::collections::HashMap as StdHashMap;

use aya::maps::MapError;
use tcpshift_common::{BucketTable, NUM_BUCKETS, ServiceEntry, table_key};

use crate::{model::Balance, weights};

use super::{State, error::*};

/// Tables built afresh in one change, by mode and weights (many services share weights).
pub(super) type Fresh = StdHashMap<(Balance, Vec<u32>), (Box<BucketTable>, u32)>;

impl State {
    /// The table (and round-robin period, see [`weights::round_robin_table`]) for a service
    /// placed by `balance` with weights `ws`, whose entry is `old` before the change.
    ///
    /// - [`Balance::SourceIp`] with an old table: the minimal-change rebuild of the table the
    ///   data path uses now (any old mode's table: its counts are what clients see today);
    /// - otherwise the mode's fresh table: evenly spread buckets ([`weights::build_table`]) or
    ///   the round-robin sequence; the same for every host with the same weights.
    pub(super) fn table_for(
        &self,
        balance: Balance,
        ws: &[u32],
        old: Option<&ServiceEntry>,
        fresh: &mut Fresh,
    ) -> Result<(Box<BucketTable>, u32)> {
        if balance == Balance::SourceIp
            && let Some(old) = old
        {
            match self.maps.buckets.get(&table_key(old.id, old.generation), 0) {
                Ok(current) => {
                    return Ok((weights::rebuild_table(&current, ws)?, NUM_BUCKETS as u32));
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("cannot read a bucket table")(e)),
            }
        }
        let key = (balance, ws.to_vec());
        if let Some((table, period)) = fresh.get(&key) {
            return Ok((table.clone(), *period));
        }
        let built = match balance {
            Balance::RoundRobin => weights::round_robin_table(ws)?,
            Balance::Hash | Balance::SourceIp => (weights::build_table(ws)?, NUM_BUCKETS as u32),
        };
        fresh.insert(key, (built.0.clone(), built.1));
        Ok(built)
    }
}
