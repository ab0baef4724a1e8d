//! The pinned state of one network namespace — the single owner of tcpshift's BPF maps.
//!
//! Both `tcpshiftd` and `tcpshiftctl` go through [`State`]; nothing else reads or writes the
//! maps, and nothing keeps a copy of what they hold: weights, sockets and service definitions
//! live in the kernel maps, pinned under `/sys/fs/bpf/tcpshift/netns-<inode>/`:
//!
//! ```text
//! /sys/fs/bpf/tcpshift/            (0700, flock'ed while state changes)
//!   netns-4026531840/              one directory per network namespace
//!     TS_GLOBAL TS_SERVICES TS_BUCKETS TS_SOCKETS TS_COUNTERS TS_META TS_SOCKTAG   maps
//!     TS_ROUTES                    per-service annotations (created by the first apply)
//!     TS_OWNERS                    who may serve each subset, refusals (created on first use)
//!     link                         the sk_lookup link: keeps the program attached
//!     sockops-link                 the sock_ops link (cgroup v2 root): connection accounting
//! ```
//!
//! A new directory is built under a temporary name and renamed into place, so a reader sees
//! either no state or a complete one. Changes take an exclusive `flock` on the namespace's
//! state directory for their whole read-check-write ([`State::apply_with`],
//! [`State::delete_with`], [`State::set_weights`]), so concurrent `tcpshiftctl` invocations
//! never lose an update.
//!
//! Which file does what:
//!
//! - `mod.rs`: [`State`] itself — opening a namespace's state, the typed map handles and the
//!   small readers ([`State::services`], [`State::hash_seed`], debug events);
//! - `error.rs`: [`StateError`] and the helpers that turn map and file errors into it;
//! - `lock.rs`: the `flock` on the base or a namespace's state directory;
//! - `lifecycle.rs`: [`State::install`] (create or adopt), [`State::upgrade_programs`],
//!   [`State::uninstall`], sweeping the states of dead namespaces;
//! - `plan.rs`: the pure plan of a change — validation, the steps per service and their
//!   [`crate::model::Change`], and what to put back when writing stops part-way;
//! - `commit.rs`: the one commit path (prepare, commit, release; ENOMEM retry; roll-back) used
//!   by [`State::apply_with`], [`State::set_weights`] and [`State::delete_with`], and the dry
//!   run [`State::plan_with`];
//! - `status.rs`: [`Status`] and the counters behind `tcpshiftctl status`;
//! - `sockets.rs`: [`Missing`] sockets, [`State::register_socket`], listener tags;
//! - `owners.rs`: whose sockets may serve a subset (`TS_OWNERS`),
//!   [`State::register_owned_socket`], [`State::accept_owner`];
//! - `encode.rs`: domain types to kernel records and back (`ServiceMeta`, `ServiceEntry`,
//!   [`service_key`], names, annotations);
//! - `sys.rs`: the only raw `bpf()` calls (pinned links, program info, link update);
//! - `failpoints.rs` (feature `failpoints`, tests only): injected map-write failures.

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuHashMap, SockHash};
use tcpshift_common::{
    BucketTable, Counters, Global, LAYOUT_VERSION, MAGIC, MAX_SERVICES, MAX_SUBSETS,
    RECENT_SECONDS, ServiceEntry, ServiceKey, ServiceMeta, global_flags, map_names, slot,
};
use tracing::debug;

use crate::{
    model::{ServiceConfig, ServiceView, SubsetConfig},
    netns::Netns,
};

mod commit;
mod encode;
mod error;
mod guard;
mod lifecycle;
mod lock;
mod owners;
mod plan;
mod rollouts;
mod sockets;
mod status;
mod sys;

#[cfg(feature = "failpoints")]
pub mod failpoints;
#[cfg(not(feature = "failpoints"))]
mod failpoints {
    //! Without the `failpoints` feature the commit path's failpoints cost nothing.

    /// Never fails.
    #[inline(always)]
    pub(super) fn check(_point: &str) -> Result<(), aya::maps::MapError> {
        Ok(())
    }
}

pub use encode::{MAX_ANNOTATION, service_key};
pub use error::StateError;
pub use lifecycle::{Installed, ProgramChange, ProgramRef, Upgrade};
pub use owners::{HolderStatus, OwnerCheck, OwnerStatus, SocketHolder, user_name};
pub use rollouts::{HistoryEntry, MAX_HISTORY, RolloutRecord};
pub use sockets::Missing;
pub use status::{CounterStatus, ServiceStatus, Status, SubsetStatus};

use encode::*;
use error::*;
use sys::*;

/// Directory under bpffs holding one state directory per network namespace.
pub const BASE_DIR: &str = "/sys/fs/bpf/tcpshift";
/// Name of the pinned sk_lookup link inside a state directory.
const LINK: &str = "link";
/// Name of the pinned sock_ops link (attached to the cgroup v2 root) inside a state directory.
pub const SOCKOPS_LINK: &str = "sockops-link";
/// The observed share of new connections in `status` covers this many seconds (the current one
/// included), from the kernel's per-second counts.
pub const OBSERVED_WINDOW_SECS: u32 = 10;
const _: () = assert!(OBSERVED_WINDOW_SECS as usize <= RECENT_SECONDS);

/// The state directory of a namespace.
pub fn state_dir(netns: &Netns) -> PathBuf {
    Path::new(BASE_DIR).join(format!("netns-{}", netns.inode()))
}

/// Typed handles on the pinned maps.
struct Maps {
    global: Array<MapData, Global>,
    services: HashMap<MapData, ServiceKey, ServiceEntry>,
    buckets: HashMap<MapData, u32, BucketTable>,
    sockets: SockHash<MapData, u32>,
    counters: PerCpuHashMap<MapData, u32, Counters>,
    meta: HashMap<MapData, u32, ServiceMeta>,
    /// `TS_SOCKTAG`, kept untyped: its fd is also handed to sock_diag.
    socktag: Map,
}

fn open_map<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| pin_error(e, &path))?;
    let map = Map::from_map_data(data).map_err(map_err(format!("map {}", path.display())))?;
    T::try_from(map).map_err(|_| StateError::Layout {
        dir: dir.to_path_buf(),
        found: 0,
        expected: LAYOUT_VERSION,
    })
}

/// Opens `TS_SOCKTAG` as an untyped map (checked to be socket storage).
fn open_socktag(dir: &Path) -> Result<Map> {
    let path = dir.join(map_names::SOCKTAG);
    let data = MapData::from_pin(&path).map_err(|e| pin_error(e, &path))?;
    match Map::from_map_data(data).map_err(map_err(format!("map {}", path.display())))? {
        m @ Map::SkStorage(_) => Ok(m),
        _ => Err(StateError::Layout {
            dir: dir.to_path_buf(),
            found: 0,
            expected: LAYOUT_VERSION,
        }),
    }
}

/// The pinned state of one network namespace.
pub struct State {
    dir: PathBuf,
    netns_inode: u64,
    maps: Maps,
}

impl State {
    /// Opens the existing state of `netns` (the CLI's entry point). Never creates anything.
    pub fn open(netns: &Netns) -> Result<Self> {
        let dir = state_dir(netns);
        match fs::metadata(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotInstalled { dir });
            }
            Err(e) => return Err(io_err("cannot read", &dir)(e)),
        }
        // A namespace's inode can be reused once it is gone: the state there then belongs to
        // the dead namespace (its link is detached) and changing it would steer nothing.
        if let Ok(ino) = link_netns(&dir.join(LINK))
            && u64::from(ino) != netns.inode()
        {
            return Err(StateError::Stale { dir });
        }
        Self::open_dir(dir, netns)
    }

    fn open_dir(dir: PathBuf, netns: &Netns) -> Result<Self> {
        let global: Array<MapData, Global> = open_map(&dir, map_names::GLOBAL)?;
        let g = global
            .get(&0, 0)
            .map_err(map_err("cannot read the global settings"))?;
        if g.magic != MAGIC || g.layout_version != LAYOUT_VERSION {
            return Err(StateError::Layout {
                dir,
                found: g.layout_version,
                expected: LAYOUT_VERSION,
            });
        }
        let maps = Maps {
            global,
            services: open_map(&dir, map_names::SERVICES)?,
            buckets: open_map(&dir, map_names::BUCKETS)?,
            sockets: open_map(&dir, map_names::SOCKETS)?,
            counters: open_map(&dir, map_names::COUNTERS)?,
            meta: open_map(&dir, map_names::META)?,
            socktag: open_socktag(&dir)?,
        };
        debug!(dir = %dir.display(), "opened pinned state");
        Ok(Self {
            dir,
            netns_inode: netns.inode(),
            maps,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the state directory still exists (it disappears on `tcpshiftctl uninstall`).
    pub fn is_installed(&self) -> bool {
        self.dir.join(LINK).exists()
    }

    /// The hash seed chosen at install time.
    pub fn hash_seed(&self) -> Result<u32> {
        Ok(self
            .maps
            .global
            .get(&0, 0)
            .map_err(map_err("cannot read the global settings"))?
            .hash_seed)
    }

    fn all_meta(&self) -> Result<Vec<(u32, ServiceMeta)>> {
        let mut out = Vec::new();
        for item in self.maps.meta.iter() {
            out.push(item.map_err(map_err("cannot read service definitions"))?);
        }
        out.sort_by_key(|a| a.1.name);
        Ok(out)
    }

    fn entry(&self, meta: &ServiceMeta) -> Result<Option<ServiceEntry>> {
        match self.maps.services.get(&meta.key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("cannot read a service entry")(e)),
        }
    }

    fn live_slots(&self) -> Result<HashSet<u32>> {
        self.maps
            .sockets
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("cannot list registered sockets"))
    }

    /// Id of the attached sk_lookup program (e.g. to read its aya-log events).
    pub fn program_id(&self) -> Result<u32> {
        let path = self.dir.join(LINK);
        link_program(&path).map_err(|e| StateError::Io {
            what: "cannot read the link",
            path,
            error: e,
        })
    }

    /// Sets the hash seed new connections are hashed with (`Global::hash_seed`), e.g. the
    /// fleet's seed from the store, so that a 4-tuple maps to the same subset on every node.
    /// Connections already open are not hashed again: changing it moves only new ones.
    pub fn set_hash_seed(&mut self, seed: u32) -> Result<()> {
        let _lock = self.lock()?;
        let mut g = self
            .maps
            .global
            .get(&0, 0)
            .map_err(map_err("cannot read the global settings"))?;
        if g.hash_seed == seed {
            return Ok(());
        }
        g.hash_seed = seed;
        self.maps
            .global
            .set(0, g, 0)
            .map_err(map_err("cannot write the global settings"))
    }

    /// Turns the programs' debug events on or off (`Global::flags`).
    pub fn set_debug_events(&mut self, on: bool) -> Result<()> {
        let _lock = self.lock()?;
        let mut g = self
            .maps
            .global
            .get(&0, 0)
            .map_err(map_err("cannot read the global settings"))?;
        if on {
            g.flags |= global_flags::LOG_DEBUG;
        } else {
            g.flags &= !global_flags::LOG_DEBUG;
        }
        self.maps
            .global
            .set(0, g, 0)
            .map_err(map_err("cannot write the global settings"))
    }

    /// Turns the kernel's failure signals on (the default) or off for connections opened from
    /// now on (`global_flags::NO_SIGNALS`). Off is a measurement switch for the benchmark
    /// (`tcpshiftd --measure-without-signals`), not an operating mode.
    pub fn set_signals(&mut self, on: bool) -> Result<()> {
        let _lock = self.lock()?;
        let mut g = self
            .maps
            .global
            .get(&0, 0)
            .map_err(map_err("cannot read the global settings"))?;
        let flags = if on {
            g.flags & !global_flags::NO_SIGNALS
        } else {
            g.flags | global_flags::NO_SIGNALS
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

    /// Every service as the kernel maps hold it, sorted by name: definition, current weights,
    /// which subsets have a live socket, and the annotation stored with it.
    pub fn services(&self) -> Result<Vec<ServiceView>> {
        self.views(&self.all_meta()?)
    }

    fn views(&self, all: &[(u32, ServiceMeta)]) -> Result<Vec<ServiceView>> {
        let live = self.live_slots()?;
        let routes = self.open_routes()?;
        let mut out = Vec::with_capacity(all.len());
        for (id, meta) in all {
            let entry = self.entry(meta)?.unwrap_or_default();
            let n = usize::from(meta.n_subsets).min(MAX_SUBSETS);
            let subsets = meta.subsets[..n]
                .iter()
                .zip(entry.weights)
                .map(|(s, weight)| SubsetConfig {
                    name: name_str(&s.name),
                    addr: subset_addr(s),
                    weight,
                    owner: Default::default(),
                })
                .collect();
            out.push(ServiceView {
                id: *id,
                config: ServiceConfig {
                    name: name_str(&meta.name),
                    listen: listen_of(meta),
                    subsets,
                    take_over: false,
                },
                live: (0..n as u32)
                    .map(|i| live.contains(&slot(*id, i)))
                    .collect(),
                annotation: match &routes {
                    Some(r) => read_annotation(r, *id)?,
                    None => None,
                },
            });
        }
        self.fill_owner_rules(&mut out)?;
        Ok(out)
    }

    /// `TS_ROUTES`, if it was created.
    fn open_routes(&self) -> Result<Option<RoutesMap>> {
        let path = self.dir.join(ROUTES);
        if !path.exists() {
            return Ok(None);
        }
        open_map(&self.dir, ROUTES).map(Some)
    }

    /// Creates and pins `TS_ROUTES` (a userspace-only map, created on first use: states
    /// created before it existed get it then).
    fn create_routes(&mut self) -> Result<RoutesMap> {
        let map: RoutesMap = HashMap::create(MAX_SERVICES, BPF_F_NO_PREALLOC)
            .map_err(map_err("cannot create the annotation map"))?;
        let path = self.dir.join(ROUTES);
        map.pin(&path).map_err(|e| StateError::Program {
            what: format!("cannot pin {}", path.display()),
            error: Box::new(e),
        })?;
        open_map(&self.dir, ROUTES)
    }
}

/// Name of the userspace-only map of per-service annotations (see [`Annotation`]).
const ROUTES: &str = tcpshift_common::map_names::ROUTES;
