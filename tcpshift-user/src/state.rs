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
//!     link                         the sk_lookup link: keeps the program attached
//!     sockops-link                 the sock_ops link (cgroup v2 root): connection accounting
//! ```
//!
//! A new directory is built under a temporary name and renamed into place, so a reader sees
//! either no state or a complete one. Changes take an exclusive `flock` on the namespace's
//! state directory for their whole read-check-write ([`State::apply_with`],
//! [`State::delete_with`], [`State::set_weights`]), so concurrent `tcpshiftctl` invocations
//! never lose an update.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs::{self, File},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuHashMap, PerCpuValues, SkStorage, SockHash,
    },
    programs::{CgroupAttachMode, Program, ProgramError, SkLookup, SockOps, links::FdLink},
};
use serde::Serialize;
use tcpshift_common::{
    BucketTable, Counters, Global, IPPROTO_TCP, LAYOUT_VERSION, MAGIC, MAX_LISTENER_SLOTS,
    MAX_SERVICES, MAX_SUBSETS, NO_SLOT, PROGRAM_SK_LOOKUP, PROGRAM_SOCK_OPS, RECENT_SECONDS,
    SUBSET_NAME_LEN, ServiceEntry, ServiceKey, ServiceMeta, SockTag, SubsetMeta, global_flags,
    map_names, mode, slot, slot_service, table_key, tag,
};
use tracing::{debug, info, warn};

use crate::{
    config::Config,
    model::{
        Annotation, Change, Desired, DesiredService, Listen, ServiceConfig, ServiceView,
        SubsetConfig, Weights,
    },
    netns::{self, Netns, NetnsError},
    sockdiag,
    weights::{self, WeightError},
};

/// Directory under bpffs holding one state directory per network namespace.
pub const BASE_DIR: &str = "/sys/fs/bpf/tcpshift";
/// Name of the pinned sk_lookup link inside a state directory.
const LINK: &str = "link";
/// Name of the pinned sock_ops link (attached to the cgroup v2 root) inside a state directory.
const SOCKOPS_LINK: &str = "sockops-link";
/// The observed share of new connections in `status` covers this many seconds (the current one
/// included), from the kernel's per-second counts.
pub const OBSERVED_WINDOW_SECS: u32 = 10;
const _: () = assert!(OBSERVED_WINDOW_SECS as usize <= RECENT_SECONDS);

/// Errors of the pinned state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No tcpshift state for this namespace.
    #[error(
        "tcpshift is not installed in this network namespace (no state at {dir}); start the loader first: tcpshiftd [--config FILE] (it loads the program; tcpshiftctl only changes what is loaded)"
    )]
    NotInstalled {
        /// Where the state would be.
        dir: PathBuf,
    },
    /// The state directory of this namespace's inode belongs to a namespace that is gone.
    #[error(
        "the state at {dir} belongs to a network namespace that no longer exists (this one reuses its inode), so tcpshift is not installed here; start the loader: tcpshiftd [--config FILE] (it replaces the old state)"
    )]
    Stale {
        /// The state directory.
        dir: PathBuf,
    },
    /// Not allowed to reach the state.
    #[error(
        "permission denied on {path}: tcpshift's state is root-only; run this command as root (it needs CAP_BPF and CAP_SYS_ADMIN)"
    )]
    Permission {
        /// What could not be accessed.
        path: PathBuf,
    },
    /// The pinned state was made by a tcpshift with another layout.
    #[error(
        "the state at {dir} was made by a tcpshift with {}; this tcpshift understands layout version {expected} and will not adopt it (its maps differ). Either keep running the tcpshiftd of that version, or remove the state with `tcpshiftctl uninstall` (any version's tcpshiftctl can; note the weights first with that version's `tcpshiftctl status`, and expect steering to stop until this tcpshiftd has installed itself, about a second) and start this tcpshiftd with your configuration",
        layout_name(*found)
    )]
    Layout {
        /// The state directory.
        dir: PathBuf,
        /// Version found (0 when unreadable).
        found: u32,
        /// Version this build understands.
        expected: u32,
    },
    /// A pinned object of the state is missing.
    #[error(
        "the state at {dir} is incomplete (no {missing}); remove it with `tcpshiftctl uninstall` and start tcpshiftd again"
    )]
    Incomplete {
        /// The state directory.
        dir: PathBuf,
        /// The pinned object that is missing.
        missing: &'static str,
    },
    /// Replacing the program of a pinned link failed.
    #[error(
        "cannot replace the program of the link {link}: {error}{}",
        link_update_cause(error)
    )]
    LinkUpdate {
        /// The pinned link.
        link: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// A namespace or bpffs problem.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A weight problem.
    #[error(transparent)]
    Weight(#[from] WeightError),
    /// No such service.
    #[error("no service named {name:?} (services: {known})")]
    UnknownService {
        /// Name asked for.
        name: String,
        /// Names that exist.
        known: String,
    },
    /// `--service` is needed.
    #[error("{count} services are configured ({known}); choose one with --service NAME")]
    AmbiguousService {
        /// Number of services.
        count: usize,
        /// Their names.
        known: String,
    },
    /// No service at all.
    #[error("no service is configured in this network namespace; apply a configuration first")]
    NoServices,
    /// Two services want the same listen address.
    #[error("service {name:?} wants to listen on {listen}, which service {other:?} already uses")]
    ListenConflict {
        /// The new service.
        name: String,
        /// Its listen address.
        listen: String,
        /// The service that has it.
        other: String,
    },
    /// A service definition that breaks a rule.
    #[error("service {name:?}: {reason}")]
    InvalidService {
        /// The service.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Too many services.
    #[error("{wanted} services would exceed the limit of {MAX_SERVICES} per network namespace")]
    TooManyServices {
        /// How many there would be.
        wanted: usize,
    },
    /// A BPF map operation failed.
    #[error("{what}: {error}{}", map_error_cause(error))]
    Map {
        /// What was being done.
        what: String,
        /// The aya error.
        error: MapError,
    },
    /// Loading or attaching the program failed.
    #[error("{what}: {error}")]
    Program {
        /// What was being done.
        what: String,
        /// The error.
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file operation failed.
    #[error("{what} {path}: {error}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
}

type Result<T, E = StateError> = std::result::Result<T, E>;

/// The OS error under a failed map syscall (aya's message names only the syscall).
fn map_error_cause(e: &MapError) -> String {
    match e {
        MapError::SyscallError(s) => format!(": {}", s.io_error),
        _ => String::new(),
    }
}

/// How the layout error names the version found (0: `TS_GLOBAL` unreadable or a map of
/// another type).
fn layout_name(found: u32) -> String {
    if found == 0 {
        "an unknown map layout".to_string()
    } else {
        format!("layout version {found}")
    }
}

/// What an errno of `BPF_LINK_UPDATE` means here.
fn link_update_cause(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => {
            " (the link's program changed while this one was loading: another tcpshiftd upgraded it; start again)"
        }
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
            " (the kernel cannot update this link in place; Linux >= 5.8 is needed)"
        }
        _ => "",
    }
}

fn map_err(what: impl Into<String>) -> impl FnOnce(MapError) -> StateError {
    let what = what.into();
    move |error| StateError::Map { what, error }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |error| {
        if is_unprivileged(&error) {
            StateError::Permission { path }
        } else {
            StateError::Io { what, path, error }
        }
    }
}

/// The state directory of a namespace.
pub fn state_dir(netns: &Netns) -> PathBuf {
    Path::new(BASE_DIR).join(format!("netns-{}", netns.inode()))
}

/// Whether the loader found existing state or created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// Pinned state was already there and was adopted unchanged.
    Adopted,
    /// The program was loaded, attached and pinned now.
    Created,
}

/// A loaded program, as the kernel identifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramRef {
    /// Program id (changes with every load).
    pub id: u32,
    /// The kernel's tag: a hash of the instructions (map references left out), the same for
    /// the same program.
    pub tag: [u8; 8],
}

impl std::fmt::Display for ProgramRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "id {} (tag ", self.id)?;
        for b in self.tag {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// What [`State::upgrade_programs`] did to one pinned link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramChange {
    /// The link runs this version's program already (same tag): left alone.
    Unchanged(ProgramRef),
    /// The link's program was replaced in place.
    Replaced {
        /// The program that ran before.
        old: ProgramRef,
        /// The program that runs now.
        new: ProgramRef,
    },
}

/// What [`State::upgrade_programs`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upgrade {
    /// The sk_lookup link (steering).
    pub sk_lookup: ProgramChange,
    /// The sock_ops link (connection accounting); `None` when none is pinned.
    pub sock_ops: Option<ProgramChange>,
}

/// Exclusive `flock` on a directory, released on drop.
///
/// [`Lock::take`] locks the base directory (creating, adopting and removing state);
/// [`State::lock`] locks one namespace's state directory (changing its maps), so namespaces
/// never wait for each other.
struct Lock(#[allow(dead_code)] File);

impl Lock {
    fn take() -> Result<Self> {
        Self::on(Path::new(BASE_DIR))
    }

    fn on(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StateError::NotInstalled {
                    dir: path.to_path_buf(),
                }
            } else {
                io_err("cannot open", path)(e)
            }
        })?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err("cannot lock", path)(io::Error::last_os_error()));
        }
        Ok(Self(f))
    }
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

/// A permission error seen by a caller without root: say so instead of showing errno.
fn is_unprivileged(e: &io::Error) -> bool {
    // SAFETY: geteuid has no preconditions.
    e.kind() == io::ErrorKind::PermissionDenied && unsafe { libc::geteuid() } != 0
}

fn pin_error(e: MapError, path: &Path) -> StateError {
    if let MapError::SyscallError(s) = &e {
        match s.io_error.kind() {
            io::ErrorKind::PermissionDenied if is_unprivileged(&s.io_error) => {
                return StateError::Permission {
                    path: path.to_path_buf(),
                };
            }
            io::ErrorKind::NotFound => {
                return StateError::NotInstalled {
                    dir: path.parent().unwrap_or(path).to_path_buf(),
                };
            }
            _ => {}
        }
    }
    map_err(format!("cannot open pinned map {}", path.display()))(e)
}

/// One subset as shown by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct SubsetStatus {
    /// Subset name.
    pub name: String,
    /// Backend address.
    pub backend: SocketAddr,
    /// Relative weight.
    pub weight: u32,
    /// Share of new connections the weights give it, in percent.
    pub share: f64,
    /// Whether a live listening socket is registered for it.
    pub live: bool,
    /// Share of the service's new connections steered to this subset over the last
    /// [`Status::observed_window_secs`] seconds, in percent; `None` when there were none.
    pub observed_share: Option<f64>,
    /// Counters from the data path.
    pub counters: CounterStatus,
}

/// Data-path counters of one subset (summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterStatus {
    /// New connections whose hash chose this subset.
    pub chosen: u64,
    /// New connections assigned to this subset.
    pub steered: u64,
    /// Of those, connections that had chosen another subset without a live socket.
    pub fallback_in: u64,
    /// Connections that chose this subset but were sent elsewhere (no live socket).
    pub fallback_out: u64,
    /// Connections that chose this subset while no subset of the service was alive.
    pub misses: u64,
    /// Connections established on this subset through the service address.
    pub opened: u64,
    /// Of those, connections closed.
    pub closed: u64,
    /// Of those, connections open now (`opened - closed`).
    pub active: u64,
    /// Payload bytes received from clients, closed and open connections.
    pub bytes_received: u64,
    /// Payload bytes sent to clients (acknowledged), closed and open connections.
    pub bytes_sent: u64,
    /// New connections steered here during the last [`OBSERVED_WINDOW_SECS`] seconds.
    pub steered_recent: u64,
}

/// One service as shown by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Internal id (slot base in the maps).
    pub id: u32,
    /// Where it listens: `*:PORT` or `ADDR:PORT`.
    pub listen: String,
    /// Selection mode.
    pub mode: &'static str,
    /// The subsets, in configuration order.
    pub subsets: Vec<SubsetStatus>,
}

/// The whole namespace as shown by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Inode of the network namespace.
    pub netns_inode: u64,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Id of the attached sk_lookup program, if the link is alive.
    pub program_id: Option<u32>,
    /// Id of the sock_ops program (connection accounting), if its link is pinned.
    pub accounting_program_id: Option<u32>,
    /// Seconds covered by the subsets' `observed_share`.
    pub observed_window_secs: u32,
    /// Whether the programs emit debug events (`tcpshiftd --log-level debug` running).
    pub debug_events: bool,
    /// Services, sorted by name.
    pub services: Vec<ServiceStatus>,
    /// Problems that make some numbers incomplete (e.g. open connections' bytes unavailable).
    pub warnings: Vec<String>,
}

/// A subset whose socket needs registering (see [`State::missing_sockets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// Service id.
    pub service_id: u32,
    /// Service name.
    pub service: String,
    /// Subset index.
    pub index: u32,
    /// Subset name.
    pub subset: String,
    /// Backend address.
    pub backend: SocketAddr,
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

    /// Opens the state of `netns`, or loads, attaches and pins tcpshift there when there is
    /// none (the loader's entry point). Mounts bpffs when needed.
    pub fn install(netns: &Netns, object: &[u8]) -> Result<(Self, Installed)> {
        if netns::ensure_bpffs(Path::new(netns::BPFFS))? {
            info!(path = netns::BPFFS, "mounted bpffs");
        }
        let base = Path::new(BASE_DIR);
        fs::create_dir_all(base).map_err(io_err("cannot create", base))?;
        fs::set_permissions(base, fs::Permissions::from_mode(0o700))
            .map_err(io_err("cannot set permissions of", base))?;
        let dir = state_dir(netns);
        {
            let _lock = Lock::take()?;
            sweep_dead_states(base, &dir);
            if let Some(state) = Self::adopt(&dir, netns)? {
                return Ok((state, Installed::Adopted));
            }
        }
        // Build the new state without holding the lock: the verifier takes about a second
        // and other namespaces must not wait for it.
        let tmp = base.join(format!(
            "tmp-netns-{}-{}",
            netns.inode(),
            std::process::id()
        ));
        if let Err(e) = create_pinned(&tmp, netns, object) {
            // Unpinning the link detaches the program once our fds are closed.
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let _lock = Lock::take()?;
        if let Some(state) = Self::adopt(&dir, netns)? {
            // Another loader finished first: keep its state, drop ours.
            let _ = fs::remove_dir_all(&tmp);
            return Ok((state, Installed::Adopted));
        }
        if let Err(e) = fs::rename(&tmp, &dir) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(io_err("cannot move state into place at", &dir)(e));
        }
        info!(dir = %dir.display(), netns = netns.inode(), "loaded and attached the sk_lookup program");
        Ok((Self::open_dir(dir, netns)?, Installed::Created))
    }

    /// The state of `netns` at `dir` if it is alive (its link is attached to this namespace);
    /// removes a stale one (left by a namespace that died and whose inode was reused).
    fn adopt(dir: &Path, netns: &Netns) -> Result<Option<Self>> {
        if !dir.exists() {
            return Ok(None);
        }
        match link_netns(&dir.join(LINK)) {
            Ok(ino) if u64::from(ino) == netns.inode() => {
                return Ok(Some(Self::open_dir(dir.to_path_buf(), netns)?));
            }
            Ok(ino) => {
                warn!(dir = %dir.display(), link_netns = ino, "stale state (its namespace is gone); replacing it")
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "stale state (no live link); replacing it")
            }
        }
        fs::remove_dir_all(dir).map_err(io_err("cannot remove stale state", dir))?;
        Ok(None)
    }

    /// Replaces the programs of the pinned links with `object`'s, in place, when they differ
    /// from the running ones (by the kernel's tag) or when `force` is set.
    ///
    /// The new programs are loaded against the pinned maps (weights, sockets, services,
    /// counters and the global settings stay as they are), then each link is switched to its
    /// new program with `BPF_LINK_UPDATE`: the kernel swaps one pointer in the hook's run
    /// array, so every connection is handled by either the old or the new program and none is
    /// refused. sk_lookup first, then sock_ops. The caller must have checked the layout
    /// version (every [`State`] has, in [`State::open_dir`]).
    pub fn upgrade_programs(&mut self, object: &[u8], force: bool) -> Result<Upgrade> {
        let _lock = self.lock()?;
        // aya creates (and pins) a map it does not find at its pin path: every map must be
        // there, or the new programs would work on empty maps of their own.
        for name in map_names::ALL {
            if fs::symlink_metadata(self.dir.join(name)).is_err() {
                return Err(StateError::Incomplete {
                    dir: self.dir.clone(),
                    missing: name,
                });
            }
        }
        let link_path = self.dir.join(LINK);
        let link = obj_get(&link_path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StateError::Incomplete {
                dir: self.dir.clone(),
                missing: LINK,
            },
            _ => io_err("cannot open the link", &link_path)(e),
        })?;
        let sockops_path = self.dir.join(SOCKOPS_LINK);
        let sockops_link = match obj_get(&sockops_path) {
            Ok(fd) => Some(fd),
            // Connection accounting is off (no cgroup2 at install time): nothing to replace.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("cannot open the link", &sockops_path)(e)),
        };
        let prog_err = |what: &str| {
            let what = what.to_string();
            move |e: Box<dyn std::error::Error + Send + Sync>| StateError::Program {
                what,
                error: e,
            }
        };
        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            loader.map_pin_path(name, self.dir.join(name));
        }
        let mut ebpf = loader
            .load(object)
            .map_err(|e| prog_err("cannot load the eBPF object")(Box::new(e)))?;
        // Load (verify) both programs before replacing either, so a refusal changes nothing.
        load_program(&mut ebpf, PROGRAM_SK_LOOKUP, "sk_lookup", SkLookup::load)?;
        if sockops_link.is_some() {
            load_program(&mut ebpf, PROGRAM_SOCK_OPS, "sock_ops", SockOps::load)?;
        }
        let program_fd = |name: &str| -> Result<std::os::fd::OwnedFd> {
            let program = ebpf.program(name).ok_or_else(|| missing_map(name))?;
            let fd = program
                .fd()
                .map_err(|e| prog_err("the loaded program has no fd")(Box::new(e)))?;
            fd.as_fd()
                .try_clone_to_owned()
                .map_err(|e| prog_err("cannot duplicate the program's fd")(Box::new(e)))
        };
        let new_sk_lookup = program_fd(PROGRAM_SK_LOOKUP)?;
        let new_sock_ops = match sockops_link {
            Some(_) => Some(program_fd(PROGRAM_SOCK_OPS)?),
            None => None,
        };
        let sk_lookup = replace_program(&link_path, link.as_fd(), new_sk_lookup.as_fd(), force)?;
        let sock_ops = match (&sockops_link, &new_sock_ops) {
            (Some(l), Some(p)) => {
                Some(replace_program(&sockops_path, l.as_fd(), p.as_fd(), force)?)
            }
            _ => None,
        };
        // The links hold the new programs now; the object (its fds) can go.
        drop(ebpf);
        Ok(Upgrade {
            sk_lookup,
            sock_ops,
        })
    }

    /// Locks this namespace's state against concurrent changes.
    fn lock(&self) -> Result<Lock> {
        Lock::on(&self.dir)
    }

    /// Removes everything tcpshift pinned for `netns`: the link (which detaches the program) and
    /// the maps. Returns the directory removed, or `None` when there was nothing.
    pub fn uninstall(netns: &Netns) -> Result<Option<PathBuf>> {
        let dir = state_dir(netns);
        match fs::metadata(BASE_DIR) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot read", Path::new(BASE_DIR))(e)),
        }
        let _lock = Lock::take()?;
        // Wait for a change in progress in this namespace to finish.
        let _state_lock = Lock::on(&dir).ok();
        let prefix = format!("tmp-netns-{}-", netns.inode());
        if let Ok(entries) = fs::read_dir(BASE_DIR) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(Some(dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cannot remove", &dir)(e)),
        }
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

    fn counters(&self, slot: u32) -> Result<CounterStatus> {
        let values: PerCpuValues<Counters> = match self.maps.counters.get(&slot, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(CounterStatus::default()),
            Err(e) => return Err(map_err("cannot read counters")(e)),
        };
        let now = coarse_second();
        let mut c = CounterStatus::default();
        for v in values.iter() {
            c.steered_recent += v
                .recent
                .iter()
                .filter(|r| now.wrapping_sub(r.second) < OBSERVED_WINDOW_SECS)
                .map(|r| u64::from(r.steered))
                .sum::<u64>();
            c.chosen += v.chosen;
            c.steered += v.steered;
            c.fallback_in += v.fallback_in;
            c.fallback_out += v.fallback_out;
            c.misses += v.misses;
            c.opened += v.opened;
            c.closed += v.closed;
            c.bytes_received += v.bytes_received;
            c.bytes_sent += v.bytes_sent;
        }
        c.active = c.opened.saturating_sub(c.closed);
        Ok(c)
    }

    fn all_counters(&self, slots: &[u32]) -> Result<StdHashMap<u32, CounterStatus>> {
        slots
            .iter()
            .map(|&s| self.counters(s).map(|c| (s, c)))
            .collect()
    }

    /// Counters of `slots`, with the bytes of open connections added (from sock_diag).
    ///
    /// A connection's bytes move from "open" to the counters when it closes; to count each
    /// connection exactly once the counters are read before and after the dump of open
    /// connections, and the whole is read again if a connection closed in between (its
    /// `closed` count moved, or it was seen in the middle of its close: `tag::CLOSING`).
    fn accounted(&self, slots: &[u32]) -> Result<(StdHashMap<u32, CounterStatus>, Vec<String>)> {
        let Map::SkStorage(data) = &self.maps.socktag else {
            return Ok((self.all_counters(slots)?, Vec::new()));
        };
        let map_id = data
            .info()
            .map_err(map_err("cannot read the socket tag map's id"))?
            .id();
        let mut last = None;
        for _ in 0..50 {
            let before = self.all_counters(slots)?;
            let open = match sockdiag::tagged_connections(data.fd().as_fd(), map_id) {
                Ok(open) => open,
                Err(e) => {
                    let warning = format!(
                        "bytes of open connections unavailable (sock_diag: {e}); only closed connections' bytes are counted"
                    );
                    return Ok((before, vec![warning]));
                }
            };
            let after = self.all_counters(slots)?;
            let settled = before
                .iter()
                .all(|(s, c)| after.get(s).is_some_and(|a| a.closed == c.closed))
                && !open.iter().any(|o| o.tag.kind == tag::CLOSING);
            let mut totals = after;
            for o in open.iter().filter(|o| o.tag.kind == tag::OPEN) {
                if let Some(c) = totals.get_mut(&o.tag.slot) {
                    c.bytes_received += o.bytes_received;
                    c.bytes_sent += o.bytes_sent;
                }
            }
            if settled {
                return Ok((totals, Vec::new()));
            }
            last = Some(totals);
            std::thread::yield_now();
        }
        match last {
            Some(totals) => Ok((totals, Vec::new())),
            None => Ok((self.all_counters(slots)?, Vec::new())),
        }
    }

    /// Everything `tcpshiftctl status` shows, read from the maps.
    pub fn status(&self) -> Result<Status> {
        let live = self.live_slots()?;
        let all = self.all_meta()?;
        let slots: Vec<u32> = all
            .iter()
            .flat_map(|(id, m)| (0..u32::from(m.n_subsets)).map(move |i| slot(*id, i)))
            .collect();
        let (mut counters, warnings) = self.accounted(&slots)?;
        let mut services = Vec::new();
        for (id, meta) in all {
            let entry = self.entry(&meta)?.unwrap_or_default();
            let n = usize::from(meta.n_subsets).min(MAX_SUBSETS);
            let ws = &entry.weights[..n];
            let shares = weights::shares(ws);
            let mut subsets = Vec::with_capacity(n);
            for (i, s) in meta.subsets[..n].iter().enumerate() {
                let slot = slot(id, i as u32);
                subsets.push(SubsetStatus {
                    name: name_str(&s.name),
                    backend: subset_addr(s),
                    weight: ws[i],
                    share: shares.get(i).copied().unwrap_or(0.0),
                    live: live.contains(&slot),
                    observed_share: None,
                    counters: counters.remove(&slot).unwrap_or_default(),
                });
            }
            let recent: u64 = subsets.iter().map(|s| s.counters.steered_recent).sum();
            if recent > 0 {
                for s in &mut subsets {
                    s.observed_share =
                        Some(s.counters.steered_recent as f64 * 100.0 / recent as f64);
                }
            }
            services.push(ServiceStatus {
                name: name_str(&meta.name),
                id,
                listen: listen_of(&meta).to_string(),
                mode: match entry.mode {
                    mode::HASH_SOURCE_IP => "source-ip",
                    mode::ROUND_ROBIN => "round-robin",
                    _ => "hash",
                },
                subsets,
            });
        }
        Ok(Status {
            netns_inode: self.netns_inode,
            state_dir: self.dir.clone(),
            program_id: link_program(&self.dir.join(LINK)).ok(),
            accounting_program_id: link_program(&self.dir.join(SOCKOPS_LINK)).ok(),
            observed_window_secs: OBSERVED_WINDOW_SECS,
            debug_events: self
                .maps
                .global
                .get(&0, 0)
                .map_err(map_err("cannot read the global settings"))?
                .flags
                & global_flags::LOG_DEBUG
                != 0,
            services,
            warnings,
        })
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

    /// Subsets that have no live socket registered.
    pub fn missing_sockets(&self) -> Result<Vec<Missing>> {
        let live = self.live_slots()?;
        let mut out = Vec::new();
        for (id, meta) in self.all_meta()? {
            for (i, s) in meta.subsets[..usize::from(meta.n_subsets).min(MAX_SUBSETS)]
                .iter()
                .enumerate()
            {
                if !live.contains(&slot(id, i as u32)) {
                    out.push(Missing {
                        service_id: id,
                        service: name_str(&meta.name),
                        index: i as u32,
                        subset: name_str(&s.name),
                        backend: subset_addr(s),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Registers `socket` (a listening TCP socket) for the subset described by `m`, if the
    /// subset still has that backend address. Returns whether it was registered.
    pub fn register_socket(&mut self, m: &Missing, socket: BorrowedFd<'_>) -> Result<bool> {
        let _lock = self.lock()?;
        let current = match self.maps.meta.get(&m.service_id, 0) {
            Ok(meta) => meta,
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(map_err("cannot read a service definition")(e)),
        };
        let idx = m.index as usize;
        if idx >= usize::from(current.n_subsets) || subset_addr(&current.subsets[idx]) != m.backend
        {
            return Ok(false);
        }
        let s = slot(m.service_id, m.index);
        // Tag first: a connection steered to the socket must find its slot in the tag.
        self.tag_listener(socket, s)?;
        self.maps
            .sockets
            .insert(s, socket.as_raw_fd(), 0)
            .map_err(map_err("cannot register a socket"))?;
        Ok(true)
    }

    /// Records in the listening socket's `TS_SOCKTAG` storage that it serves `slot` (replacing
    /// a slot of the same service). The kernel copies the tag into every connection accepted
    /// from it; the sock_ops program finds the connection's subset there.
    fn tag_listener(&mut self, socket: BorrowedFd<'_>, slot: u32) -> Result<()> {
        let mut storage: SkStorage<&mut MapData, SockTag> =
            SkStorage::try_from(&mut self.maps.socktag).map_err(map_err("socket tag map"))?;
        let mut t = match storage.get(&socket, 0) {
            Ok(t) if t.kind == tag::LISTENER => t,
            _ => SockTag::default(),
        };
        let tagged = tag_with(&mut t, slot);
        if let Some(evicted) = tagged {
            warn!(
                evicted_service = slot_service(evicted),
                "a listening socket serves more than {MAX_LISTENER_SLOTS} services; connections of the oldest are not accounted"
            );
        }
        storage
            .insert(&socket, t, 0)
            .map_err(map_err("cannot tag a listening socket"))
    }

    /// Makes the kernel state match `config`: creates new services, redefines changed ones and,
    /// with [`Weights::FromConfig`], sets the weights of the others. Services absent from
    /// `config` are left alone. Everything is validated before the first map is written.
    pub fn apply(&mut self, config: &Config, policy: Weights) -> Result<Vec<(String, Change)>> {
        self.apply_with(|current: &[ServiceView]| -> Result<Desired> {
            let by_name: StdHashMap<&str, &ServiceView> = current
                .iter()
                .map(|v| (v.config.name.as_str(), v))
                .collect();
            let services = config
                .services
                .iter()
                .map(|svc| {
                    let mut svc = svc.clone();
                    if policy == Weights::KeepExisting
                        && let Some(view) = by_name.get(svc.name.as_str())
                        && service_meta(&view.config) == service_meta(&svc)
                    {
                        svc.subsets = view.config.subsets.clone();
                    }
                    DesiredService {
                        config: svc,
                        annotation: Annotation::Keep,
                    }
                })
                .collect();
            Ok(Desired {
                services,
                clear_annotations: Vec::new(),
            })
        })
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
                })
                .collect();
            out.push(ServiceView {
                id: *id,
                config: ServiceConfig {
                    name: name_str(&meta.name),
                    listen: listen_of(meta),
                    subsets,
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
        Ok(out)
    }

    /// Changes services in one step, holding the namespace's lock throughout: `resolve` is
    /// given every service as the kernel holds it ([`State::services`]) and returns what the
    /// services it names must become; services it does not name are left alone.
    ///
    /// Nothing is written unless everything is valid: names unique and well-formed, 1 to 16
    /// subsets, valid weights, no two services on one listen address (also counting the
    /// services left alone), room for the new ones. The changes are then written service by
    /// service, each committed by one `TS_SERVICES` update as in
    /// [`State::set_weights`]; if the kernel refuses a write half-way (out of memory), the
    /// services already changed are put back as they were (their old bucket tables are still
    /// in place) and the error is returned. Sockets of subsets whose address changed are
    /// unregistered; the loader registers the new ones.
    ///
    /// Returns what happened to each service named by `resolve`, in its order.
    pub fn apply_with<E, F>(&mut self, resolve: F) -> std::result::Result<Vec<(String, Change)>, E>
    where
        E: From<StateError>,
        F: FnOnce(&[ServiceView]) -> std::result::Result<Desired, E>,
    {
        let _lock = self.lock()?;
        let existing = self.all_meta()?;
        let views = self.views(&existing)?;
        let desired = resolve(&views)?;
        Ok(self.write_desired(&existing, &views, &desired)?)
    }

    fn write_desired(
        &mut self,
        existing: &[(u32, ServiceMeta)],
        views: &[ServiceView],
        desired: &Desired,
    ) -> Result<Vec<(String, Change)>> {
        // ---- Validate everything; nothing is written before this block ends. ----
        let by_name: StdHashMap<String, usize> = existing
            .iter()
            .enumerate()
            .map(|(i, (_, m))| (name_str(&m.name), i))
            .collect();
        let invalid = |name: &str, reason: String| StateError::InvalidService {
            name: name.to_owned(),
            reason,
        };
        let mut names = HashSet::new();
        let mut keys: StdHashMap<ServiceKey, &str> = StdHashMap::new();
        for d in &desired.services {
            let svc = &d.config;
            if !names.insert(svc.name.as_str()) {
                return Err(invalid(&svc.name, "named twice in one change".into()));
            }
            crate::model::validate_service_name(&svc.name).map_err(|r| invalid(&svc.name, r))?;
            if svc.subsets.is_empty() || svc.subsets.len() > MAX_SUBSETS {
                return Err(invalid(
                    &svc.name,
                    format!(
                        "{} subsets; a service has 1 to {MAX_SUBSETS}",
                        svc.subsets.len()
                    ),
                ));
            }
            let mut subset_names = HashSet::new();
            for s in &svc.subsets {
                crate::model::validate_subset_name(&s.name).map_err(|r| invalid(&svc.name, r))?;
                if !subset_names.insert(s.name.as_str()) {
                    return Err(invalid(&svc.name, format!("subset {:?} twice", s.name)));
                }
                if s.weight > weights::MAX_WEIGHT {
                    return Err(WeightError::TooLarge {
                        subset: s.name.clone(),
                        weight: u64::from(s.weight),
                    }
                    .into());
                }
            }
            weights::bucket_counts(&svc.weights())?;
            if let Some(a) = annotation_text(&d.annotation)
                && a.len() > MAX_ANNOTATION
            {
                return Err(invalid(
                    &svc.name,
                    format!(
                        "annotation of {} bytes; at most {MAX_ANNOTATION} are stored",
                        a.len()
                    ),
                ));
            }
            if let Some(other) = keys.insert(service_key(&svc.listen), &svc.name) {
                return Err(StateError::ListenConflict {
                    name: svc.name.clone(),
                    listen: svc.listen.to_string(),
                    other: other.to_owned(),
                });
            }
        }
        for (_, m) in existing {
            let name = name_str(&m.name);
            if names.contains(name.as_str()) {
                continue;
            }
            if let Some(other) = keys.get(&m.key) {
                return Err(StateError::ListenConflict {
                    name: (*other).to_owned(),
                    listen: listen_of(m).to_string(),
                    other: name,
                });
            }
        }
        let new_count = desired
            .services
            .iter()
            .filter(|d| !by_name.contains_key(&d.config.name))
            .count();
        if existing.len() + new_count > MAX_SERVICES as usize {
            return Err(StateError::TooManyServices {
                wanted: existing.len() + new_count,
            });
        }

        // ---- Plan. ----
        let used: HashSet<u32> = existing.iter().map(|(id, _)| *id).collect();
        let mut free = (0..MAX_SERVICES).filter(|id| !used.contains(id));
        let mut steps = Vec::with_capacity(desired.services.len());
        for d in &desired.services {
            let meta = service_meta(&d.config);
            let ws = d.config.weights();
            let step = match by_name.get(&d.config.name) {
                None => {
                    let id = free.next().ok_or(StateError::TooManyServices {
                        wanted: existing.len() + new_count,
                    })?;
                    Step {
                        id,
                        meta,
                        weights: ws,
                        old: None,
                        old_annotation: None,
                        change: Change::Created,
                    }
                }
                Some(&i) => {
                    let (id, old_meta) = existing[i];
                    let entry = self.entry(&old_meta)?;
                    let change = match entry {
                        Some(e) if old_meta == meta => {
                            if e.weights.get(..ws.len()) == Some(&ws[..]) {
                                Change::Unchanged
                            } else {
                                Change::Reweighted
                            }
                        }
                        _ => Change::Redefined,
                    };
                    Step {
                        id,
                        meta,
                        weights: ws,
                        old: Some((old_meta, entry)),
                        old_annotation: views.get(i).and_then(|v| v.annotation.clone()),
                        change,
                    }
                }
            };
            steps.push((step, &d.annotation));
        }
        let mut clear: Vec<(u32, Option<String>)> = Vec::new();
        for name in &desired.clear_annotations {
            if names.contains(name.as_str()) {
                continue;
            }
            if let Some(&i) = by_name.get(name) {
                let view = views.get(i);
                if let Some(annotation) = view.and_then(|v| v.annotation.clone()) {
                    clear.push((existing[i].0, Some(annotation)));
                }
            }
        }
        let needs_routes = steps.iter().any(|(_, a)| matches!(a, Annotation::Set(_)));
        let mut routes = match self.open_routes()? {
            Some(r) => Some(r),
            None if needs_routes => Some(self.create_routes()?),
            None => None,
        };
        // Every listen key in use once the change is done.
        let final_keys: HashSet<ServiceKey> = existing
            .iter()
            .filter(|(_, m)| !names.contains(name_str(&m.name).as_str()))
            .map(|(_, m)| m.key)
            .chain(steps.iter().map(|(s, _)| s.meta.key))
            .collect();

        // ---- Write. ----
        let written = self.write_steps(&steps, &clear, routes.as_mut(), &final_keys);
        if let Err(e) = written {
            warn!(error = %e, "a change failed half-way; putting the services back as they were");
            self.roll_back(&steps, &clear, routes.as_mut());
            return Err(e);
        }
        let changes = steps
            .iter()
            .map(|(s, _)| {
                if s.change != Change::Unchanged {
                    info!(service = %name_str(&s.meta.name), listen = %listen_of(&s.meta), change = ?s.change, "applied");
                }
                (name_str(&s.meta.name), s.change.clone())
            })
            .collect();
        Ok(changes)
    }

    fn write_steps(
        &mut self,
        steps: &[(Step, &Annotation)],
        clear: &[(u32, Option<String>)],
        mut routes: Option<&mut RoutesMap>,
        final_keys: &HashSet<ServiceKey>,
    ) -> Result<()> {
        let mut tables: StdHashMap<Vec<u32>, Box<BucketTable>> = StdHashMap::new();
        // 1. Everything the data path reaches only through the new entries: bucket tables in
        //    the inactive generation, definitions, counters, annotations. Sockets of subsets
        //    whose backend changed go first, so that no connection reaches an old backend
        //    under a new subset (it falls back to the other subsets until the new socket is
        //    registered).
        for (step, annotation) in steps {
            let id = step.id;
            if step.change == Change::Created {
                // Leftovers of a service that had this id before.
                self.clear_slots(id, 0, MAX_SUBSETS as u32)?;
            }
            if let Some(routes) = routes.as_deref_mut() {
                match annotation {
                    Annotation::Set(text) if step.old_annotation.as_ref() == Some(text) => {}
                    Annotation::Set(text) => write_annotation(routes, id, text)?,
                    Annotation::Clear => remove_annotation(routes, id)?,
                    Annotation::Keep if step.change == Change::Created => {
                        remove_annotation(routes, id)?
                    }
                    Annotation::Keep => {}
                }
            }
            if step.change == Change::Unchanged {
                continue;
            }
            if !tables.contains_key(&step.weights) {
                tables.insert(step.weights.clone(), weights::build_table(&step.weights)?);
            }
            let table = tables
                .get(&step.weights)
                .ok_or_else(|| map_err("bucket table")(MapError::KeyNotFound))?;
            let m = &mut self.maps;
            retry_enomem(|| {
                m.buckets
                    .insert(table_key(id, step.generation()), **table, 0)
            })
            .map_err(map_err("cannot write a bucket table"))?;
            if step.change == Change::Reweighted {
                continue;
            }
            retry_enomem(|| m.meta.insert(id, step.meta, 0))
                .map_err(map_err("cannot write a service definition"))?;
            for i in 0..u32::from(step.meta.n_subsets) {
                ensure_counters(&mut m.counters, slot(id, i))?;
            }
            if let Some((old_meta, _)) = &step.old {
                for i in 0..usize::from(old_meta.n_subsets).min(MAX_SUBSETS) {
                    let same = i < usize::from(step.meta.n_subsets)
                        && old_meta.subsets[i].addr == step.meta.subsets[i].addr
                        && old_meta.subsets[i].port == step.meta.subsets[i].port;
                    if !same {
                        ignore_missing(
                            m.sockets.remove(&slot(id, i as u32)),
                            "cannot unregister a socket",
                        )?;
                    }
                }
            }
        }
        if let Some(routes) = routes {
            for (id, _) in clear {
                remove_annotation(routes, *id)?;
            }
        }
        // 2. The commit points: one TS_SERVICES update per service.
        for (step, _) in steps {
            if step.change == Change::Unchanged {
                continue;
            }
            let entry = new_entry(
                step.id,
                step.generation(),
                step.meta.n_subsets,
                &step.weights,
            );
            let services = &mut self.maps.services;
            retry_enomem(|| services.insert(step.meta.key, entry, 0))
                .map_err(map_err("cannot write a service entry"))?;
        }
        // 3. Listen addresses given up, and subsets gone.
        for (step, _) in steps {
            let Some((old_meta, _)) = &step.old else {
                continue;
            };
            if step.change != Change::Redefined {
                continue;
            }
            if !final_keys.contains(&old_meta.key) {
                ignore_missing(
                    self.maps.services.remove(&old_meta.key),
                    "cannot remove a service entry",
                )?;
            }
            self.clear_slots(
                step.id,
                u32::from(step.meta.n_subsets),
                u32::from(old_meta.n_subsets),
            )?;
        }
        Ok(())
    }

    /// Best effort: puts the services of `steps` back as they were before
    /// [`State::write_steps`] (errors are logged, the first error is what the caller reports).
    fn roll_back(
        &mut self,
        steps: &[(Step, &Annotation)],
        clear: &[(u32, Option<String>)],
        mut routes: Option<&mut RoutesMap>,
    ) {
        let old_keys: HashSet<ServiceKey> = steps
            .iter()
            .filter_map(|(s, _)| s.old.as_ref().map(|(m, _)| m.key))
            .collect();
        let report = |what: &str, r: Result<()>| {
            if let Err(e) = r {
                warn!(error = %e, "rolling back: {what}");
            }
        };
        for (step, _) in steps {
            if step.change == Change::Unchanged {
                continue;
            }
            match &step.old {
                Some((old_meta, old_entry)) => {
                    report(
                        "cannot restore a service definition",
                        self.maps
                            .meta
                            .insert(step.id, old_meta, 0)
                            .map_err(map_err("meta")),
                    );
                    if let Some(e) = old_entry {
                        report(
                            "cannot restore a service entry",
                            self.maps
                                .services
                                .insert(old_meta.key, e, 0)
                                .map_err(map_err("entry")),
                        );
                    }
                    if step.meta.key != old_meta.key && !old_keys.contains(&step.meta.key) {
                        report(
                            "cannot remove a new listen address",
                            ignore_missing(self.maps.services.remove(&step.meta.key), "entry"),
                        );
                    }
                }
                None => {
                    if !old_keys.contains(&step.meta.key) {
                        report(
                            "cannot remove a new service entry",
                            ignore_missing(self.maps.services.remove(&step.meta.key), "entry"),
                        );
                    }
                    let r = self.remove_id(step.id, step.meta.n_subsets, routes.as_deref_mut());
                    report("cannot remove a new service", r);
                }
            }
        }
        if let Some(routes) = routes {
            let restore = steps
                .iter()
                .map(|(s, _)| (s.id, s.old_annotation.clone()))
                .chain(clear.iter().cloned());
            for (id, old) in restore {
                let r = match old {
                    Some(text) => write_annotation(routes, id, &text),
                    None => remove_annotation(routes, id),
                };
                report("cannot restore an annotation", r);
            }
        }
    }

    /// Removes the sockets and counters of slots `from..to` of service `id`.
    fn clear_slots(&mut self, id: u32, from: u32, to: u32) -> Result<()> {
        for i in from..to.min(MAX_SUBSETS as u32) {
            let s = slot(id, i);
            ignore_missing(self.maps.sockets.remove(&s), "cannot unregister a socket")?;
            ignore_missing(self.maps.counters.remove(&s), "cannot remove counters")?;
        }
        Ok(())
    }

    /// Removes everything of service `id` but its `TS_SERVICES` entry: both bucket tables,
    /// sockets, counters, annotation and definition (last: it is how the id is found).
    /// Slots from `n_subsets` on are empty already (a redefinition clears them).
    fn remove_id(&mut self, id: u32, n_subsets: u8, routes: Option<&mut RoutesMap>) -> Result<()> {
        for generation in 0..2 {
            ignore_missing(
                self.maps.buckets.remove(&table_key(id, generation)),
                "cannot remove a bucket table",
            )?;
        }
        self.clear_slots(id, 0, u32::from(n_subsets))?;
        if let Some(routes) = routes {
            remove_annotation(routes, id)?;
        }
        ignore_missing(
            self.maps.meta.remove(&id),
            "cannot remove a service definition",
        )
    }

    /// Deletes services in one step, holding the namespace's lock throughout: `select` is
    /// given every service ([`State::services`]) and returns the names to delete (names that
    /// do not exist are skipped). Each service stops being steered at once (its
    /// `TS_SERVICES` entry goes first: new connections to its listen address see the normal
    /// socket lookup); then its tables, sockets, counters, annotation and definition are
    /// removed. Returns the names deleted.
    pub fn delete_with<E, F>(&mut self, select: F) -> std::result::Result<Vec<String>, E>
    where
        E: From<StateError>,
        F: FnOnce(&[ServiceView]) -> std::result::Result<Vec<String>, E>,
    {
        let _lock = self.lock()?;
        let existing = self.all_meta()?;
        let views = self.views(&existing)?;
        let names = select(&views)?;
        let by_name: StdHashMap<String, (u32, ServiceMeta)> = existing
            .iter()
            .map(|(id, m)| (name_str(&m.name), (*id, *m)))
            .collect();
        let mut routes = self.open_routes()?;
        let mut deleted = Vec::new();
        let mut seen = HashSet::new();
        for name in names {
            let Some((id, meta)) = by_name.get(&name) else {
                continue;
            };
            if !seen.insert(*id) {
                continue;
            }
            // Only this service's entry: another service may have taken the address since.
            if let Ok(e) = self.maps.services.get(&meta.key, 0)
                && e.id == *id
            {
                ignore_missing(
                    self.maps.services.remove(&meta.key),
                    "cannot remove a service entry",
                )?;
            }
            self.remove_id(*id, meta.n_subsets, routes.as_mut())?;
            info!(service = %name, "deleted");
            deleted.push(name);
        }
        Ok(deleted)
    }

    /// Deletes the service called `name`. Returns whether it existed.
    pub fn delete_service(&mut self, name: &str) -> Result<bool> {
        let deleted = self.delete_with(|_| Ok::<_, StateError>(vec![name.to_owned()]))?;
        Ok(!deleted.is_empty())
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

    /// Sets weights with `tcpshiftctl set-weight` semantics (see
    /// [`weights::apply_set_weight`]). `service` may be `None` when there is one service.
    /// Returns the service's name and its new weights.
    pub fn set_weights(
        &mut self,
        service: Option<&str>,
        requested: &[(String, u32)],
    ) -> Result<(String, Vec<(String, u32)>)> {
        let _lock = self.lock()?;
        let all = self.all_meta()?;
        let known = || {
            all.iter()
                .map(|(_, m)| name_str(&m.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (id, meta) = match service {
            Some(name) => all
                .iter()
                .find(|(_, m)| name_str(&m.name) == name)
                .ok_or_else(|| StateError::UnknownService {
                    name: name.to_string(),
                    known: known(),
                })?,
            None => match all.as_slice() {
                [] => return Err(StateError::NoServices),
                [one] => one,
                _ => {
                    return Err(StateError::AmbiguousService {
                        count: all.len(),
                        known: known(),
                    });
                }
            },
        };
        let entry = self.entry(meta)?.ok_or(StateError::NoServices)?;
        let n = usize::from(meta.n_subsets).min(MAX_SUBSETS);
        let names: Vec<String> = meta.subsets[..n]
            .iter()
            .map(|s| name_str(&s.name))
            .collect();
        let current: Vec<(String, u32)> = names
            .iter()
            .cloned()
            .zip(entry.weights[..n].iter().copied())
            .collect();
        let new = weights::apply_set_weight(&current, requested)?;
        let generation = entry.generation ^ 1;
        let table = weights::build_table(&new)?;
        let (id, key, n_subsets) = (*id, meta.key, meta.n_subsets);
        let service_name = name_str(&meta.name);
        self.maps
            .buckets
            .insert(table_key(id, generation), *table, 0)
            .map_err(map_err("cannot write a bucket table"))?;
        self.maps
            .services
            .insert(key, new_entry(id, generation, n_subsets, &new), 0)
            .map_err(map_err("cannot write a service entry"))?;
        info!(service = %service_name, weights = ?new, "weights set");
        Ok((service_name, names.into_iter().zip(new).collect()))
    }
}

fn new_entry(id: u32, generation: u32, n_subsets: u8, ws: &[u32]) -> ServiceEntry {
    let mut weights = [0u32; MAX_SUBSETS];
    let mut weighted_mask = 0;
    for (i, w) in ws.iter().enumerate().take(MAX_SUBSETS) {
        weights[i] = *w;
        if *w > 0 {
            weighted_mask |= 1 << i;
        }
    }
    ServiceEntry {
        id,
        generation,
        mode: mode::HASH_CONNECTION,
        n_subsets,
        _pad: 0,
        weighted_mask,
        weights,
    }
}

fn ignore_missing(r: std::result::Result<(), MapError>, what: &str) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(what)(e)),
    }
}

/// Name of the userspace-only map of per-service annotations (see [`Annotation`]).
const ROUTES: &str = "TS_ROUTES";
/// Size of a `TS_ROUTES` value: a little-endian `u16` length, then the annotation's bytes.
const ROUTE_VALUE_SIZE: usize = 1024;
/// Longest annotation stored with a service, in bytes.
pub const MAX_ANNOTATION: usize = ROUTE_VALUE_SIZE - 2;
/// `BPF_F_NO_PREALLOC`: entries are allocated as they are written.
const BPF_F_NO_PREALLOC: u32 = 1;

type RouteValue = [u8; ROUTE_VALUE_SIZE];
type RoutesMap = HashMap<MapData, u32, RouteValue>;

/// One service's part of a change (see [`State::write_desired`]).
struct Step {
    id: u32,
    meta: ServiceMeta,
    weights: Vec<u32>,
    /// Definition and entry before the change, for existing services.
    old: Option<(ServiceMeta, Option<ServiceEntry>)>,
    old_annotation: Option<String>,
    change: Change,
}

impl Step {
    /// The bucket-table generation the change writes: the one the data path does not use.
    fn generation(&self) -> u32 {
        self.old
            .as_ref()
            .and_then(|(_, e)| *e)
            .map_or(0, |e| e.generation ^ 1)
    }
}

fn annotation_text(a: &Annotation) -> Option<&str> {
    match a {
        Annotation::Set(text) => Some(text),
        _ => None,
    }
}

fn read_annotation(routes: &RoutesMap, id: u32) -> Result<Option<String>> {
    match routes.get(&id, 0) {
        Ok(v) => {
            let len = usize::from(u16::from_le_bytes([v[0], v[1]])).min(MAX_ANNOTATION);
            let body = v.get(2..2 + len).unwrap_or_default();
            Ok(Some(String::from_utf8_lossy(body).into_owned()))
        }
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_err("cannot read an annotation")(e)),
    }
}

fn write_annotation(routes: &mut RoutesMap, id: u32, text: &str) -> Result<()> {
    let mut v: RouteValue = [0; ROUTE_VALUE_SIZE];
    let b = text.as_bytes();
    let n = b.len().min(MAX_ANNOTATION);
    v[..2].copy_from_slice(&(n as u16).to_le_bytes());
    v[2..2 + n].copy_from_slice(&b[..n]);
    retry_enomem(|| routes.insert(id, v, 0)).map_err(map_err("cannot write an annotation"))
}

fn remove_annotation(routes: &mut RoutesMap, id: u32) -> Result<()> {
    ignore_missing(routes.remove(&id), "cannot remove an annotation")
}

/// Creates zeroed counters for `slot` unless they exist.
fn ensure_counters(counters: &mut PerCpuHashMap<MapData, u32, Counters>, slot: u32) -> Result<()> {
    if counters.get(&slot, 0).is_ok() {
        return Ok(());
    }
    let n = aya::util::nr_cpus().map_err(|(what, e)| StateError::Io {
        what: "cannot count CPUs",
        path: PathBuf::from(what),
        error: e,
    })?;
    retry_enomem(|| {
        let zeros = PerCpuValues::try_from(vec![Counters::default(); n])?;
        counters.insert(slot, zeros, 0)
    })
    .map_err(map_err("cannot create counters"))
}

/// Runs a map update again while the kernel answers ENOMEM, for up to about a second.
///
/// Maps without preallocation take their elements from the BPF memory allocator's per-CPU
/// caches, which are refilled asynchronously (and per-CPU values from the percpu allocator,
/// which grows asynchronously too): thousands of updates in a row from userspace — an apply
/// of 10 000 services — can find them empty for a moment although memory is plentiful.
fn retry_enomem<T>(
    mut update: impl FnMut() -> std::result::Result<T, MapError>,
) -> std::result::Result<T, MapError> {
    let mut delay = std::time::Duration::from_micros(100);
    let mut waited = std::time::Duration::ZERO;
    loop {
        match update() {
            Err(MapError::SyscallError(s))
                if s.io_error.raw_os_error() == Some(libc::ENOMEM)
                    && waited < std::time::Duration::from_secs(1) =>
            {
                std::thread::sleep(delay);
                waited += delay;
                delay = (delay * 2).min(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Loads (verifies) program `name` of `ebpf`, a `T` (`kind` names it in errors).
fn load_program<'a, T>(
    ebpf: &'a mut aya::Ebpf,
    name: &str,
    kind: &str,
    load: impl FnOnce(&mut T) -> std::result::Result<(), ProgramError>,
) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program: &'a mut T = ebpf
        .program_mut(name)
        .ok_or_else(|| missing_map(name))?
        .try_into()
        .map_err(|e| StateError::Program {
            what: format!("the {kind} program has the wrong type"),
            error: Box::new(e),
        })?;
    load(&mut *program).map_err(|e| StateError::Program {
        what: format!("the kernel refused the {kind} program"),
        error: Box::new(e),
    })?;
    Ok(program)
}

/// Loads the object, pins its maps and the attached program's link into `tmp`.
fn create_pinned(tmp: &Path, netns: &Netns, object: &[u8]) -> Result<()> {
    let _ = fs::remove_dir_all(tmp);
    fs::create_dir(tmp).map_err(io_err("cannot create", tmp))?;
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o700))
        .map_err(io_err("cannot set permissions of", tmp))?;
    let prog_err = |what: &str| {
        let what = what.to_string();
        move |e: Box<dyn std::error::Error + Send + Sync>| StateError::Program { what, error: e }
    };
    let mut ebpf = EbpfLoader::new()
        .load(object)
        .map_err(|e| prog_err("cannot load the eBPF object")(Box::new(e)))?;
    let seed = random_u32();
    if Netns::current()?.inode() != netns.inode() {
        return Err(StateError::Program {
            what: "cannot install".into(),
            error: "tcpshift must be installed from inside the network namespace it serves".into(),
        });
    }
    let netns_cookie = netns::current_cookie().map_err(|e| StateError::Io {
        what: "cannot read the network namespace cookie (SO_NETNS_COOKIE, Linux >= 5.14) of",
        path: netns.path().to_path_buf(),
        error: e,
    })?;
    {
        let map = ebpf
            .map_mut(map_names::GLOBAL)
            .ok_or_else(|| missing_map(map_names::GLOBAL))?;
        let mut global: Array<&mut MapData, Global> =
            Array::try_from(map).map_err(map_err("global settings map"))?;
        let g = Global {
            magic: MAGIC,
            layout_version: LAYOUT_VERSION,
            hash_seed: seed,
            flags: 0,
            _pad: 0,
            netns_cookie,
        };
        global
            .set(0, g, 0)
            .map_err(map_err("cannot write the global settings"))?;
    }
    for name in map_names::ALL {
        let map = ebpf.map(name).ok_or_else(|| missing_map(name))?;
        let path = tmp.join(name);
        map.pin(&path).map_err(|e| StateError::Program {
            what: format!("cannot pin map {}", path.display()),
            error: Box::new(e),
        })?;
    }
    let program = load_program(&mut ebpf, PROGRAM_SK_LOOKUP, "sk_lookup", SkLookup::load)?;
    let link_id = program.attach(netns.file()).map_err(|e| {
        prog_err("cannot attach the sk_lookup program to the namespace")(Box::new(e))
    })?;
    let link: FdLink = program
        .take_link(link_id)
        .map_err(|e| prog_err("cannot take the link")(Box::new(e)))?
        .into();
    let path = tmp.join(LINK);
    link.pin(&path).map_err(|e| StateError::Program {
        what: format!("cannot pin the link at {}", path.display()),
        error: Box::new(e),
    })?;
    if let Err(e) = attach_accounting(&mut ebpf, tmp) {
        // Steering does not depend on it: go on, `status` says that accounting is off.
        warn!("connection accounting is off: {e}");
    }
    Ok(())
}

/// Loads the sock_ops program and attaches it to the cgroup v2 root (every socket of the host;
/// the program ignores other namespaces' sockets), pinning its link in `tmp`. Without a cgroup2
/// mount steering still works, without connection accounting.
fn attach_accounting(ebpf: &mut aya::Ebpf, tmp: &Path) -> Result<()> {
    let prog_err = |what: &str| {
        let what = what.to_string();
        move |e: Box<dyn std::error::Error + Send + Sync>| StateError::Program { what, error: e }
    };
    let mountinfo = Path::new("/proc/self/mountinfo");
    let Some(root) = netns::cgroup2_root().map_err(io_err("cannot read", mountinfo))? else {
        warn!(
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo): connection accounting (opened, closed, bytes) is off; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) and reinstall to enable it"
        );
        return Ok(());
    };
    let cgroup = File::open(&root).map_err(io_err("cannot open the cgroup v2 root", &root))?;
    let program = load_program(ebpf, PROGRAM_SOCK_OPS, "sock_ops", SockOps::load)?;
    // A bpf_link (Linux >= 5.7, which aya uses) always attaches alongside other programs
    // (the kernel refuses mode flags on link creation): `Single` passes no flag.
    let link_id = program
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| {
            prog_err(&format!(
                "cannot attach the sock_ops program to the cgroup v2 root {}",
                root.display()
            ))(Box::new(e))
        })?;
    let link: FdLink = program
        .take_link(link_id)
        .map_err(|e| prog_err("cannot take the sock_ops link")(Box::new(e)))?
        .try_into()
        .map_err(|e| prog_err("the sock_ops link is not a bpf link")(Box::new(e)))?;
    let path = tmp.join(SOCKOPS_LINK);
    link.pin(&path).map_err(|e| StateError::Program {
        what: format!("cannot pin the link at {}", path.display()),
        error: Box::new(e),
    })?;
    debug!(cgroup = %root.display(), "attached the sock_ops program");
    Ok(())
}

/// Removes the state of every namespace that no longer exists (its sk_lookup link was detached
/// by the kernel: `netns_ino` 0), except `keep`. Such a state would otherwise keep its sock_ops
/// program attached to the cgroup v2 root — running, to no purpose, for every socket of the
/// host, and using one of the 64 program slots of that attach point — until its inode is
/// reused. Called with the base lock held.
fn sweep_dead_states(base: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path == keep || !e.file_name().to_string_lossy().starts_with("netns-") {
            continue;
        }
        if let Ok(0) = link_netns(&path.join(LINK)) {
            match fs::remove_dir_all(&path) {
                Ok(()) => {
                    info!(dir = %path.display(), "removed the state of a network namespace that no longer exists")
                }
                Err(e) => {
                    warn!(dir = %path.display(), error = %e, "cannot remove the state of a dead network namespace")
                }
            }
        }
    }
}

/// The current second of `CLOCK_MONOTONIC_COARSE`, as the data path counts seconds
/// (`bpf_ktime_get_coarse_ns() / 10⁹`, truncated to 32 bits).
fn coarse_second() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// Adds `slot` to a listener's tag, replacing the slot of the same service. Returns a slot
/// evicted because the tag was full (the oldest).
fn tag_with(t: &mut SockTag, slot: u32) -> Option<u32> {
    let service = slot_service(slot);
    let slots = &mut t.listener_slots;
    if let Some(same) = slots
        .iter_mut()
        .find(|s| **s != NO_SLOT && slot_service(**s) == service)
    {
        *same = slot;
        return None;
    }
    if let Some(free) = slots.iter_mut().find(|s| **s == NO_SLOT) {
        *free = slot;
        return None;
    }
    let evicted = slots[0];
    slots.rotate_left(1);
    slots[MAX_LISTENER_SLOTS - 1] = slot;
    Some(evicted)
}

fn missing_map(name: &str) -> StateError {
    StateError::Program {
        what: format!("the eBPF object has no {name}"),
        error: "this build of tcpshift is broken; rebuild with `cargo xtask build`".into(),
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: valid buffer of 4 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    if n != 4 {
        // Not security relevant: the seed only decorrelates hashes between namespaces.
        return std::process::id().wrapping_mul(0x9e37_79b9);
    }
    u32::from_ne_bytes(b)
}

/// The `TS_SERVICES` key of a listen address.
pub fn service_key(listen: &Listen) -> ServiceKey {
    let addr = match listen {
        Listen::Any { .. } => [0; 16],
        Listen::Addr(a) => ip_bytes(a.ip()),
    };
    ServiceKey {
        addr,
        port: listen.port(),
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn service_meta(svc: &ServiceConfig) -> ServiceMeta {
    let mut subsets = [SubsetMeta {
        name: [0; SUBSET_NAME_LEN],
        addr: [0; 16],
        port: 0,
        family: 0,
        _pad: [0; 5],
    }; MAX_SUBSETS];
    for (i, s) in svc.subsets.iter().enumerate().take(MAX_SUBSETS) {
        subsets[i] = SubsetMeta {
            name: name_bytes(&s.name),
            addr: ip_bytes(s.addr.ip()),
            port: s.addr.port(),
            family: if s.addr.is_ipv4() { 4 } else { 6 },
            _pad: [0; 5],
        };
    }
    ServiceMeta {
        name: name_bytes(&svc.name),
        key: service_key(&svc.listen),
        listen_family: match svc.listen {
            Listen::Any { .. } => 0,
            Listen::Addr(a) if a.is_ipv4() => 4,
            Listen::Addr(_) => 6,
        },
        n_subsets: svc.subsets.len().min(MAX_SUBSETS) as u8,
        _pad: [0; 2],
        subsets,
    }
}

fn name_bytes<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let b = s.as_bytes();
    let n = b.len().min(N - 1);
    out[..n].copy_from_slice(&b[..n]);
    out
}

fn name_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn subset_addr(s: &SubsetMeta) -> SocketAddr {
    let v6 = Ipv6Addr::from(s.addr);
    let ip = match (s.family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, s.port)
}

fn listen_of(meta: &ServiceMeta) -> Listen {
    let v6 = Ipv6Addr::from(meta.key.addr);
    match meta.listen_family {
        0 => Listen::Any {
            port: meta.key.port,
        },
        4 => Listen::Addr(SocketAddr::new(
            IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
            meta.key.port,
        )),
        _ => Listen::Addr(SocketAddr::new(IpAddr::V6(v6), meta.key.port)),
    }
}

/// Opens the pinned BPF object at `path` (`BPF_OBJ_GET`).
fn obj_get(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET reads the path pointer only (valid, NUL-terminated, alive for the
    // call); attr is 128 zeroed bytes.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), 128) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned to us and is owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// The first 128 bytes of the kernel's info about the BPF object `fd` (`BPF_OBJ_GET_INFO_BY_FD`;
/// the kernel copies no more than the length given, pointers in the info stay zero).
fn obj_info(fd: BorrowedFd<'_>) -> io::Result<[u32; 32]> {
    let mut info = [0u32; 32];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | (128u64 << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: info is 128 bytes, as declared in info_len, and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            128,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Reads `bpf_link_info` of the pinned link at `path`: (program id, netns inode).
fn link_info(path: &Path) -> io::Result<(u32, u32)> {
    let fd = obj_get(path)?;
    let info = obj_info(fd.as_fd())?;
    // struct bpf_link_info { u32 type, id, prog_id; union (8-aligned, offset 16) { netns: { u32 netns_ino, attach_type } } }
    Ok((info[2], info[4]))
}

/// Id and tag of the program `fd` (`struct bpf_prog_info { u32 type, id; u8 tag[8]; .. }`).
fn prog_ref(fd: BorrowedFd<'_>) -> io::Result<ProgramRef> {
    let info = obj_info(fd)?;
    let mut tag = [0u8; 8];
    tag[..4].copy_from_slice(&info[2].to_ne_bytes());
    tag[4..].copy_from_slice(&info[3].to_ne_bytes());
    Ok(ProgramRef { id: info[1], tag })
}

/// An fd of the loaded program `id` (`BPF_PROG_GET_FD_BY_ID`).
fn prog_fd_by_id(id: u32) -> io::Result<std::os::fd::OwnedFd> {
    // union bpf_attr { u32 prog_id, next_id, open_flags; .. }
    let mut attr = [0u32; 32];
    attr[0] = id;
    // SAFETY: attr is 128 zeroed bytes holding `prog_id`; the kernel only reads it.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, attr.as_mut_ptr(), 128) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned to us and is owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Switches the link `link` (pinned at `path`) to the program `new` unless it runs an
/// identical one already (same tag) and `force` is not set.
///
/// `BPF_LINK_UPDATE` with `BPF_F_REPLACE` names the program expected in the link: if another
/// loader replaced it in between, the kernel refuses (EPERM) instead of undoing that change.
fn replace_program(
    path: &Path,
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    force: bool,
) -> Result<ProgramChange> {
    let read_err = |what: &'static str| {
        let path = path.to_path_buf();
        move |error| StateError::Io { what, path, error }
    };
    let old_id = obj_info(link).map_err(read_err("cannot read the link"))?[2];
    let old_fd = prog_fd_by_id(old_id).map_err(read_err("cannot open the program of the link"))?;
    let old = prog_ref(old_fd.as_fd()).map_err(read_err("cannot read the program of the link"))?;
    let new_ref = prog_ref(new).map_err(read_err("cannot read the new program for the link"))?;
    if old.tag == new_ref.tag && !force {
        return Ok(ProgramChange::Unchanged(old));
    }
    // union bpf_attr.link_update { u32 link_fd, new_prog_fd, flags, old_prog_fd; }
    let mut attr = [0u32; 32];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = new.as_raw_fd() as u32;
    attr[2] = BPF_F_REPLACE;
    attr[3] = old_fd.as_raw_fd() as u32;
    // SAFETY: attr is 128 bytes holding the link_update fields, all three fds open for the
    // whole call; the kernel only reads it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, attr.as_mut_ptr(), 128) };
    if rc < 0 {
        return Err(StateError::LinkUpdate {
            link: path.to_path_buf(),
            error: io::Error::last_os_error(),
        });
    }
    Ok(ProgramChange::Replaced { old, new: new_ref })
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_LINK_UPDATE` flag: replace only if the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 4;

fn link_netns(path: &Path) -> io::Result<u32> {
    link_info(path).map(|(_, ino)| ino)
}

fn link_program(path: &Path) -> io::Result<u32> {
    link_info(path).map(|(prog, _)| prog)
}

#[cfg(test)]
mod accounting_tests {
    use super::*;

    #[test]
    fn a_listener_tag_keeps_one_slot_per_service() {
        let mut t = SockTag::default();
        assert_eq!(tag_with(&mut t, slot(3, 0)), None);
        assert_eq!(tag_with(&mut t, slot(5, 2)), None);
        // The same service again (its subset's backend moved to this socket): replaced.
        assert_eq!(tag_with(&mut t, slot(3, 1)), None);
        let used: Vec<u32> = t
            .listener_slots
            .iter()
            .copied()
            .filter(|s| *s != NO_SLOT)
            .collect();
        assert_eq!(used, vec![slot(3, 1), slot(5, 2)]);
        assert_eq!(t.kind, tag::LISTENER);
    }

    #[test]
    fn a_full_listener_tag_evicts_the_oldest_service() {
        let mut t = SockTag::default();
        for id in 0..MAX_LISTENER_SLOTS as u32 {
            assert_eq!(tag_with(&mut t, slot(id, 0)), None);
        }
        assert_eq!(tag_with(&mut t, slot(100, 1)), Some(slot(0, 0)));
        assert_eq!(t.listener_slots[MAX_LISTENER_SLOTS - 1], slot(100, 1));
        assert!(!t.listener_slots.contains(&slot(0, 0)));
    }
}
