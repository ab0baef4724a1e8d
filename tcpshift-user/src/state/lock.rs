//! The `flock` that serialises changes: on the base directory (creating, adopting and
//! removing state) or on one namespace's state directory (changing its maps).

use std::{fs::File, io, os::fd::AsRawFd, path::Path};

use super::{BASE_DIR, State, error::*};

/// Exclusive `flock` on a directory, released on drop.
///
/// [`Lock::take`] locks the base directory (creating, adopting and removing state);
/// [`State::lock`] locks one namespace's state directory (changing its maps), so namespaces
/// never wait for each other.
pub(super) struct Lock(#[allow(dead_code)] File);

impl Lock {
    pub(super) fn take() -> Result<Self> {
        Self::on(Path::new(BASE_DIR))
    }

    pub(super) fn on(path: &Path) -> Result<Self> {
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

impl State {
    /// Locks this namespace's state against concurrent changes.
    pub(super) fn lock(&self) -> Result<Lock> {
        if self.read_only {
            // Opened for reading (`State::open_read_only`): no change may start.
            return Err(StateError::Permission {
                path: self.dir.clone(),
                group: super::access::read_group_of(&self.dir),
            });
        }
        Lock::on(&self.dir)
    }
}
