//! Test-only failpoints in the commit path (feature `failpoints`; never in a release build).
//!
//! Every map update of a change ([`super::State::apply_with`], `set_weights`, `delete_with`)
//! passes a named point first: `table`, `definition`, `counters`, `annotation`, `entry`
//! (and `restore` for the roll-back's writes). A test arms a point with [`arm`]: the point
//! lets `skip` updates through, then fails the next `times` ones with `errno`. With
//! `ENOMEM` and `times` small the commit path's retry hides the failure; otherwise the change
//! fails and is rolled back. Points are process-wide: tests that arm them must not run in
//! parallel with other changes of the same process.

use std::sync::Mutex;

use aya::{maps::MapError, sys::SyscallError};

struct Armed {
    point: String,
    skip: u32,
    times: u32,
    errno: i32,
    fired: u32,
}

static ARMED: Mutex<Option<Armed>> = Mutex::new(None);

/// Arms `point`: after `skip` updates pass it, the next `times` fail with `errno`.
pub fn arm(point: &str, skip: u32, times: u32, errno: i32) {
    let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    *armed = Some(Armed {
        point: point.to_owned(),
        skip,
        times,
        errno,
        fired: 0,
    });
}

/// Disarms the failpoint and returns how many updates it failed.
pub fn disarm() -> u32 {
    let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    armed.take().map_or(0, |a| a.fired)
}

/// Called before each map update at `point`: the injected error, if armed.
pub(super) fn check(point: &str) -> Result<(), MapError> {
    let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    let Some(a) = armed.as_mut().filter(|a| a.point == point) else {
        return Ok(());
    };
    if a.skip > 0 {
        a.skip -= 1;
        return Ok(());
    }
    if a.times == 0 {
        return Ok(());
    }
    a.times -= 1;
    a.fired += 1;
    Err(MapError::SyscallError(SyscallError {
        call: "bpf_map_update_elem (failpoint)",
        io_error: std::io::Error::from_raw_os_error(a.errno),
    }))
}
