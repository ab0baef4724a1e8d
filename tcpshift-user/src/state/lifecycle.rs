//! Putting tcpshift into a namespace and taking it out: install (load, attach, pin), adopt,
//! upgrade the programs in place, uninstall; and sweeping the states of dead namespaces.

use std::{
    fs::{self, File},
    io,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Array, MapData},
    programs::{CgroupAttachMode, Program, ProgramError, SkLookup, SockOps, links::FdLink},
};
use tcpshift_common::{
    DEFAULT_UDP_IDLE_SECS, Global, LAYOUT_VERSION, MAGIC, PROGRAM_SK_LOOKUP, PROGRAM_SOCK_OPS,
    map_names,
};
use tracing::{debug, info, warn};

use crate::netns::{self, Netns};

use super::{BASE_DIR, LINK, SOCKOPS_LINK, State, error::*, lock::*, state_dir, sys::*};

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

impl State {
    /// Opens the state of `netns`, or loads, attaches and pins tcpshift there when there is
    /// none (the loader's entry point). Mounts bpffs when needed.
    pub fn install(netns: &Netns, object: &[u8]) -> Result<(Self, Installed)> {
        if netns::ensure_bpffs(Path::new(netns::BPFFS))? {
            info!(path = netns::BPFFS, "mounted bpffs");
        }
        let base = Path::new(BASE_DIR);
        fs::create_dir_all(base).map_err(io_err("cannot create", base))?;
        // Others may pass through (not list) to a namespace's directory, whose own mode
        // decides: 0700, or 0750 with a read group (`State::share_read_only`).
        fs::set_permissions(base, fs::Permissions::from_mode(0o711))
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
    pub(super) fn adopt(dir: &Path, netns: &Netns) -> Result<Option<Self>> {
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
}

/// Loads (verifies) program `name` of `ebpf`, a `T` (`kind` names it in errors).
pub(super) fn load_program<'a, T>(
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
pub(super) fn create_pinned(tmp: &Path, netns: &Netns, object: &[u8]) -> Result<()> {
    let _ = fs::remove_dir_all(tmp);
    fs::create_dir(tmp).map_err(io_err("cannot create", tmp))?;
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o700))
        .map_err(io_err("cannot set permissions of", tmp))?;
    let prog_err = |what: &str| {
        let what = what.to_string();
        move |e: Box<dyn std::error::Error + Send + Sync>| StateError::Program { what, error: e }
    };
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::UDP_FLOWS, super::udp::flow_table_size())
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
            udp_idle_secs: DEFAULT_UDP_IDLE_SECS,
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
pub(super) fn attach_accounting(ebpf: &mut aya::Ebpf, tmp: &Path) -> Result<()> {
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
pub(super) fn sweep_dead_states(base: &Path, keep: &Path) {
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

pub(super) fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: valid buffer of 4 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    if n != 4 {
        // Not security relevant: the seed only decorrelates hashes between namespaces.
        return std::process::id().wrapping_mul(0x9e37_79b9);
    }
    u32::from_ne_bytes(b)
}

/// Switches the link `link` (pinned at `path`) to the program `new` unless it runs an
/// identical one already (same tag) and `force` is not set.
///
/// The replacement names the program expected in the link: if another loader replaced it in
/// between, the kernel refuses (EPERM) instead of undoing that change.
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
    let old_id = link_prog_id(link).map_err(read_err("cannot read the link"))?;
    let old_fd = prog_fd_by_id(old_id).map_err(read_err("cannot open the program of the link"))?;
    let old = prog_ref(old_fd.as_fd()).map_err(read_err("cannot read the program of the link"))?;
    let new_ref = prog_ref(new).map_err(read_err("cannot read the new program for the link"))?;
    if old.tag == new_ref.tag && !force {
        return Ok(ProgramChange::Unchanged(old));
    }
    link_update(link, new, old_fd.as_fd()).map_err(|error| StateError::LinkUpdate {
        link: path.to_path_buf(),
        error,
    })?;
    Ok(ProgramChange::Replaced { old, new: new_ref })
}
