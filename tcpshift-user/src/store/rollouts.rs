//! Fleet rollouts in the store: each rollout's record (spec, state, history — the same
//! [`RolloutRecord`] a single host keeps in `TS_ROLLOUTS`), the nodes' cumulative signals, and
//! the driver election.
//!
//! | key | value | written by |
//! |---|---|---|
//! | `PREFIX/rollouts/records/NAME` | a [`RolloutRecord`] as JSON | `tcpshiftctl --store rollout`/`apply`, the driver |
//! | `PREFIX/rollouts/driver` | the driving node's name, under its lease | the node elected |
//! | `PREFIX/rollouts/signals/NODE` | a [`NodeSignals`], under the node's lease | each tcpshiftd, while a rollout is under way |
//!
//! A record changes only in a transaction that compares its mod revision with the one read
//! (so a manual command and the driver never both act on the same state), and a decision that
//! changes the weights writes the service's key and the desired state's `meta` in the **same**
//! transaction, compared with the desired revision read: the weights and the record that
//! explains them are never apart. The driver key is created only when absent
//! (create-if-absent), under the lease of the node that creates it; when that node's
//! tcpshiftd dies its lease expires, the key goes, and the next node to try becomes the driver
//! and goes on from the stored record.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use super::{
    DesiredState, Layout, Result, Snapshot, Store, StoreError,
    layout::{MetaRecord, ServiceRecord},
};
use crate::{model::rollout::Signals, state::RolloutRecord};

impl Layout {
    /// Prefix of the rollout records (`rollouts/records/NAME`).
    pub fn rollout_records_prefix(&self) -> String {
        format!("{}records/", self.rollouts_prefix())
    }

    /// The record of rollout `name`.
    pub fn rollout_key(&self, name: &str) -> String {
        format!("{}{name}", self.rollout_records_prefix())
    }

    /// The driver election key (`rollouts/driver`).
    pub fn rollout_driver_key(&self) -> String {
        format!("{}driver", self.rollouts_prefix())
    }

    /// Prefix of the nodes' signals (`rollouts/signals/NODE`).
    pub fn rollout_signals_prefix(&self) -> String {
        format!("{}signals/", self.rollouts_prefix())
    }
}

/// One node's cumulative signals (the value of `rollouts/signals/NODE`): for each service
/// under a rollout, each of its rolled-out subsets' counters since they were created, as
/// [`crate::rollout::signals::cumulative`] reads them. The driver sums the nodes' differences
/// between two readings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSignals {
    /// The node.
    pub node: String,
    /// Service → subset → cumulative signals.
    pub services: BTreeMap<String, BTreeMap<String, Signals>>,
}

/// A stored rollout record and the mod revision it was read at (the transaction that
/// changes it compares this).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRollout {
    /// The record.
    pub record: RolloutRecord,
    /// Its key's mod revision.
    pub revision: i64,
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

impl Store {
    /// Every rollout record, sorted by name.
    pub async fn rollouts(&self) -> Result<Vec<StoredRollout>> {
        let mut client = self.client();
        let resp = self
            .call(
                "reading the rollouts",
                client.get(
                    self.layout().rollout_records_prefix(),
                    Some(GetOptions::new().with_prefix()),
                ),
            )
            .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let record: RolloutRecord =
                serde_json::from_slice(kv.value()).map_err(|e| corrupt(&key, e))?;
            out.push(StoredRollout {
                record,
                revision: kv.mod_revision(),
            });
        }
        out.sort_by(|a, b| a.record.spec.name.cmp(&b.record.spec.name));
        Ok(out)
    }

    /// The rollout record `name`, if stored.
    pub async fn rollout(&self, name: &str) -> Result<Option<StoredRollout>> {
        let key = self.layout().rollout_key(name);
        let mut client = self.client();
        let resp = self
            .call("reading a rollout", client.get(key.clone(), None))
            .await?;
        resp.kvs()
            .first()
            .map(|kv| {
                Ok(StoredRollout {
                    record: serde_json::from_slice(kv.value()).map_err(|e| corrupt(&key, e))?,
                    revision: kv.mod_revision(),
                })
            })
            .transpose()
    }

    /// Writes `record` in one transaction that succeeds only if its key's mod revision is
    /// still `revision` (0: the key must not exist) and, when `weights` is given (the state
    /// after `base` with the rollout's new weights), the desired revision is still
    /// `base.revision`; then the service keys that changed and `meta` are written too. `false`:
    /// another writer came first, nothing was written.
    pub async fn commit_rollout(
        &self,
        record: &RolloutRecord,
        revision: i64,
        base: &Snapshot,
        weights: Option<&DesiredState>,
    ) -> Result<bool> {
        let layout = self.layout();
        let key = layout.rollout_key(&record.spec.name);
        let value = serde_json::to_vec(record).map_err(|e| corrupt(&key, e))?;
        let mut when = vec![Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            revision,
        )];
        let mut ops = vec![TxnOp::put(key, value, None)];
        if let Some(next) = weights {
            next.validate()?;
            when.push(Compare::mod_revision(
                layout.meta_key(),
                CompareOp::Equal,
                base.revision,
            ));
            let meta = serde_json::to_vec(&MetaRecord {
                generation: base.generation + 1,
            })
            .map_err(|e| corrupt(&layout.meta_key(), e))?;
            ops.push(TxnOp::put(layout.meta_key(), meta, None));
            for s in next.services() {
                if base.state.get(&s.config.name) != Some(s) {
                    let r = ServiceRecord::new(&s.config, s.annotation.as_deref());
                    let v = serde_json::to_vec(&r)
                        .map_err(|e| corrupt(&layout.service_key(&s.config.name), e))?;
                    ops.push(TxnOp::put(layout.service_key(&s.config.name), v, None));
                }
            }
        }
        let txn = Txn::new().when(when).and_then(ops);
        let mut client = self.client();
        let resp = self
            .call("committing a rollout decision", client.txn(txn))
            .await?;
        Ok(resp.succeeded())
    }

    /// Removes the record of rollout `name`; whether it was there.
    pub async fn remove_rollout(&self, name: &str) -> Result<bool> {
        let mut client = self.client();
        let resp = self
            .call(
                "removing a rollout",
                client.delete(self.layout().rollout_key(name), None),
            )
            .await?;
        Ok(resp.deleted() > 0)
    }

    /// Grants a lease of `ttl_secs` seconds (the fleet rollout task's: its signals and, when
    /// it drives, the driver key live under it).
    pub async fn grant_lease(&self, ttl_secs: i64) -> Result<i64> {
        let mut client = self.client();
        let resp = self
            .call("granting a lease", client.lease_grant(ttl_secs, None))
            .await?;
        Ok(resp.id())
    }

    /// Refreshes `lease` once; `false` when it has expired (grant a new one).
    pub async fn refresh_lease(&self, lease: i64) -> Result<bool> {
        let mut client = self.client();
        let alive = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        let resp = self.call("refreshing a lease", alive).await?;
        Ok(resp.is_some_and(|r| r.ttl() > 0))
    }

    /// Writes this node's signals under `lease`.
    pub async fn publish_signals(&self, signals: &NodeSignals, lease: i64) -> Result<()> {
        let key = format!("{}{}", self.layout().rollout_signals_prefix(), signals.node);
        let value = serde_json::to_vec(signals).map_err(|e| corrupt(&key, e))?;
        let mut client = self.client();
        self.call(
            "writing the node's rollout signals",
            client.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        Ok(())
    }

    /// Every node's published signals (nodes whose lease expired are gone).
    pub async fn node_signals(&self) -> Result<Vec<NodeSignals>> {
        let mut client = self.client();
        let resp = self
            .call(
                "reading the nodes' rollout signals",
                client.get(
                    self.layout().rollout_signals_prefix(),
                    Some(GetOptions::new().with_prefix()),
                ),
            )
            .await?;
        resp.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value())
                    .map_err(|e| corrupt(&String::from_utf8_lossy(kv.key()), e))
            })
            .collect()
    }

    /// Tries to become (or stay) the fleet's rollout driver: creates the driver key with
    /// `node` under `lease` when nobody holds it. The node holding it now.
    pub async fn campaign(&self, node: &str, lease: i64) -> Result<String> {
        let key = self.layout().rollout_driver_key();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.clone(),
                node,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let mut client = self.client();
        let resp = self
            .call("electing the rollout driver", client.txn(txn))
            .await?;
        if resp.succeeded() {
            return Ok(node.to_string());
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op
                && let Some(kv) = get.kvs().first()
            {
                return Ok(String::from_utf8_lossy(kv.value()).into_owned());
            }
        }
        // Gone between the compare and the get: nobody drives; the next try may win.
        Ok(String::new())
    }

    /// The node driving the fleet's rollouts now, if any.
    pub async fn rollout_driver(&self) -> Result<Option<String>> {
        let mut client = self.client();
        let resp = self
            .call(
                "reading the rollout driver",
                client.get(self.layout().rollout_driver_key(), None),
            )
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_keys_are_under_the_reserved_prefix() {
        let l = Layout::new("/t/v1");
        assert_eq!(l.rollout_key("echo"), "/t/v1/rollouts/records/echo");
        assert_eq!(l.rollout_driver_key(), "/t/v1/rollouts/driver");
        assert_eq!(l.rollout_signals_prefix(), "/t/v1/rollouts/signals/");
        // None of them is a desired-state key: nodes' followers never wake up for them.
        assert_eq!(l.classify(&l.rollout_key("echo")), None);
        assert!(!l.rollout_driver_key().starts_with(&l.desired_prefix()));
    }
}
