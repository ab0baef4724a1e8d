//! `tcpshiftctl top`: the status, refreshed every interval, with bars of weight vs observed
//! share. Plain ANSI: the screen is cleared and redrawn when stdout is a terminal; otherwise
//! frames are printed one after the other. `q` (or Ctrl-C, SIGTERM) quits and restores the
//! terminal.

use std::{
    io::{IsTerminal, Read, Write},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tcpshift::{
    netns::Netns,
    report,
    state::{State, Status},
};

/// Set by SIGINT/SIGTERM/SIGHUP.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Catches the signals that end `top` so that the terminal is restored. No `SA_RESTART`: the
/// wait (`poll`) returns at once.
fn catch_signals() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a handler that only stores an atomic; zeroed sigaction is a valid start.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot handle signals");
        }
    }
    Ok(())
}

/// The terminal in non-canonical, no-echo mode with the cursor hidden, restored on drop.
struct Terminal {
    saved: Option<libc::termios>,
    hide_cursor: bool,
}

impl Terminal {
    fn new(keys: bool, screen: bool) -> Self {
        let mut saved = None;
        if keys {
            // SAFETY: termios calls on fd 0 with a valid out-pointer.
            unsafe {
                let mut t: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(0, &mut t) == 0 {
                    let original = t;
                    t.c_lflag &= !(libc::ICANON | libc::ECHO);
                    t.c_cc[libc::VMIN] = 1;
                    t.c_cc[libc::VTIME] = 0;
                    if libc::tcsetattr(0, libc::TCSANOW, &t) == 0 {
                        saved = Some(original);
                    }
                }
            }
        }
        if screen {
            print!("\x1b[?25l");
            let _ = std::io::stdout().flush();
        }
        Self {
            saved,
            hide_cursor: screen,
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restores the attributes read in `new`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
        if self.hide_cursor {
            print!("\x1b[?25h");
            let _ = std::io::stdout().flush();
        }
    }
}

/// Waits up to `timeout` for a key on stdin (when `keys`). Returns whether to quit.
fn wait(timeout: Duration, keys: bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if STOP.load(Ordering::SeqCst) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        }];
        let n = if keys { 1 } else { 0 };
        // SAFETY: valid array of `n` pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, left.as_millis().min(60_000) as i32) };
        if rc > 0 && fds[0].revents != 0 {
            let mut b = [0u8; 16];
            match std::io::stdin().read(&mut b) {
                Ok(0) | Err(_) => return true,
                Ok(k) => {
                    if b[..k].iter().any(|c| matches!(c, b'q' | b'Q' | 3)) {
                        return true;
                    }
                }
            }
        }
    }
}

/// Runs `top` until `q`, a signal, or `iterations` frames, refreshing every `interval`
/// seconds (0.1 to 3600).
pub fn run(netns: &Netns, interval: f64, iterations: Option<u64>) -> Result<()> {
    if !(0.1..=3600.0).contains(&interval) {
        anyhow::bail!("--interval {interval}: give a number of seconds in 0.1..=3600");
    }
    let interval = Duration::from_secs_f64(interval);
    let state = State::open_read_only(netns)?;
    let screen = std::io::stdout().is_terminal();
    let keys = std::io::stdin().is_terminal() && iterations != Some(1);
    catch_signals()?;
    let _terminal = Terminal::new(keys, screen);
    let mut prev: Option<(Status, Instant)> = None;
    let mut shown = 0u64;
    loop {
        let status = state.status()?;
        let now = Instant::now();
        let elapsed = prev.as_ref().map_or(Duration::ZERO, |(_, t)| now - *t);
        let frame = report::top_frame(&status, prev.as_ref().map(|(s, _)| s), elapsed);
        let header = format!(
            "tcpshift top - network namespace {} - every {:.1}s - q or Ctrl-C quits\n\n",
            status.netns_inode,
            interval.as_secs_f64()
        );
        let mut out = std::io::stdout().lock();
        if screen {
            write!(out, "\x1b[H\x1b[2J{header}{frame}")?;
        } else {
            if shown > 0 {
                writeln!(out)?;
            }
            write!(out, "{header}{frame}")?;
        }
        out.flush()?;
        drop(out);
        shown += 1;
        if iterations.is_some_and(|max| shown >= max) {
            break;
        }
        prev = Some((status, now));
        if wait(interval, keys) {
            break;
        }
    }
    Ok(())
}
