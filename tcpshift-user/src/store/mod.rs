//! The fleet store: many hosts share one desired state through etcd.
//!
//! Steering stays in each host's kernel ([`crate::state`]); only the desired state is
//! shared. This room sits above [`crate::model`] and beside the parsers and the state
//! owner:
//!
//! - [`url`]: `etcd://HOST:PORT[,HOST:PORT...]` and the TLS / authentication options
//!   ([`StoreOptions`]);
//! - [`layout`]: the keys under the prefix and the JSON records stored there;
//! - [`desired`]: the fleet's complete desired state ([`DesiredState`]), its validation (the
//!   same rules and messages as a local apply) and the edits `apply`, `delete` and
//!   `set-weight` make to it;
//! - [`client`]: connecting, [`Store::load`], [`Store::commit`] (one transaction, compare
//!   and swap on the revision) and [`Store::update`] (read-modify-write, retried);
//! - [`follow`]: [`Follower`], which watches the store and hands each revision's complete
//!   desired state to an apply step, failing static while the store is unreachable;
//! - [`report`]: node reports written under a lease ([`Reporter`]) and read back
//!   ([`Store::node_reports`]);
//! - [`rollouts`]: fleet rollouts' records, the nodes' signals and the driver election
//!   (driven by [`crate::rollout::fleet`]).
//!
//! See [`layout`] for the key layout and what each key holds.

pub mod args;
pub mod client;
pub mod desired;
pub mod follow;
pub mod layout;
pub mod report;
pub mod rollouts;
pub mod runtime;
pub mod url;

pub use args::{StoreArgs, host_name};
pub use client::{Commit, Snapshot, Store};
pub use desired::{DesiredState, FleetService, Reweighted};
pub use follow::{Applied, FollowOptions, FollowStatus, Follower, apply_to_state};
pub use layout::Layout;
pub use report::{NodeReport, NodeView, Reporter, ServiceReport, SubsetReport};
pub use rollouts::{NodeSignals, StoredRollout};
pub use runtime::Following;
pub use url::{StoreOptions, StoreUrl};

use crate::state::StateError;

/// Errors of the fleet store. Each message says what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL or an option is malformed.
    #[error("invalid store {what}: {reason}")]
    Invalid {
        /// What was given (`URL "…"`, `option --store-cert`, …).
        what: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A file named by an option cannot be read.
    #[error("cannot read {what} {path}: {error}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The etcd client refused the options or could not reach the store.
    #[error(
        "cannot connect to the store at {endpoints}: {}; check that etcd runs there and the \
         TLS options (--store-ca, --store-cert, --store-key) and user options \
         (--store-user, --store-password-file) match it",
        causes(.error)
    )]
    Connect {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The error.
        error: etcd_client::Error,
    },
    /// An etcd request failed.
    #[error("store at {endpoints}: {what}: {}", causes(.error))]
    Etcd {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What was being done.
        what: String,
        /// The error.
        error: etcd_client::Error,
    },
    /// An etcd request did not answer in time.
    #[error(
        "store at {endpoints}: {what}: no answer within {timeout:?}; is a majority of the etcd \
         members running and reachable?"
    )]
    Timeout {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What was being done.
        what: String,
        /// How long we waited.
        timeout: std::time::Duration,
    },
    /// A key in the store holds something this tcpshift cannot read.
    #[error(
        "the store's key {key} holds an unreadable record: {reason}; fix or delete it (etcdctl \
         del {key}) and apply the service again"
    )]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The desired state breaks a rule (same messages as a local apply).
    #[error(transparent)]
    Rejected(#[from] StateError),
    /// Another writer committed first too many times in a row.
    #[error(
        "the store's desired state changed under this update {attempts} times in a row (other \
         writers); try again"
    )]
    Contended {
        /// How many attempts were made.
        attempts: u32,
    },
}

/// `error` and its causes, `: `-separated, each said once (the etcd client's transport
/// errors say only "transport error" at the top; the reason, e.g. an unknown certificate
/// issuer, is in their sources).
fn causes(error: &etcd_client::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

/// Result of the store's operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
