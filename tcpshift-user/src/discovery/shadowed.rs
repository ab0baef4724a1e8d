//! Listeners a service shadows: sockets listening on a service's listen address that are not
//! one of its subsets. Once the service is steered, new connections to that address go to the
//! subsets and never reach such a listener (an sshd on port 22, a legacy server being
//! migrated). Computed from `/proc` whenever asked, never stored.

use std::{
    collections::{HashMap, HashSet},
    fmt, fs,
    net::{IpAddr, SocketAddr},
    ops::ControlFlow,
};

use serde::Serialize;

use super::{DiscoveryError, Listener, candidates};
use crate::{
    model::{Listen, ServiceConfig},
    procfs::{self, Process},
};

/// A listening socket that a service's listen address covers and that is not one of its
/// subsets, with who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShadowedListener {
    /// The address it is bound to.
    pub address: SocketAddr,
    /// Its socket inode.
    pub inode: u64,
    /// The process holding it, if one could be found.
    pub pid: Option<i32>,
    /// That process's command name (empty if unknown).
    pub process: String,
    /// That process's user: a name from `/etc/passwd`, else the numeric uid (empty if unknown).
    pub user: String,
}

impl fmt::Display for ShadowedListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(
                f,
                "{} (pid {pid}, process {:?}, user {})",
                self.address, self.process, self.user
            ),
            None => write!(
                f,
                "{} (socket inode {}, no visible process holds it)",
                self.address, self.inode
            ),
        }
    }
}

/// Whether a socket listening on `local` receives connections to the service address `listen`
/// when nothing steers them: same port and overlapping addresses (a wildcard covers every
/// address of its family; a `[::]` listener is taken as dual-stack and so also covers IPv4; a
/// v4-mapped address is its IPv4 address).
pub fn overlaps(listen: &Listen, local: SocketAddr) -> bool {
    if listen.port() != local.port() {
        return false;
    }
    let Some(want) = listen.ip().map(|ip| ip.to_canonical()) else {
        return true;
    };
    let have = local.ip().to_canonical();
    if have == want {
        return true;
    }
    match (want, have) {
        (_, IpAddr::V6(h)) if h.is_unspecified() => true,
        (IpAddr::V4(_), IpAddr::V4(h)) => h.is_unspecified(),
        _ => false,
    }
}

/// The listeners among `all` that `svc` shadows: those on its listen address
/// ([`overlaps`]) that are not the socket a subset is served by (the best of
/// [`candidates`] for its address). Sorted as `all` is.
pub fn shadowed_by(svc: &ServiceConfig, all: &[Listener]) -> Vec<Listener> {
    shadowed_in(svc, &ListenersByPort::new(all))
}

/// Listeners indexed by port, so that checking many services costs one pass over the
/// listeners, not one per service.
#[derive(Debug, Default)]
pub struct ListenersByPort(HashMap<u16, Vec<Listener>>);

impl ListenersByPort {
    /// Indexes `all` (each port's listeners keep the order of `all`).
    pub fn new(all: &[Listener]) -> Self {
        let mut by_port: HashMap<u16, Vec<Listener>> = HashMap::new();
        for l in all {
            by_port.entry(l.local.port()).or_default().push(*l);
        }
        Self(by_port)
    }

    fn on(&self, port: u16) -> &[Listener] {
        self.0.get(&port).map_or(&[][..], Vec::as_slice)
    }
}

/// [`shadowed_by`] over indexed listeners.
pub fn shadowed_in(svc: &ServiceConfig, listeners: &ListenersByPort) -> Vec<Listener> {
    let overlapping: Vec<Listener> = listeners
        .on(svc.listen.port())
        .iter()
        .filter(|l| overlaps(&svc.listen, l.local))
        .copied()
        .collect();
    if overlapping.is_empty() {
        return overlapping;
    }
    let own: HashSet<u64> = svc
        .subsets
        .iter()
        .filter_map(|s| {
            candidates(s.addr, listeners.on(s.addr.port()))
                .first()
                .map(|l| l.inode)
        })
        .collect();
    overlapping
        .into_iter()
        .filter(|l| !own.contains(&l.inode))
        .collect()
}

/// [`shadowed_in`] for every protocol `svc` steers: the TCP listeners among `tcp` for a
/// service steering TCP, the bound unconnected UDP sockets among `udp` ([`super::udp_sockets`])
/// for one steering UDP (a UDP server on the port is taken over as a TCP listener is).
pub fn shadowed_by_protocol(
    svc: &ServiceConfig,
    tcp: &ListenersByPort,
    udp: &ListenersByPort,
) -> Vec<Listener> {
    let mut out = if svc.protocol.tcp() {
        shadowed_in(svc, tcp)
    } else {
        Vec::new()
    };
    if svc.protocol.udp() {
        out.extend(shadowed_in(svc, udp));
    }
    out
}

/// Who holds each of `listeners`: one walk over `/proc`, a process other than this one
/// preferred.
pub fn describe(listeners: &[Listener]) -> Result<Vec<ShadowedListener>, DiscoveryError> {
    if listeners.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: HashSet<u64> = listeners.iter().map(|l| l.inode).collect();
    let mut holders: HashMap<u64, Process> = HashMap::new();
    procfs::walk_sockets(|process, _fd, inode| {
        if wanted.contains(&inode) {
            let slot = holders.entry(inode).or_insert(*process);
            if slot.is_current() {
                *slot = *process;
            }
        }
        ControlFlow::<()>::Continue(())
    })?;
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    Ok(listeners
        .iter()
        .map(|l| {
            let holder = holders.get(&l.inode);
            ShadowedListener {
                address: l.local,
                inode: l.inode,
                pid: holder.map(Process::pid),
                process: holder.map(Process::comm).unwrap_or_default(),
                user: holder
                    .and_then(|p| p.uid().ok())
                    .map(|uid| user_name(&passwd, uid))
                    .unwrap_or_default(),
            }
        })
        .collect())
}

/// The name of `uid` in the text of `/etc/passwd`, else the number.
fn user_name(passwd: &str, uid: u32) -> String {
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id: u32 = fields.nth(1)?.parse().ok()?;
            (id == uid).then(|| name.to_owned())
        })
        .unwrap_or_else(|| uid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SubsetConfig;

    fn l(inode: u64, local: &str) -> Listener {
        Listener {
            inode,
            local: local.parse().unwrap(),
        }
    }

    #[test]
    fn overlapping_addresses() {
        let any: Listen = "2222".parse().unwrap();
        let lo: Listen = "127.0.0.1:2222".parse().unwrap();
        let lo6: Listen = "[::1]:2222".parse().unwrap();
        let yes = |listen: &Listen, local: &str| overlaps(listen, local.parse().unwrap());
        for local in ["0.0.0.0:2222", "[::]:2222", "127.0.0.2:2222", "[::1]:2222"] {
            assert!(yes(&any, local), "{local}");
        }
        assert!(!yes(&any, "0.0.0.0:2223"));
        for local in [
            "127.0.0.1:2222",
            "0.0.0.0:2222",
            "[::]:2222",
            "[::ffff:127.0.0.1]:2222",
        ] {
            assert!(yes(&lo, local), "{local}");
        }
        for local in ["127.0.0.2:2222", "[::1]:2222", "127.0.0.1:2223"] {
            assert!(!yes(&lo, local), "{local}");
        }
        assert!(yes(&lo6, "[::]:2222"));
        assert!(yes(&lo6, "[::1]:2222"));
        assert!(!yes(&lo6, "0.0.0.0:2222"));
        assert!(!yes(&lo6, "[::2]:2222"));
    }

    #[test]
    fn the_subsets_own_sockets_are_not_shadowed() {
        let svc = ServiceConfig {
            name: "s".into(),
            listen: "8080".parse().unwrap(),
            subsets: vec![SubsetConfig {
                name: "v1".into(),
                addr: "127.0.0.2:8080".parse().unwrap(),
                weight: 1,
                owner: Default::default(),
            }],
            take_over: false,
            fail_closed: false,
            balance: Default::default(),
            protocol: Default::default(),
        };
        let all = [
            l(1, "0.0.0.0:8080"),
            l(2, "127.0.0.2:8080"),
            l(3, "127.0.0.1:9000"),
        ];
        assert_eq!(shadowed_by(&svc, &all), [l(1, "0.0.0.0:8080")]);
        assert!(shadowed_by(&svc, &all[1..]).is_empty());
    }

    #[test]
    fn user_names_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\n";
        assert_eq!(user_name(passwd, 0), "root");
        assert_eq!(user_name(passwd, 1000), "bob");
        assert_eq!(user_name(passwd, 7), "7");
    }
}
