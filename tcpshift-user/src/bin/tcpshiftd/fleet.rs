//! `--store`: following the fleet's desired state in etcd.
//!
//! One task connects (retrying until the store answers: a host rebooted with the store down
//! steers as soon as it does), makes sure the fleet has a hash seed (this node's own seed
//! becomes the fleet's if the store has none yet), then runs the library's
//! [`Follower`]: every revision is applied whole and in order through
//! [`apply_to_state`], the one apply path. While the store is unreachable nothing is
//! applied or reset: the kernel keeps steering with the last state (fail static), and the
//! status says so. A second task writes this node's report under a lease and the runtime
//! record tcpshiftctl reads ([`Following`]).

use std::time::Duration;

use anyhow::{Context, Result};
use tcpshift::{
    netns::Netns,
    state::State,
    store::{
        FollowOptions, FollowStatus, Follower, Following, NodeReport, Reporter, Store,
        StoreOptions, apply_to_state,
    },
};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Lease of the node report: a node that dies disappears from `status` after this long.
const REPORT_TTL: Duration = Duration::from_secs(10);
/// How often the node report is written again without a change (its observed split moves).
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// First wait between connection attempts (doubles up to [`MAX_RETRY`]).
const RETRY: Duration = Duration::from_millis(200);
/// Longest wait between connection attempts.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// What the rest of tcpshiftd needs to know about the fleet.
#[derive(Clone)]
pub struct Fleet {
    /// The node name.
    pub node: String,
    /// The follower's status, updated on every change.
    pub status: watch::Receiver<FollowStatus>,
}

/// Starts the fleet thread, before tcpshiftd enters its network namespace: the thread stays
/// in the namespace tcpshiftd was started in, so the store is reached from there (with
/// `--netns`, the host's network, not the served namespace's). It waits for
/// [`Starter::go`] (sent once tcpshift is installed in the served namespace), then follows.
pub fn start(options: StoreOptions, node: String) -> Result<(Fleet, Starter)> {
    let (tx, rx) = watch::channel(FollowStatus::default());
    let (go, wait) = std::sync::mpsc::channel::<Netns>();
    let thread_node = node.clone();
    std::thread::Builder::new()
        .name("fleet".into())
        .spawn(move || {
            let Ok(netns) = wait.recv() else { return };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    error!("cannot start the fleet store's runtime: {e}");
                    return;
                }
            };
            runtime.block_on(async move {
                let (apply, report, rollouts) = match (
                    State::open(&netns),
                    State::open(&netns),
                    State::open(&netns),
                ) {
                    (Ok(a), Ok(r), Ok(o)) => (a, r, o),
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                        error!("the fleet store's follower cannot open the pinned state: {e}");
                        return;
                    }
                };
                let url = options.url.to_string();
                follow(
                    options,
                    apply,
                    tx,
                    thread_node,
                    url,
                    netns.inode(),
                    [report, rollouts],
                )
                .await;
            });
        })
        .context("cannot start the fleet store's thread")?;
    Ok((Fleet { node, status: rx }, Starter(go)))
}

/// Lets the fleet thread begin (see [`start`]).
pub struct Starter(std::sync::mpsc::Sender<Netns>);

impl Starter {
    /// Begins following, on the pinned state of `netns` (tcpshift is installed there).
    pub fn go(self, netns: Netns, url: &str, node: &str) {
        Following::new(url, node, &FollowStatus::default())
            .write(netns.inode())
            .unwrap_or_else(|e| {
                warn!(
                    "cannot write the runtime record {}: {e}",
                    Following::path(netns.inode()).display()
                )
            });
        let _ = self.0.send(netns);
    }
}

/// Connects to the store, retrying with a backoff. Each failure is published (tcpshiftd's
/// status and the runtime record `tcpshiftctl status` reads), so the host says
/// `UNREACHABLE` while the store does not answer.
async fn connect(
    options: &StoreOptions,
    seed: u32,
    tx: &watch::Sender<FollowStatus>,
    record: impl Fn(&FollowStatus),
) -> Store {
    let mut wait = RETRY;
    let mut logged = false;
    loop {
        let attempt = async {
            let store = Store::connect(options).await?;
            let seed = store.ensure_seed(seed).await?;
            Ok::<_, tcpshift::store::StoreError>((store, seed))
        };
        match attempt.await {
            Ok((store, seed)) => {
                info!(store = %store.endpoints(), seed, "connected to the fleet store");
                return store;
            }
            Err(e) => {
                if !logged {
                    warn!(error = %e, "fleet store unreachable; retrying (the kernel keeps steering as it is)");
                    logged = true;
                }
                tx.send_modify(|s| {
                    s.connected = false;
                    s.last_error = Some(e.to_string());
                });
                record(&tx.borrow());
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_RETRY);
            }
        }
    }
}

async fn follow(
    options: StoreOptions,
    mut state: State,
    tx: watch::Sender<FollowStatus>,
    node: String,
    url: String,
    netns_inode: u64,
    [report, rollouts]: [State; 2],
) {
    let seed = match state.hash_seed() {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot read the kernel's hash seed: {e}");
            0
        }
    };
    let store = connect(&options, seed, &tx, |status| {
        write_record(&url, &node, status, netns_inode)
    })
    .await;
    let follower = Follower::new(store.clone(), FollowOptions::default());
    let inner = follower.status();
    tokio::spawn(forward(inner.clone(), tx, url, node.clone(), netns_inode));
    crate::fleet_rollouts::spawn(store.clone(), node.clone(), rollouts);
    tokio::spawn(publish(store, node, inner, report));
    follower
        .run(|snapshot| {
            apply_to_state(&mut state, snapshot).map(|applied| {
                let changed: Vec<String> = applied
                    .changed
                    .iter()
                    .filter(|(_, c)| *c != tcpshift::model::Change::Unchanged)
                    .map(|(name, c)| format!("{name} {c:?}").to_lowercase())
                    .chain(applied.deleted.iter().map(|n| format!("{n} deleted")))
                    .collect();
                if !changed.is_empty() {
                    info!(
                        revision = snapshot.revision,
                        "fleet change applied: {}",
                        changed.join(", ")
                    );
                }
            })
        })
        .await;
}

/// Copies the follower's status to tcpshiftd's and to the runtime record.
async fn forward(
    mut inner: watch::Receiver<FollowStatus>,
    tx: watch::Sender<FollowStatus>,
    url: String,
    node: String,
    netns_inode: u64,
) {
    loop {
        let status = inner.borrow_and_update().clone();
        write_record(&url, &node, &status, netns_inode);
        tx.send_replace(status);
        if inner.changed().await.is_err() {
            return;
        }
    }
}

/// Writes the runtime record `tcpshiftctl status` reads (a failure is logged: the record only
/// informs).
fn write_record(url: &str, node: &str, status: &FollowStatus, netns_inode: u64) {
    if let Err(e) = Following::new(url, node, status).write(netns_inode) {
        warn!("cannot write the runtime record: {e}");
    }
}

/// Writes the node report under a lease: at each status change and every [`REPORT_EVERY`].
async fn publish(
    store: Store,
    node: String,
    mut status: watch::Receiver<FollowStatus>,
    state: State,
) {
    let reporter = loop {
        match Reporter::start(&store, &node, REPORT_TTL).await {
            Ok(r) => break r,
            Err(e) => {
                warn!(error = %e, "cannot start the node report; retrying");
                tokio::time::sleep(MAX_RETRY).await;
            }
        }
    };
    let mut failing = false;
    loop {
        let follow = status.borrow_and_update().clone();
        let kernel = state.status().ok();
        match reporter
            .publish(&NodeReport::new(&node, &follow, kernel.as_ref()))
            .await
        {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                warn!(error = %e, "cannot write the node report");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(REPORT_EVERY) => {}
        }
    }
}

/// Removes the runtime record (a clean exit: this namespace follows no store any more).
pub fn forget(netns_inode: u64) {
    Following::remove(netns_inode);
}
