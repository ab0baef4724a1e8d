//! Who may read the pinned state: the read-only group.
//!
//! Changing anything needs root (CAP_BPF and CAP_SYS_ADMIN, or the pinned files' owner). With
//! a read group (`tcpshiftd --read-group`, default `tcpshift`, when that group exists) the
//! loader gives the namespace's state directory mode 0750 and its pinned maps mode 0640 with
//! that group, makes `/sys/fs/bpf/tcpshift` (0711) and the bpffs mount point searchable by
//! others (they can pass through, not list), and leaves the pinned links 0600 (a link opens
//! only read-write, and a link fd could detach the program). A member opens the maps with
//! `BPF_F_RDONLY` ([`super::State::open_read_only`]): the kernel checks read permission on the
//! pinned file and hands out an fd that can look up but not update. Whoever cannot write
//! gets [`StateError::Permission`] naming the group; whoever cannot read,
//! [`StateError::ReadPermission`]; a kernel that refuses `bpf()` to users without CAP_BPF
//! altogether (`kernel.unprivileged_bpf_disabled` on Linux < 6.5), [`StateError::BpfRefused`].

use std::{
    ffi::{CStr, CString},
    fs, io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use super::{BASE_DIR, State, error::*};

/// The default read group of `tcpshiftd --read-group`.
pub const DEFAULT_READ_GROUP: &str = "tcpshift";

/// Mode of a namespace's state directory shared with a read group.
const SHARED_DIR_MODE: u32 = 0o750;
/// Mode of a pinned map shared with a read group.
const SHARED_MAP_MODE: u32 = 0o640;
/// Mode of `/sys/fs/bpf/tcpshift`: others may pass through to a namespace's directory (whose
/// own mode decides), not list it.
const BASE_MODE: u32 = 0o711;

/// A group whose members may read the pinned state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadGroup {
    /// Its name.
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

impl ReadGroup {
    /// Looks the group `name` up (`getgrnam_r`); `None` when it does not exist.
    pub fn lookup(name: &str) -> io::Result<Option<ReadGroup>> {
        let c = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut buf = vec![0u8; 16 * 1024];
        // SAFETY: zeroed `group` is a valid out-parameter (pointers null, gid 0).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: `c` is NUL-terminated, `grp` and `out`
        // are live out-parameters and `buf` is a buffer of the length passed.
        let rc = unsafe {
            libc::getgrnam_r(
                c.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            )
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if out.is_null() {
            return Ok(None);
        }
        Ok(Some(ReadGroup {
            name: name.to_owned(),
            gid: grp.gr_gid,
        }))
    }
}

/// The name of group `gid`, if it has one.
pub(super) fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: as in `ReadGroup::lookup`.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: `grp` and `out` are live out-parameters, `buf` a buffer of the length passed.
    let rc =
        unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || grp.gr_name.is_null() {
        return None;
    }
    // SAFETY: getgrgid_r succeeded: `gr_name` points to a NUL-terminated string in `buf`.
    let name = unsafe { CStr::from_ptr(grp.gr_name) };
    Some(name.to_string_lossy().into_owned())
}

/// The read group of the state `path` belongs to (a pinned file or a state directory): the
/// group of the nearest `netns-*` directory at or above it, when that directory is readable
/// by its group. `None` when it cannot be seen (no permission to pass through) or is not
/// shared.
pub(super) fn read_group_of(path: &Path) -> Option<String> {
    let dir = path.ancestors().find(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("netns-"))
    })?;
    let meta = fs::metadata(dir).ok()?;
    (meta.mode() & 0o050 == 0o050)
        .then(|| group_name(meta.gid()))
        .flatten()
}

/// `kernel.unprivileged_bpf_disabled`, when readable.
pub(super) fn unprivileged_bpf_disabled() -> Option<u32> {
    fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The error for a `bpf()` call on `path` refused by the kernel, or `None` when `e` is not a
/// refusal seen by a caller without root. `read` says whether the caller only wanted to read.
pub(super) fn refusal(e: &io::Error, path: &Path, read: bool) -> Option<StateError> {
    if !is_unprivileged(e) {
        return None;
    }
    let path = path.to_path_buf();
    Some(if e.raw_os_error() == Some(libc::EPERM) {
        StateError::BpfRefused {
            path,
            sysctl: unprivileged_bpf_disabled(),
        }
    } else if read {
        StateError::ReadPermission { path }
    } else {
        let group = read_group_of(&path);
        StateError::Permission { path, group }
    })
}

/// What `BpfRefused` says about the sysctl.
pub(super) fn sysctl_text(value: &Option<u32>) -> String {
    match value {
        Some(0) => "kernel.unprivileged_bpf_disabled is 0, so an LSM or seccomp policy refused it".into(),
        Some(1) => "kernel.unprivileged_bpf_disabled = 1: bpf() is refused to users without CAP_BPF (on Linux before 6.5 that includes opening pinned maps to read them), and 1 cannot be lowered without a reboot".into(),
        Some(v) => format!("kernel.unprivileged_bpf_disabled = {v}: bpf() is refused to users without CAP_BPF (on Linux before 6.5 that includes opening pinned maps to read them); root may allow it with `sysctl kernel.unprivileged_bpf_disabled=0` if the machine's policy permits"),
        None => "kernel.unprivileged_bpf_disabled could not be read".into(),
    }
}

impl State {
    /// Gives `group` read access to this namespace's state (see the module docs): the state
    /// directory 0750 and every pinned map 0640 with that group; `/sys/fs/bpf/tcpshift` 0711
    /// and the bpffs mount point searchable by others. The links stay 0600. Returns the
    /// paths whose mode or group changed.
    pub fn share_read_only(&self, group: &ReadGroup) -> Result<Vec<PathBuf>> {
        let mut changed = Vec::new();
        let bpffs = Path::new(crate::netns::BPFFS);
        if let Ok(meta) = fs::metadata(bpffs)
            && meta.mode() & 0o001 == 0
        {
            match set_mode(bpffs, (meta.mode() & 0o7777) | 0o001) {
                Ok(()) => {
                    info!(
                        path = %bpffs.display(),
                        "made the bpffs mount point searchable by others (o+x), so that members of group {} can reach tcpshift's state; other pinned objects keep their own modes",
                        group.name
                    );
                    changed.push(bpffs.to_path_buf());
                }
                // Not ours to change (a tcpshiftd that is not root): the maps are shared all
                // the same, and root can open the way once.
                Err(e) => warn!(
                    path = %bpffs.display(),
                    "members of group {} cannot reach tcpshift's state until the bpffs mount point is searchable by others: run `chmod o+x {}` as root ({e})",
                    group.name,
                    bpffs.display()
                ),
            }
        }
        let base = Path::new(BASE_DIR);
        if share(base, None, BASE_MODE)? {
            changed.push(base.to_path_buf());
        }
        if share(&self.dir, Some(group.gid), SHARED_DIR_MODE)? {
            changed.push(self.dir.clone());
        }
        for name in self.pinned_maps() {
            let path = self.dir.join(name);
            if share(&path, Some(group.gid), SHARED_MAP_MODE)? {
                changed.push(path);
            }
        }
        Ok(changed)
    }

    /// Gives a map just pinned at `path` the state directory's read group, when the directory
    /// is shared with one (maps created on first use: `TS_ROUTES`, `TS_OWNERS`,
    /// `TS_ROLLOUTS`).
    pub(super) fn share_new_pin(&self, path: &Path) -> Result<()> {
        let meta = fs::metadata(&self.dir).map_err(io_err("cannot read", &self.dir))?;
        if meta.mode() & 0o050 == 0o050 {
            share(path, Some(meta.gid()), SHARED_MAP_MODE)?;
        }
        Ok(())
    }

    /// The names of the maps pinned in the state directory.
    fn pinned_maps(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("TS_"))
            .collect()
    }
}

/// Sets `path`'s group (if given) and mode; whether anything changed.
fn share(path: &Path, gid: Option<u32>, mode: u32) -> Result<bool> {
    let meta = fs::metadata(path).map_err(io_err("cannot read", path))?;
    let mut changed = false;
    if let Some(gid) = gid
        && meta.gid() != gid
    {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(io_err("cannot change the group of", path))?;
        changed = true;
    }
    if meta.mode() & 0o7777 != mode {
        set_mode(path, mode)?;
        changed = true;
    }
    Ok(changed)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set permissions of", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_group_is_found_and_a_made_up_one_is_not() {
        let root = ReadGroup::lookup("root").expect("lookup");
        assert_eq!(root.map(|g| g.gid), Some(0));
        assert_eq!(
            ReadGroup::lookup("no-such-group-tcpshift-test").expect("lookup"),
            None
        );
        assert_eq!(group_name(0).as_deref(), Some("root"));
    }

    #[test]
    fn the_sysctl_text_names_the_value_and_the_way_out() {
        assert!(sysctl_text(&Some(2)).contains("sysctl kernel.unprivileged_bpf_disabled=0"));
        assert!(sysctl_text(&Some(1)).contains("reboot"));
    }
}
