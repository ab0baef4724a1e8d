//! The runtime record of a tcpshiftd that follows a store: `/run/tcpshift/store/INODE.json`
//! for the network namespace of inode INODE. tcpshiftctl reads it to show the follower's
//! state in `status` and to refuse a local change that would silently diverge from the
//! fleet (`--local` overrides). tcpshiftd writes it when it starts following and on every
//! change of its [`FollowStatus`], and removes it when it exits cleanly; a record whose
//! tcpshiftd no longer runs is ignored.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::FollowStatus;

/// Where the records live.
pub const RUNTIME_DIR: &str = "/run/tcpshift/store";

/// What a following tcpshiftd records about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Following {
    /// The store URL it follows (as given, without credentials: those are in options).
    pub store: String,
    /// Its node name.
    pub node: String,
    /// Its pid.
    pub pid: u32,
    /// Whether connected, the applied revision and so on (as JSON).
    pub status: serde_json::Value,
}

impl Following {
    /// A record for this process.
    pub fn new(store: &str, node: &str, status: &FollowStatus) -> Self {
        Self {
            store: store.to_string(),
            node: node.to_string(),
            pid: std::process::id(),
            status: serde_json::to_value(status).unwrap_or_default(),
        }
    }

    /// The record's path for the network namespace of inode `netns_inode`.
    pub fn path(netns_inode: u64) -> PathBuf {
        Path::new(RUNTIME_DIR).join(format!("{netns_inode}.json"))
    }

    /// Writes the record (atomically: a temporary file renamed over it).
    pub fn write(&self, netns_inode: u64) -> io::Result<()> {
        let path = Self::path(netns_inode);
        std::fs::create_dir_all(RUNTIME_DIR)?;
        let tmp = path.with_extension(format!("json.{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).unwrap_or_default())?;
        std::fs::rename(&tmp, &path)
    }

    /// Reads the record of the namespace, if there is one and the tcpshiftd that wrote it
    /// still runs (an unreadable record, or one left by a tcpshiftd that was killed, counts
    /// as none: a namespace's inode can be reused).
    pub fn read(netns_inode: u64) -> Option<Self> {
        let text = std::fs::read(Self::path(netns_inode)).ok()?;
        let record: Self = serde_json::from_slice(&text).ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", record.pid)).ok()?;
        (comm.trim_end() == "tcpshiftd").then_some(record)
    }

    /// Removes the record of the namespace.
    pub fn remove(netns_inode: u64) {
        let _ = std::fs::remove_file(Self::path(netns_inode));
    }
}
