//! systemd's readiness protocol (`sd_notify(3)`): one datagram of `KEY=VALUE` lines sent to
//! the unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written `@NAME`).
//! Without the variable (not started by systemd with `Type=notify`) nothing is sent.

use std::os::{
    linux::net::SocketAddrExt,
    unix::net::{SocketAddr, UnixDatagram},
};

use tracing::{debug, warn};

/// Sends `message` (e.g. `READY=1`) to `$NOTIFY_SOCKET`, if set. A failure is logged and
/// otherwise ignored: steering does not depend on the supervisor hearing about it.
pub fn send(message: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = target.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&target)?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(message.as_bytes(), &addr)?;
        Ok(())
    })();
    match result {
        Ok(()) => debug!(message, "notified the service manager"),
        Err(e) => warn!(
            message,
            socket = %target.to_string_lossy(),
            "cannot notify the service manager ($NOTIFY_SOCKET): {e}"
        ),
    }
}

/// `RELOADING=1` with the monotonic timestamp systemd's `Type=notify-reload` asks for.
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}
