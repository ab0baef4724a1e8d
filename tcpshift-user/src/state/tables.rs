//! Which bucket table a service gets when its weights or mode change: the table of its mode,
//! built afresh — for source-IP affinity, the seeded table of [`crate::weights::affinity_table`],
//! a function of the namespace's hash seed and the weights only, so that few clients move on
//! a weight change and every host of a fleet maps a client alike.

use std::collections::HashMap as StdHashMap;

use tcpshift_common::{BucketTable, NUM_BUCKETS};

use crate::{model::Balance, weights};

use super::{State, error::*};

/// Tables built afresh in one change, by mode and weights (many services share weights).
pub(super) type Fresh = StdHashMap<(Balance, Vec<u32>), (Box<BucketTable>, u32)>;

impl State {
    /// The table (and round-robin period, see [`weights::round_robin_table`]) for a service
    /// placed by `balance` with weights `ws`: evenly spread buckets ([`weights::build_table`]),
    /// the round-robin sequence, or the affinity table under this namespace's hash seed
    /// ([`weights::affinity_table`]); the same for every host with the same weights (and
    /// seed).
    pub(super) fn table_for(
        &self,
        balance: Balance,
        ws: &[u32],
        fresh: &mut Fresh,
    ) -> Result<(Box<BucketTable>, u32)> {
        let key = (balance, ws.to_vec());
        if let Some((table, period)) = fresh.get(&key) {
            return Ok((table.clone(), *period));
        }
        let built = match balance {
            Balance::RoundRobin => weights::round_robin_table(ws)?,
            Balance::Hash => (weights::build_table(ws)?, NUM_BUCKETS as u32),
            Balance::SourceIp => (
                weights::affinity_table(self.hash_seed()?, ws)?,
                NUM_BUCKETS as u32,
            ),
        };
        fresh.insert(key, (built.0.clone(), built.1));
        Ok(built)
    }
}
