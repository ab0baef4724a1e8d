//! The registration loop: every scan interval, registers the listening socket of each subset
//! that has none ([`discovery::register_missing`]), until a signal arrives or the state is
//! uninstalled; SIGHUP reloads the configuration between scans.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tcpshift::{
    discovery::{self, Registration},
    state::State,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::{notify, reload::Reloader};

/// (service, subset): one subset, across scans.
type SubsetId = (String, String);

/// What the scans remember between them (never weights or sockets: the kernel has those).
#[derive(Default)]
struct Scans {
    /// Subsets that had no live socket at the last scan (their warning was logged once).
    waiting: HashSet<SubsetId>,
    /// Subsets whose listener was seen but not yet taken: when the first scan that saw it
    /// began.
    seen: HashMap<SubsetId, Instant>,
    ready_logged: bool,
    /// Socket inodes of the listeners a service shadows that were seen at the last scan (each
    /// warned about once).
    shadowed: HashSet<u64>,
    /// The namespace's listening sockets at the last [`Scans::warn_shadowed`]: while
    /// they stay the same, no new listener can be shadowed and the services are not read.
    listeners: Vec<discovery::Listener>,
}

impl Scans {
    /// One scan: registers what can be registered and logs what happened.
    fn scan(&mut self, state: &mut State) -> Result<()> {
        // The scan lists the listening sockets right after this instant; a listener registered now
        // was seen by it, a listener that could not be taken keeps this as when it was seen.
        let began = Instant::now();
        let mut still: HashSet<SubsetId> = HashSet::new();
        let mut seen: HashMap<SubsetId, Instant> = HashMap::new();
        for outcome in discovery::register_missing(state, None)? {
            match outcome {
                Registration::Registered {
                    missing: m,
                    listener,
                    owner,
                } => {
                    let id = (m.service.clone(), m.subset.clone());
                    // Upper bound: the insert happened before register_missing returned.
                    let took = self.seen.get(&id).copied().unwrap_or(began).elapsed();
                    info!(service = %m.service, subset = %m.subset, backend = %m.backend,
                        socket = %listener.local, pid = owner.pid, process = %owner.comm,
                        seen_to_registered_us = took.as_micros() as u64,
                        "registered listening socket");
                }
                Registration::Refused {
                    missing: m,
                    listener,
                    owner,
                    uid,
                    trusted_uid,
                    refused_total,
                    new,
                } => {
                    let id = (m.service.clone(), m.subset.clone());
                    if new {
                        let process = owner.process();
                        let cgroup = process.cgroup().ok().flatten().unwrap_or_default();
                        warn!(service = %m.service, subset = %m.subset, backend = %m.backend,
                        socket = %listener.local, uid, pid = owner.pid, process = %owner.comm,
                        cgroup = %cgroup, trusted_uid, refused_total,
                        "refused to register a listening socket: its owner is neither root nor the uid trusted for this subset; if this owner is legitimate run `tcpshiftctl accept-owner {} {}`",
                        m.service, m.subset);
                    }
                    still.insert(id);
                }
                Registration::NotListening(m) => {
                    let id = (m.service.clone(), m.subset.clone());
                    if !self.waiting.contains(&id) {
                        warn!(service = %m.service, subset = %m.subset, backend = %m.backend,
                            "no live socket: nothing listens on the backend address (yet); its connections fall back to the other subsets");
                    }
                    still.insert(id);
                }
                Registration::Failed { missing: m, error } => {
                    let id = (m.service.clone(), m.subset.clone());
                    if !self.waiting.contains(&id) {
                        warn!(service = %m.service, subset = %m.subset, backend = %m.backend, "cannot take the backend's socket: {error}");
                    }
                    seen.insert(id.clone(), self.seen.get(&id).copied().unwrap_or(began));
                    still.insert(id);
                }
            }
        }
        self.waiting = still;
        self.seen = seen;
        if let Err(e) = self.warn_shadowed(state) {
            debug!("cannot check which listeners the services shadow: {e:#}");
        }
        if self.waiting.is_empty() && !self.ready_logged {
            info!("ready: every subset has a registered socket");
            self.ready_logged = true;
        }
        Ok(())
    }
}

impl Scans {
    /// Warns once per listener socket about each listener a service shadows (one that started
    /// after the service was steered, or one taken over with `takeOver: true`): its new
    /// connections go to the service's subsets.
    fn warn_shadowed(&mut self, state: &State) -> Result<()> {
        let mut listeners = discovery::listeners()?;
        let services = state.services()?;
        // A service steering UDP shadows the UDP servers on its port as well.
        let udp = if services.iter().any(|v| v.config.protocol.udp()) {
            discovery::udp_sockets()?
        } else {
            Vec::new()
        };
        let n_tcp = listeners.len();
        listeners.extend_from_slice(&udp);
        if listeners == self.listeners {
            return Ok(());
        }
        let all = discovery::ListenersByPort::new(&listeners[..n_tcp]);
        let udp = discovery::ListenersByPort::new(&udp);
        let mut now = HashSet::new();
        let mut new = Vec::new();
        for view in services {
            for l in discovery::shadowed_by_protocol(&view.config, &all, &udp) {
                now.insert(l.inode);
                if !self.shadowed.contains(&l.inode) {
                    new.push((view.config.name.clone(), view.config.listen, l));
                }
            }
        }
        if !new.is_empty() {
            let found: Vec<_> = new.iter().map(|(_, _, l)| *l).collect();
            for ((service, listen, _), d) in new.iter().zip(discovery::describe(&found)?) {
                warn!(service = %service, listen = %listen, listener = %d.address,
                    pid = d.pid, process = %d.process, user = %d.user,
                    "service {service} shadows the listener {d}: its new connections go to the service's subsets, never to it");
            }
        }
        self.shadowed = now;
        self.listeners = listeners;
        Ok(())
    }
}

/// Registers missing sockets every `every` until SIGTERM/SIGINT or until the state is
/// uninstalled; SIGHUP reloads the configuration with `reloader` (if there is a file).
/// Tells the service manager `READY=1` after the first scan.
pub async fn supervise(
    state: &mut State,
    every: Duration,
    mut reloader: Option<Reloader>,
) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scans = Scans::default();
    let mut first = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = hup.recv() => {
                match reloader.as_mut() {
                    Some(r) => {
                        notify::reloading();
                        r.reload(state);
                        notify::send("READY=1");
                    }
                    None => warn!("SIGHUP: no --config file to read again; nothing to do"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        if !state.is_installed() {
            info!("the pinned state was removed (tcpshiftctl uninstall); exiting");
            return Ok(());
        }
        scans.scan(state)?;
        if first {
            // Programs attached, configuration applied, every listening backend registered.
            notify::send("READY=1");
            first = false;
        }
    }
    info!("exiting; steering continues in the kernel (remove it with `tcpshiftctl uninstall`)");
    Ok(())
}
