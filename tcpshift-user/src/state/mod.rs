//! The pinned state of one network namespace — the single owner of tcpshift's BPF maps.
//!
//! Both `tcpshiftd` and `tcpshiftctl` go through [`State`]; nothing else reads or writes the
//! maps, and nothing keeps a copy of what they hold: weights, sockets and service definitions
//! live in the kernel maps, pinned under `/sys/fs/bpf/tcpshift/netns-<inode>/`:
//!
//! ```text
//! /sys/fs/bpf/tcpshift/            (0700, flock'ed while state changes)
//!   netns-4026531840/              one directory per network namespace
//!     TS_GLOBAL TS_SERVICES TS_SOCKETS TS_COUNTERS TS_META TS_SOCKTAG   maps
//!     TS_SUBSET_META               each subset's name and backend (with TS_META: definitions)
//!     TS_UDP_SOCKETS TS_UDP_COUNTERS TS_UDP_FLOWS  UDP services' sockets, counters, flows
//!     TS_LIMITS TS_LOAD            connection limits and ejections; open connections
//!     TS_ROUTES                    per-service annotations (created by the first apply)
//!     TS_OWNERS                    who may serve each subset, refusals (created on first use)
//!     TS_OWNER_RULES               explicit owner rules, of subsets with one (first use)
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
//! - `udp.rs`: UDP services' flow table settings (size at install, idle timeout) and
//!   counters ([`UdpSubsetCounters`]);
//! - `limits.rs`: connection limits and outlier ejections (`TS_LIMITS`, `TS_LOAD`):
//!   [`State::set_traffic_policies`], the outlier loop's reads and writes, [`LimitStatus`];
//! - `sockets.rs`: [`Missing`] sockets, [`State::register_socket`], listener tags;
//! - `owners.rs`: whose sockets may serve a subset (`TS_OWNERS`, `TS_OWNER_RULES`),
//!   [`State::register_owned_socket`], [`State::accept_owner`];
//! - `encode.rs`: domain types to kernel records and back (`ServiceMeta` and `SubsetMeta`,
//!   `ServiceEntry`,
//!   [`service_key`], names, annotations);
//! - `sys.rs`: the only raw `bpf()` calls (read-only maps, pinned links, program info, link
//!   update);
//! - `access.rs`: the read-only group ([`ReadGroup`], [`State::share_read_only`]) and the
//!   permission errors;
//! - `failpoints.rs` (feature `failpoints`, tests only): injected map-write failures.

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuHashMap, SockHash};
use tcpshift_common::{
    Counters, Global, LAYOUT_VERSION, MAGIC, MAX_SERVICES, MAX_SUBSETS, RECENT_SECONDS,
    ServiceEntry, ServiceKey, ServiceMeta, SubsetMeta, global_flags, map_names, slot,
};
use tracing::debug;

use crate::{
    model::{ServiceConfig, ServiceView, SubsetConfig},
    netns::Netns,
};

mod access;
mod commit;
mod encode;
mod error;
mod guard;
mod lifecycle;
mod limits;
mod lock;
mod owners;
mod plan;
mod rollouts;
mod sockets;
mod status;
mod sys;
mod udp;

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

pub use access::{DEFAULT_READ_GROUP, ReadGroup};
pub use encode::{MAX_ANNOTATION, service_key, service_key_for};
pub use error::StateError;
pub use lifecycle::{Installed, ProgramChange, ProgramRef, Upgrade};
pub use limits::{LimitStatus, OutlierService, OutlierStatus, unix_now_ms};
pub use owners::{HolderStatus, OwnerCheck, OwnerStatus, SocketHolder, user_name};
pub(crate) use plan::check_service;
pub use rollouts::{HistoryEntry, MAX_HISTORY, RolloutRecord};
pub use sockets::Missing;
pub use status::{CounterStatus, ServiceStatus, Status, SubsetStatus};
pub use udp::{UdpSubsetCounters, set_flow_table_size};

use encode::*;
use error::*;
use sys::*;

/// Opens the pinned BPF map at `path` read-only (`BPF_OBJ_GET` with `BPF_F_RDONLY`: read
/// permission on the pinned file is enough, and the descriptor cannot update the map). A pinned
/// program or link refuses the flag with `EINVAL`. For tools that read what the kernel reports
/// about a map (its `/proc/self/fdinfo`), such as the benchmark's memory accounting.
pub fn open_pinned_read_only(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    sys::obj_get_read_only(path)
}

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
    sockets: SockHash<MapData, u32>,
    /// `TS_COUNTERS`: one value per slot, shared by all CPUs.
    counters: HashMap<MapData, u32, Counters>,
    meta: HashMap<MapData, u32, ServiceMeta>,
    /// `TS_SUBSET_META`: the subsets of the definitions in `meta`, by slot.
    subset_meta: HashMap<MapData, u32, SubsetMeta>,
    /// `TS_SOCKTAG`, kept untyped: its fd is also handed to sock_diag.
    socktag: Map,
    /// `TS_UDP_SOCKETS`.
    udp_sockets: SockHash<MapData, u32>,
    /// `TS_UDP_COUNTERS`.
    udp_counters: PerCpuHashMap<MapData, u32, tcpshift_common::UdpCounters>,
}

fn open_map<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &str) -> Result<T> {
    open_map_as(dir, name, false)
}

/// Opens the pinned map `name` of `dir`, read-only when `read_only` (`BPF_F_RDONLY`).
fn open_map_as<T: TryFrom<Map, Error = MapError>>(
    dir: &Path,
    name: &str,
    read_only: bool,
) -> Result<T> {
    let path = dir.join(name);
    let data = open_map_data(&path, read_only)?;
    let map = Map::from_map_data(data).map_err(map_err(format!("map {}", path.display())))?;
    T::try_from(map).map_err(|_| StateError::Layout {
        dir: dir.to_path_buf(),
        found: 0,
        expected: LAYOUT_VERSION,
    })
}

/// The pinned map at `path`: read-write (aya's `from_pin`), or read-only through
/// `BPF_OBJ_GET` with `BPF_F_RDONLY` (`sys.rs`), which a member of the read group may do.
fn open_map_data(path: &Path, read_only: bool) -> Result<MapData> {
    if !read_only {
        return MapData::from_pin(path).map_err(|e| pin_error(e, path));
    }
    let fd = obj_get_read_only(path).map_err(|e| {
        if let Some(refused) = access::refusal(&e, path, true) {
            refused
        } else if e.kind() == io::ErrorKind::NotFound {
            StateError::NotInstalled {
                dir: path.parent().unwrap_or(path).to_path_buf(),
            }
        } else {
            StateError::Io {
                what: "cannot open pinned map",
                path: path.to_path_buf(),
                error: e,
            }
        }
    })?;
    MapData::from_fd(fd).map_err(map_err(format!(
        "cannot open pinned map {}",
        path.display()
    )))
}

/// Opens `TS_SOCKTAG` as an untyped map (checked to be socket storage).
fn open_socktag(dir: &Path, read_only: bool) -> Result<Map> {
    let path = dir.join(map_names::SOCKTAG);
    let data = open_map_data(&path, read_only)?;
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
    /// Opened with [`State::open_read_only`]: every map fd is read-only and changes are
    /// refused before they start.
    read_only: bool,
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

    /// Opens the existing state of `netns` for reading only (`status`, `top`, `metrics`,
    /// `get`): every map is opened with `BPF_F_RDONLY`, which needs only read permission on
    /// the pinned files, so members of the read group can (see [`ReadGroup`]). Every change
    /// through the returned state is refused.
    pub fn open_read_only(netns: &Netns) -> Result<Self> {
        let dir = state_dir(netns);
        match fs::metadata(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotInstalled { dir });
            }
            Err(e) => {
                return Err(
                    access::refusal(&e, &dir, true).unwrap_or_else(|| StateError::Io {
                        what: "cannot read",
                        path: dir.clone(),
                        error: e,
                    }),
                );
            }
        }
        // The link opens only read-write: a reader that may not cannot tell a stale state
        // (its namespace gone) from a live one, and shows it as it is.
        if let Ok(ino) = link_netns(&dir.join(LINK))
            && u64::from(ino) != netns.inode()
        {
            return Err(StateError::Stale { dir });
        }
        Self::open_dir_as(dir, netns, true)
    }

    /// Whether this state was opened read-only ([`State::open_read_only`]).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn open_dir(dir: PathBuf, netns: &Netns) -> Result<Self> {
        Self::open_dir_as(dir, netns, false)
    }

    fn open_dir_as(dir: PathBuf, netns: &Netns, read_only: bool) -> Result<Self> {
        let global: Array<MapData, Global> = open_map_as(&dir, map_names::GLOBAL, read_only)?;
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
            services: open_map_as(&dir, map_names::SERVICES, read_only)?,
            sockets: open_map_as(&dir, map_names::SOCKETS, read_only)?,
            counters: open_map_as(&dir, map_names::COUNTERS, read_only)?,
            meta: open_map_as(&dir, map_names::META, read_only)?,
            subset_meta: open_map_as(&dir, map_names::SUBSET_META, read_only)?,
            socktag: open_socktag(&dir, read_only)?,
            udp_sockets: open_map_as(&dir, map_names::UDP_SOCKETS, read_only)?,
            udp_counters: open_map_as(&dir, map_names::UDP_COUNTERS, read_only)?,
        };
        debug!(dir = %dir.display(), read_only, "opened pinned state");
        Ok(Self {
            dir,
            netns_inode: netns.inode(),
            maps,
            read_only,
        })
    }

    /// Opens a map of this state created on first use (`TS_ROUTES`, `TS_OWNERS`,
    /// `TS_ROLLOUTS`), read-only when the state is.
    fn open_pinned<T: TryFrom<Map, Error = MapError>>(&self, name: &str) -> Result<T> {
        open_map_as(&self.dir, name, self.read_only)
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

    /// Every service's definition (`TS_META` with its subsets' `TS_SUBSET_META`), by id,
    /// sorted by name.
    fn all_meta(&self) -> Result<Vec<(u32, Definition)>> {
        let mut out = Vec::new();
        for item in self.maps.meta.iter() {
            let (id, service) = item.map_err(map_err("cannot read service definitions"))?;
            out.push((id, self.with_subsets(id, service)?));
        }
        out.sort_by_key(|a| a.1.name);
        Ok(out)
    }

    /// The definition of service `id`, if it has one.
    fn definition(&self, id: u32) -> Result<Option<Definition>> {
        match self.maps.meta.get(&id, 0) {
            Ok(service) => self.with_subsets(id, service).map(Some),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("cannot read a service definition")(e)),
        }
    }

    /// The record of subset `index` of service `id`, if the service has such a subset.
    fn subset_definition(&self, id: u32, index: u32) -> Result<Option<SubsetMeta>> {
        match self.maps.meta.get(&id, 0) {
            Ok(service) if index < u32::from(service.n_subsets) => {}
            Ok(_) | Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err("cannot read a service definition")(e)),
        }
        match self.maps.subset_meta.get(&slot(id, index), 0) {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("cannot read a subset definition")(e)),
        }
    }

    /// `service`'s definition: its record and those of its subsets (a missing one, as while
    /// a change writes or removes the definition, reads as [`NO_SUBSET`]).
    fn with_subsets(&self, id: u32, service: ServiceMeta) -> Result<Definition> {
        let n = usize::from(service.n_subsets).min(MAX_SUBSETS);
        let mut subsets = Vec::with_capacity(n);
        for i in 0..n as u32 {
            subsets.push(match self.maps.subset_meta.get(&slot(id, i), 0) {
                Ok(s) => s,
                Err(MapError::KeyNotFound) => NO_SUBSET,
                Err(e) => return Err(map_err("cannot read a subset definition")(e)),
            });
        }
        Ok(Definition { service, subsets })
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

    /// Slots with a registered UDP socket.
    fn live_udp_slots(&self) -> Result<HashSet<u32>> {
        self.maps
            .udp_sockets
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("cannot list registered UDP sockets"))
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

    fn views(&self, all: &[(u32, Definition)]) -> Result<Vec<ServiceView>> {
        let live = self.live_slots()?;
        let live_udp = self.live_udp_slots()?;
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
                    fail_closed: entry.flags & tcpshift_common::service_flags::FAIL_CLOSED != 0,
                    balance: balance_of(entry.mode),
                    protocol: protocol_of(meta.protocols),
                },
                // Every protocol the service steers has a socket.
                live: (0..n as u32)
                    .map(|i| {
                        let p = protocol_of(meta.protocols);
                        (!p.tcp() || live.contains(&slot(*id, i)))
                            && (!p.udp() || live_udp.contains(&slot(*id, i)))
                    })
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
        self.open_pinned(ROUTES).map(Some)
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
        self.share_new_pin(&path)?;
        open_map(&self.dir, ROUTES)
    }
}

/// Name of the userspace-only map of per-service annotations (see [`Annotation`]).
const ROUTES: &str = tcpshift_common::map_names::ROUTES;
