//! Node reports: what each node has applied and how it steers, written under a lease so
//! that a node that dies disappears from `tcpshiftctl --store status` after the lease's TTL.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use etcd_client::{GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::warn;

use super::{
    FollowStatus, Result, Store, StoreError,
    layout::{Layout, MetaRecord},
};
use crate::state::Status;

/// What one node reports (the value of [`Layout::node_key`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node's name (default: the host name).
    pub node: String,
    /// Whether its follower is connected to the store.
    pub connected: bool,
    /// The desired revision it has applied (0: none yet).
    pub applied_revision: i64,
    /// The generation it has applied.
    pub applied_generation: u64,
    /// Why the newest desired state is not applied, if it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_error: Option<String>,
    /// When it last heard from the store (milliseconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact_ms: Option<u64>,
    /// When the report was written (milliseconds since the Unix epoch).
    pub reported_ms: u64,
    /// Its services as its kernel holds them.
    pub services: Vec<ServiceReport>,
}

/// One service of a [`NodeReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceReport {
    /// Service name.
    pub name: String,
    /// Where it listens.
    pub listen: String,
    /// Its subsets, in order.
    pub subsets: Vec<SubsetReport>,
}

/// One subset of a [`ServiceReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubsetReport {
    /// Subset name.
    pub name: String,
    /// Weight in the node's kernel.
    pub weight: u32,
    /// Whether a live listening socket is registered on the node.
    pub live: bool,
    /// Observed share of new connections, in percent (see
    /// [`crate::state::SubsetStatus::observed_share`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_share: Option<f64>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl NodeReport {
    /// The report of node `node` from its follower's status and its kernel's status
    /// ([`crate::state::State::status`]).
    pub fn new(node: &str, follow: &FollowStatus, status: Option<&Status>) -> Self {
        Self {
            node: node.to_string(),
            connected: follow.connected,
            applied_revision: follow.applied_revision,
            applied_generation: follow.applied_generation,
            apply_error: follow.apply_error.clone(),
            last_contact_ms: follow.last_contact.map(unix_ms),
            reported_ms: unix_ms(SystemTime::now()),
            services: status
                .map(|st| {
                    st.services
                        .iter()
                        .map(|s| ServiceReport {
                            name: s.name.clone(),
                            listen: s.listen.clone(),
                            subsets: s
                                .subsets
                                .iter()
                                .map(|b| SubsetReport {
                                    name: b.name.clone(),
                                    weight: b.weight,
                                    live: b.live,
                                    observed_share: b.observed_share,
                                })
                                .collect(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// A node report as `status` shows it: compared with the store's desired state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    /// The report.
    pub report: NodeReport,
    /// Whether the node has applied the store's newest desired revision.
    pub in_sync: bool,
    /// How many changes it is behind (0 when in sync).
    pub behind: u64,
}

/// Checks a node name: 1 to 253 bytes of `[A-Za-z0-9._-]` (a host name fits).
pub fn validate_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid {
            what: format!("node name {name:?}"),
            reason: "use 1 to 253 characters from A-Z a-z 0-9 . _ - (e.g. the host name)".into(),
        })
    }
}

/// Writes one node's report under a lease and keeps the lease alive. When the node stops
/// (or loses the store for longer than the TTL), the lease expires and the report goes.
pub struct Reporter {
    store: Store,
    key: String,
    shared: Arc<Mutex<Shared>>,
    keeper: JoinHandle<()>,
}

struct Shared {
    lease: i64,
    last: Option<Vec<u8>>,
}

impl Reporter {
    /// Grants a lease of `ttl` (whole seconds, at least 1; etcd may round small TTLs up)
    /// for node `node` and keeps it alive in a background task.
    pub async fn start(store: &Store, node: &str, ttl: Duration) -> Result<Reporter> {
        validate_node_name(node)?;
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = grant(store, ttl).await?;
        let shared = Arc::new(Mutex::new(Shared { lease, last: None }));
        let key = store.layout().node_key(node);
        let keeper = tokio::spawn(keep_alive(store.clone(), key.clone(), shared.clone(), ttl));
        Ok(Reporter {
            store: store.clone(),
            key,
            shared,
            keeper,
        })
    }

    /// Writes `report` (under the lease).
    pub async fn publish(&self, report: &NodeReport) -> Result<()> {
        let value = serde_json::to_vec(report).unwrap_or_default();
        let lease = {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.last = Some(value.clone());
            shared.lease
        };
        put(&self.store, &self.key, value, lease).await
    }

    /// Revokes the lease: the report disappears at once (a clean shutdown).
    pub async fn close(self) -> Result<()> {
        self.keeper.abort();
        let lease = self.shared.lock().unwrap_or_else(|p| p.into_inner()).lease;
        let mut client = self.store.client();
        self.store
            .call("revoking the node's lease", client.lease_revoke(lease))
            .await?;
        Ok(())
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        // The lease is left to expire: a node that dies is seen the same way.
        self.keeper.abort();
    }
}

async fn grant(store: &Store, ttl: i64) -> Result<i64> {
    let mut client = store.client();
    let resp = store
        .call("granting the node's lease", client.lease_grant(ttl, None))
        .await?;
    Ok(resp.id())
}

async fn put(store: &Store, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
    let mut client = store.client();
    store
        .call(
            "writing the node report",
            client.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
    Ok(())
}

/// Refreshes the lease every third of its TTL; when it has expired (the store was away
/// longer than the TTL), grants a new one and writes the last report again.
async fn keep_alive(store: Store, key: String, shared: Arc<Mutex<Shared>>, ttl: i64) {
    let period = Duration::from_millis(u64::try_from(ttl).unwrap_or(1) * 1000 / 3);
    loop {
        tokio::time::sleep(period).await;
        let lease = shared.lock().unwrap_or_else(|p| p.into_inner()).lease;
        let mut client = store.client();
        let alive = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match store.call("refreshing the node's lease", alive).await {
            Ok(Some(resp)) if resp.ttl() > 0 => continue,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot refresh the node report's lease");
                continue;
            }
        }
        // Expired: a new lease, and the report again.
        match grant(&store, ttl).await {
            Ok(new) => {
                let last = {
                    let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
                    s.lease = new;
                    s.last.clone()
                };
                if let Some(value) = last
                    && let Err(e) = put(&store, &key, value, new).await
                {
                    warn!(error = %e, "cannot write the node report again");
                }
            }
            Err(e) => warn!(error = %e, "cannot renew the node report's lease"),
        }
    }
}

impl Store {
    /// Every node report, compared with the desired state, sorted by node name.
    pub async fn node_reports(&self) -> Result<Vec<NodeView>> {
        let layout: &Layout = self.layout();
        let mut client = self.client();
        let meta = self
            .call(
                "reading the desired revision",
                client.get(layout.meta_key(), None),
            )
            .await?;
        let (revision, generation) = match meta.kvs().first() {
            Some(kv) => {
                let record: MetaRecord =
                    serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
                        key: layout.meta_key(),
                        reason: e.to_string(),
                    })?;
                (kv.mod_revision(), record.generation)
            }
            None => (0, 0),
        };
        let nodes = self
            .call(
                "reading the node reports",
                client.get(layout.nodes_prefix(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut views = Vec::new();
        for kv in nodes.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let report: NodeReport =
                serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
                    key,
                    reason: e.to_string(),
                })?;
            let in_sync = report.applied_revision == revision && report.apply_error.is_none();
            views.push(NodeView {
                behind: generation.saturating_sub(report.applied_generation),
                in_sync,
                report,
            });
        }
        views.sort_by(|a, b| a.report.node.cmp(&b.report.node));
        Ok(views)
    }
}
