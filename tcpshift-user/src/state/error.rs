//! Errors of the pinned state, and the helpers that build them from map and file errors.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::MapError;
use tcpshift_common::MAX_SERVICES;

use crate::{
    discovery::{DiscoveryError, ShadowedListener},
    netns::NetnsError,
    weights::WeightError,
};

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
    /// Not allowed to change the state (or to reach it at all).
    #[error(
        "permission denied on {path}: changing tcpshift's state needs root (CAP_BPF/CAP_SYS_ADMIN); {}",
        read_group_text(group)
    )]
    Permission {
        /// What could not be accessed.
        path: PathBuf,
        /// The read group of that state, when it has one the caller can see.
        group: Option<String>,
    },
    /// Not allowed to read the state.
    #[error(
        "permission denied on {path}: reading tcpshift's state needs root or membership of its read group (tcpshiftd --read-group, default `tcpshift`: members can run status, top, metrics and get); run this command as root or ask to be added to that group"
    )]
    ReadPermission {
        /// What could not be read.
        path: PathBuf,
    },
    /// The kernel refused `bpf()` to a caller without CAP_BPF.
    #[error(
        "the kernel refused the bpf() system call on {path} (EPERM): {}; run this command as root",
        super::access::sysctl_text(sysctl)
    )]
    BpfRefused {
        /// What was being opened.
        path: PathBuf,
        /// The value of `kernel.unprivileged_bpf_disabled`, if readable.
        sysctl: Option<u32>,
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
    /// A new or moved service would shadow a server already listening on its address.
    #[error(
        "service {name:?} would listen on {listen}, where another server already listens: {}; \
         once steered, its new connections would all go to the service's subsets. Choose another \
         listen address, declare that server as a subset, or take the address over on purpose \
         with `takeOver: true` in the service's definition",
        shadowed_list(listeners)
    )]
    ListenerShadowed {
        /// The service.
        name: String,
        /// Its listen address.
        listen: String,
        /// The listeners it would shadow (at least one).
        listeners: Vec<ShadowedListener>,
    },
    /// The namespace's listening sockets could not be read.
    #[error("cannot check which servers listen in this network namespace: {0}")]
    Discovery(#[from] DiscoveryError),
    /// A rollout cannot be stored, found or changed; the message says why and what to do.
    #[error("{0}")]
    Rollout(String),
    /// No such subset in a service.
    #[error("service {service:?} has no subset named {subset:?} (subsets: {known})")]
    UnknownSubset {
        /// The service.
        service: String,
        /// Name asked for.
        subset: String,
        /// Names that exist.
        known: String,
    },
}

/// What a permission error says about reading.
fn read_group_text(group: &Option<String>) -> String {
    match group {
        Some(g) => format!("members of group {g} can only read (status, top, metrics, get)"),
        None => "run this command as root (members of tcpshift's read group, see tcpshiftd --read-group, can only read: status, top, metrics, get)".into(),
    }
}

/// The listeners' descriptions, comma-separated.
fn shadowed_list(listeners: &[ShadowedListener]) -> String {
    listeners
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) type Result<T, E = StateError> = std::result::Result<T, E>;

/// The OS error under a failed map syscall (aya's message names only the syscall).
pub(super) fn map_error_cause(e: &MapError) -> String {
    match e {
        MapError::SyscallError(s) => format!(": {}", s.io_error),
        _ => String::new(),
    }
}

/// How the layout error names the version found (0: `TS_GLOBAL` unreadable or a map of
/// another type).
pub(super) fn layout_name(found: u32) -> String {
    if found == 0 {
        "an unknown map layout".to_string()
    } else {
        format!("layout version {found}")
    }
}

/// What an errno of `BPF_LINK_UPDATE` means here.
pub(super) fn link_update_cause(e: &io::Error) -> &'static str {
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

pub(super) fn map_err(what: impl Into<String>) -> impl FnOnce(MapError) -> StateError {
    let what = what.into();
    move |error| StateError::Map { what, error }
}

pub(super) fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |error| match super::access::refusal(&error, &path, false) {
        Some(refused) => refused,
        None => StateError::Io { what, path, error },
    }
}

/// A permission error seen by a caller without root: say so instead of showing errno.
pub(super) fn is_unprivileged(e: &io::Error) -> bool {
    // SAFETY: geteuid has no preconditions.
    e.kind() == io::ErrorKind::PermissionDenied && unsafe { libc::geteuid() } != 0
}

pub(super) fn pin_error(e: MapError, path: &Path) -> StateError {
    if let MapError::SyscallError(s) = &e {
        if let Some(refused) = super::access::refusal(&s.io_error, path, false) {
            return refused;
        }
        if s.io_error.kind() == io::ErrorKind::NotFound {
            return StateError::NotInstalled {
                dir: path.parent().unwrap_or(path).to_path_buf(),
            };
        }
    }
    map_err(format!("cannot open pinned map {}", path.display()))(e)
}

pub(super) fn missing_map(name: &str) -> StateError {
    StateError::Program {
        what: format!("the eBPF object has no {name}"),
        error: "this build of tcpshift is broken; rebuild with `cargo xtask build`".into(),
    }
}

pub(super) fn ignore_missing(r: std::result::Result<(), MapError>, what: &str) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(what)(e)),
    }
}
