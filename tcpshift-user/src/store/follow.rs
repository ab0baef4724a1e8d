//! Following the store: a node's tcpshiftd watches the desired state and applies every
//! revision, whole, in order.
//!
//! [`Follower::run`] reads the desired state once, then watches [`Layout::desired_prefix`]
//! from the next revision. The events of one etcd revision (one commit) are gathered and the
//! complete desired state after them is handed to the apply step, so a node never applies
//! half a change; revisions come in order. When the store is unreachable the follower
//! **fails static**: it keeps the last applied state (nothing is reset, no apply happens),
//! reports `connected = false` and the time of its last contact, retries, and resumes the
//! watch from the last revision it saw. When that revision has been compacted away it reads
//! the whole state again (a full resync) and applies it.
//!
//! The apply step is a closure, so tcpshiftd passes one that calls
//! [`crate::state::State::apply_with`] and [`crate::state::State::delete_with`] (see
//! [`DesiredState::to_change`] and [`DesiredState::extra_in`]) and tests pass one that
//! records what it was given.

use std::{
    fmt::Display,
    time::{Duration, Instant, SystemTime},
};

use etcd_client::{EventType, WatchOptions};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::state::{State, StateError};

#[cfg(doc)]
use super::DesiredState;
use super::{
    Result, Store, StoreError,
    client::{RawDesired, Snapshot},
    layout::{DesiredKey, Layout},
};

/// How the follower paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowOptions {
    /// How often an idle watch asks the store for a progress report. A watch without any
    /// answer for twice this long counts as disconnected.
    pub progress_interval: Duration,
    /// First wait before reconnecting; it doubles up to [`FollowOptions::max_retry_interval`].
    pub retry_interval: Duration,
    /// Longest wait between reconnection attempts.
    pub max_retry_interval: Duration,
}

impl Default for FollowOptions {
    fn default() -> Self {
        Self {
            progress_interval: Duration::from_secs(5),
            retry_interval: Duration::from_millis(200),
            max_retry_interval: Duration::from_secs(5),
        }
    }
}

/// What the follower knows about itself (for status, logs and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FollowStatus {
    /// Whether the watch is established and answering.
    pub connected: bool,
    /// The desired revision last applied (0: nothing applied yet).
    pub applied_revision: i64,
    /// The generation last applied.
    pub applied_generation: u64,
    /// The fleet's hash seed as last applied.
    pub applied_seed: Option<u32>,
    /// The newest desired revision seen in the store.
    pub store_revision: i64,
    /// The newest generation seen in the store.
    pub store_generation: u64,
    /// When the store last answered.
    pub last_contact: Option<SystemTime>,
    /// The last problem reaching the store; cleared when the store answers again.
    pub last_error: Option<String>,
    /// Why the newest desired state is not applied (an unreadable record, the apply step
    /// refused it); cleared by the next successful apply.
    pub apply_error: Option<String>,
    /// How many times the whole state was read again because the watch's revision had been
    /// compacted.
    pub resyncs: u64,
}

impl FollowStatus {
    /// The follower's metrics in Prometheus text: `tcpshift_store_connected`,
    /// `tcpshift_store_applied_revision`, `tcpshift_store_revision`,
    /// `tcpshift_store_last_contact_seconds` (seconds since the store last answered; absent
    /// before the first answer), `tcpshift_store_in_sync` and `tcpshift_store_resyncs_total`.
    pub fn prometheus(&self, node: &str) -> String {
        use std::fmt::Write;
        let label = format!("{{node=\"{}\"}}", node.replace(['\\', '"'], "_"));
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{label} {value}");
        };
        metric(
            "tcpshift_store_connected",
            "gauge",
            "Whether tcpshiftd's watch of the fleet store is established and answering (1) or not (0: failing static).",
            u8::from(self.connected).to_string(),
        );
        metric(
            "tcpshift_store_applied_revision",
            "gauge",
            "The store revision of the desired state this node has applied (0: none yet).",
            self.applied_revision.to_string(),
        );
        metric(
            "tcpshift_store_revision",
            "gauge",
            "The newest store revision of the desired state this node has seen.",
            self.store_revision.to_string(),
        );
        metric(
            "tcpshift_store_in_sync",
            "gauge",
            "Whether this node has applied the newest desired state it has seen (1) or not (0).",
            u8::from(self.in_sync()).to_string(),
        );
        metric(
            "tcpshift_store_resyncs_total",
            "counter",
            "Full reads of the desired state after the watch's revision was compacted.",
            self.resyncs.to_string(),
        );
        if let Some(at) = self.last_contact {
            let ago = SystemTime::now()
                .duration_since(at)
                .unwrap_or_default()
                .as_secs_f64();
            metric(
                "tcpshift_store_last_contact_seconds",
                "gauge",
                "Seconds since the fleet store last answered.",
                format!("{ago:.3}"),
            );
        }
        out
    }

    /// Whether the node has applied the newest desired state it has seen.
    pub fn in_sync(&self) -> bool {
        self.applied_revision == self.store_revision && self.apply_error.is_none()
    }
}

/// Watches the store and applies each revision (see the module documentation).
pub struct Follower {
    store: Store,
    options: FollowOptions,
    status: watch::Sender<FollowStatus>,
}

/// Why a watch session ended without an error.
enum Ended {
    /// The revision to resume from was compacted: read everything again.
    Compacted,
}

impl Follower {
    /// A follower of `store`.
    pub fn new(store: Store, options: FollowOptions) -> Self {
        Self {
            store,
            options,
            status: watch::Sender::new(FollowStatus::default()),
        }
    }

    /// A receiver of the follower's status (updated on every change).
    pub fn status(&self) -> watch::Receiver<FollowStatus> {
        self.status.subscribe()
    }

    /// Follows the store until the future is dropped: reads the whole desired state,
    /// applies it, then applies every later revision in order. `apply` gets each complete
    /// desired state; when it fails, the revision counts as not applied (the error is in
    /// the status) and is tried again at the next revision or progress tick.
    pub async fn run<F, E>(&self, mut apply: F)
    where
        F: FnMut(&Snapshot) -> std::result::Result<(), E>,
        E: Display,
    {
        let mut mirror: Option<RawDesired> = None;
        let mut backoff = self.options.retry_interval;
        loop {
            match self.session(&mut mirror, &mut apply).await {
                Ok(Ended::Compacted) => {
                    mirror = None;
                    self.status.send_modify(|s| s.resyncs += 1);
                    info!(store = %self.store.endpoints(), "watch revision compacted; reading the whole desired state again");
                }
                Err(e) => {
                    let was = self.status.borrow().connected;
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.last_error = Some(e.to_string());
                    });
                    if was {
                        warn!(error = %e, "store unreachable; keeping the last applied state");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.max_retry_interval);
                    continue;
                }
            }
            backoff = self.options.retry_interval;
        }
    }

    fn contact(&self) {
        self.status.send_modify(|s| {
            s.connected = true;
            s.last_contact = Some(SystemTime::now());
            s.last_error = None;
        });
    }

    /// Decodes `raw` and hands it to `apply` unless it is what was applied last.
    fn deliver<F, E>(&self, raw: &RawDesired, apply: &mut F, force: bool)
    where
        F: FnMut(&Snapshot) -> std::result::Result<(), E>,
        E: Display,
    {
        let snapshot = match raw.decode(self.store.layout()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "desired state not applied");
                self.status
                    .send_modify(|s| s.apply_error = Some(e.to_string()));
                return;
            }
        };
        self.status.send_modify(|s| {
            s.store_revision = snapshot.revision;
            s.store_generation = snapshot.generation;
        });
        let current = self.status.borrow().clone();
        if !force
            && current.applied_revision == snapshot.revision
            && current.applied_seed == snapshot.seed
            && current.apply_error.is_none()
        {
            return;
        }
        let started = Instant::now();
        match apply(&snapshot) {
            Ok(()) => {
                info!(
                    revision = snapshot.revision,
                    generation = snapshot.generation,
                    services = snapshot.state.len(),
                    took_ms = %format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0),
                    "desired state applied"
                );
                self.status.send_modify(|s| {
                    s.applied_revision = snapshot.revision;
                    s.applied_generation = snapshot.generation;
                    s.applied_seed = snapshot.seed;
                    s.apply_error = None;
                });
            }
            Err(e) => {
                warn!(revision = snapshot.revision, error = %e, "desired state not applied");
                self.status.send_modify(|s| {
                    s.apply_error = Some(format!("revision {}: {e}", snapshot.revision));
                });
            }
        }
    }

    async fn session<F, E>(&self, mirror: &mut Option<RawDesired>, apply: &mut F) -> Result<Ended>
    where
        F: FnMut(&Snapshot) -> std::result::Result<(), E>,
        E: Display,
    {
        let raw = match mirror {
            Some(raw) => raw,
            None => {
                let raw = self.store.load_raw().await?;
                self.contact();
                self.deliver(&raw, apply, true);
                mirror.insert(raw)
            }
        };
        let layout: &Layout = self.store.layout();
        let mut client = self.store.client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(raw.read_revision + 1)
            .with_progress_notify();
        let stream = self
            .store
            .call(
                "watching the desired state",
                client.watch(layout.desired_prefix(), Some(options)),
            )
            .await?;
        let (mut requests, mut responses) = stream.split();
        let mut ticker = tokio::time::interval(self.options.progress_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_answer = Instant::now();
        loop {
            tokio::select! {
                message = responses.message() => {
                    let response = message.map_err(|error| StoreError::Etcd {
                        endpoints: self.store.endpoints().to_string(),
                        what: "watching the desired state".into(),
                        error,
                    })?;
                    let Some(response) = response else {
                        return Err(StoreError::Timeout {
                            endpoints: self.store.endpoints().to_string(),
                            what: "watching the desired state (the stream ended)".into(),
                            timeout: self.options.progress_interval,
                        });
                    };
                    last_answer = Instant::now();
                    self.contact();
                    if response.canceled() {
                        if response.compact_revision() > 0 {
                            return Ok(Ended::Compacted);
                        }
                        return Err(StoreError::Timeout {
                            endpoints: self.store.endpoints().to_string(),
                            what: format!("watching the desired state (canceled: {})", response.cancel_reason()),
                            timeout: self.options.progress_interval,
                        });
                    }
                    let events = response.events();
                    if events.is_empty() {
                        // A progress report: every event up to this revision has been sent.
                        if !response.created()
                            && let Some(h) = response.header()
                        {
                            raw.read_revision = raw.read_revision.max(h.revision());
                        }
                        continue;
                    }
                    // Gather the events of each revision; apply once per revision.
                    let mut i = 0;
                    while i < events.len() {
                        let revision = events[i].kv().map_or(0, |kv| kv.mod_revision());
                        let mut touched = false;
                        while i < events.len()
                            && events[i].kv().map_or(0, |kv| kv.mod_revision()) == revision
                        {
                            if let Some(kv) = events[i].kv() {
                                let key = String::from_utf8_lossy(kv.key()).into_owned();
                                touched |= matches!(
                                    layout.classify(&key),
                                    Some(DesiredKey::Meta | DesiredKey::Seed)
                                );
                                match events[i].event_type() {
                                    EventType::Put => {
                                        raw.kvs.insert(key, (kv.value().to_vec(), kv.mod_revision()));
                                    }
                                    EventType::Delete => {
                                        raw.kvs.remove(&key);
                                    }
                                }
                            }
                            i += 1;
                        }
                        raw.read_revision = raw.read_revision.max(revision);
                        if touched {
                            self.deliver(raw, apply, false);
                        }
                    }
                }
                _ = ticker.tick() => {
                    if last_answer.elapsed() > self.options.progress_interval * 2 {
                        return Err(StoreError::Timeout {
                            endpoints: self.store.endpoints().to_string(),
                            what: "watching the desired state".into(),
                            timeout: self.options.progress_interval * 2,
                        });
                    }
                    if self.status.borrow().apply_error.is_some() {
                        // A failed apply: try the same state again.
                        self.deliver(raw, apply, false);
                    }
                    self.store
                        .call("asking for watch progress", requests.request_progress())
                        .await?;
                }
            }
        }
    }
}

/// What [`apply_to_state`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Services deleted because the store no longer has them.
    pub deleted: Vec<String>,
    /// What happened to each of the store's services.
    pub changed: Vec<(String, crate::model::Change)>,
}

/// The apply step tcpshiftd uses: makes the kernel of `state` hold `snapshot`'s services
/// (the services the store no longer has are deleted first, so that a listen address can
/// move from one service to another; then every service is created or changed in one
/// [`State::apply_with`], which checks everything before writing).
///
/// The fleet's hash seed ([`Snapshot::seed`]), when the store has one, becomes the
/// kernel's hash seed ([`State::set_hash_seed`]) first, so that a 4-tuple maps to the same
/// subset on every node.
pub fn apply_to_state(
    state: &mut State,
    snapshot: &Snapshot,
) -> std::result::Result<Applied, StateError> {
    if let Some(seed) = snapshot.seed {
        state.set_hash_seed(seed)?;
    }
    let deleted =
        state.delete_with(|current| Ok::<_, StateError>(snapshot.state.extra_in(current)))?;
    let changed = state.apply_with(|_| Ok::<_, StateError>(snapshot.state.to_change()))?;
    Ok(Applied { deleted, changed })
}
