//! Services, subsets and where they listen: the domain every input format translates into.
//!
//! Nothing here knows YAML or BPF: the loader configuration ([`crate::config`]), the Istio
//! objects ([`crate::istio`]) and the kernel maps ([`crate::state`]) all speak these types.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tcpshift_common::{SERVICE_NAME_LEN, SUBSET_NAME_LEN};

/// Longest service name, in bytes (names are stored NUL-terminated in
/// [`SERVICE_NAME_LEN`] bytes).
pub const MAX_SERVICE_NAME: usize = SERVICE_NAME_LEN - 1;
/// Longest subset name, in bytes (names are stored NUL-terminated in [`SUBSET_NAME_LEN`]
/// bytes).
pub const MAX_SUBSET_NAME: usize = SUBSET_NAME_LEN - 1;

/// One service: where it listens and the subsets (versions) its connections are shifted
/// between.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Service name: 1 to [`MAX_SERVICE_NAME`] bytes of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Where the service accepts connections.
    pub listen: Listen,
    /// The subsets, in the order written in the YAML (1 to [`MAX_SUBSETS`] of them). Their
    /// indices are the subset indices used in the kernel maps.
    pub subsets: Vec<SubsetConfig>,
    /// Whether the service may take over a listen address on which another server (not one of
    /// its subsets) already listens (`takeOver: true`). Only checked when the service is
    /// created or its listen address changes; not stored in the kernel (read back as `false`).
    pub take_over: bool,
    /// Whether the service fails closed (`failClosed: true`): while no subset has a live
    /// socket its new connections are refused by tcpshift (`SK_DROP`) instead of seeing the
    /// normal lookup, where another socket bound to the listen address could take them.
    /// Stored in the kernel (`ServiceEntry::flags`).
    pub fail_closed: bool,
    /// How new connections are placed on the subsets (stored in the kernel entry's `mode`).
    pub balance: super::Balance,
    /// Which traffic the service steers: TCP connections, UDP flows or both (`protocol:`,
    /// default TCP).
    pub protocol: Protocol,
}

/// Which transport protocols a service steers (`protocol: tcp`, `udp` or `tcp+udp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP connections (the default).
    #[default]
    Tcp,
    /// UDP flows: each flow (4-tuple) stays on the subset its first datagram chose.
    Udp,
    /// Both, on the same port (like DNS on 53): the subsets' TCP listening sockets and UDP
    /// sockets, at the same backend addresses.
    TcpUdp,
}

/// The accepted spellings of [`Protocol`], for messages.
pub const PROTOCOL_FORMS: &str = "tcp, udp or tcp+udp";

impl Protocol {
    /// Whether TCP connections are steered.
    pub fn tcp(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::TcpUdp)
    }

    /// Whether UDP flows are steered.
    pub fn udp(self) -> bool {
        matches!(self, Protocol::Udp | Protocol::TcpUdp)
    }

    /// Parses `tcp`, `udp` or `tcp+udp` (any case; `udp+tcp` too).
    pub fn parse(s: &str) -> Result<Protocol, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "tcp+udp" | "udp+tcp" => Ok(Protocol::TcpUdp),
            other => Err(format!(
                "unknown protocol {other:?}; expected {PROTOCOL_FORMS}"
            )),
        }
    }

    /// The name written in configurations: `tcp`, `udp` or `tcp+udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::TcpUdp => "tcp+udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Protocol, String> {
        Protocol::parse(s)
    }
}

/// One subset (version) of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsetConfig {
    /// Subset name: 1 to [`MAX_SUBSET_NAME`] bytes of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Address where this version's server listens (non-zero port).
    pub addr: SocketAddr,
    /// Relative weight, `0..=`[`MAX_WEIGHT`]. The weights of a service sum to more than 0.
    pub weight: u32,
    /// Who may serve it; empty: trust on first registration (see [`OwnerRule`]).
    pub owner: OwnerRule,
}

/// Who may serve a subset: a socket found on its address is registered only if it matches
/// every part given. With no part given, the uid whose socket was registered first (and root)
/// may serve it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct OwnerRule {
    /// The uid that must have created the socket.
    pub uid: Option<u32>,
    /// The cgroup v2 path (e.g. `/system.slice/x.service`) the process holding the socket
    /// must be in, or below.
    pub cgroup: Option<String>,
}

impl OwnerRule {
    /// Whether no part is given (trust on first registration).
    pub fn is_empty(&self) -> bool {
        self.uid.is_none() && self.cgroup.is_none()
    }

    /// Whether a socket created by `uid`, held by a process in cgroup `cgroup`, matches.
    pub fn allows(&self, uid: u32, cgroup: Option<&str>) -> bool {
        let uid_ok = self.uid.is_none_or(|u| u == uid);
        let cgroup_ok = self.cgroup.as_deref().is_none_or(|want| {
            let want = want.trim_end_matches('/');
            cgroup.is_some_and(|have| {
                have == want || (have.starts_with(want) && have[want.len()..].starts_with('/'))
            })
        });
        uid_ok && cgroup_ok
    }
}

/// Where a service listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Listen {
    /// Any local address (IPv4 and IPv6) on this port. Written `31400`, `"*:31400"`,
    /// `"0.0.0.0:31400"` or `"[::]:31400"`.
    Any {
        /// The port, never 0.
        port: u16,
    },
    /// One specific local address. Written `"127.0.0.1:31400"` or `"[::1]:31400"`; the port
    /// is never 0 and the address is never unspecified (that is [`Listen::Any`]).
    Addr(SocketAddr),
}

impl ServiceConfig {
    /// The weights of the subsets, in subset order.
    pub fn weights(&self) -> Vec<u32> {
        self.subsets.iter().map(|s| s.weight).collect()
    }

    /// The subset called `name`, if any.
    pub fn subset(&self, name: &str) -> Option<&SubsetConfig> {
        self.subsets.iter().find(|s| s.name == name)
    }
}

// ---------------------------------------------------------------------------------------------
// Listen

impl Listen {
    /// The port the service listens on.
    pub fn port(&self) -> u16 {
        match self {
            Listen::Any { port } => *port,
            Listen::Addr(addr) => addr.port(),
        }
    }

    /// The specific local address, or `None` for [`Listen::Any`].
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Listen::Any { .. } => None,
            Listen::Addr(addr) => Some(addr.ip()),
        }
    }

    /// Parses `PORT`, `*:PORT`, `IPv4:PORT` or `[IPv6]:PORT`. An unspecified address
    /// (`0.0.0.0`, `[::]`) means [`Listen::Any`]. The port must be in `1..=65535`. The error
    /// says what was wrong and which forms are accepted.
    pub fn parse(s: &str) -> Result<Listen, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err(format!("empty listen address; expected {LISTEN_FORMS}"));
        }
        if t.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Listen::Any {
                port: parse_port(t)?,
            });
        }
        if let Some(port) = t.strip_prefix("*:") {
            if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
                return Ok(Listen::Any {
                    port: parse_port(port)?,
                });
            }
            return Err(format!(
                "invalid port in listen address {t:?}; expected {LISTEN_FORMS}"
            ));
        }
        let addr = parse_socket_addr(t, "listen address", LISTEN_FORMS)?;
        check_port(addr.port(), t)?;
        if addr.ip().to_canonical().is_unspecified() {
            Ok(Listen::Any { port: addr.port() })
        } else {
            Ok(Listen::Addr(addr))
        }
    }

    /// The listen address with IPv4-mapped IPv6 addresses turned into IPv4 and the IPv6
    /// scope and flow information dropped: two listens with the same key are the same kernel
    /// map entry.
    pub fn key(&self) -> ListenKey {
        match self {
            Listen::Any { port } => ListenKey {
                ip: None,
                port: *port,
            },
            Listen::Addr(addr) => ListenKey {
                ip: Some(addr.ip().to_canonical()),
                port: addr.port(),
            },
        }
    }
}

pub(crate) const LISTEN_FORMS: &str =
    "a port (31400), IPv4:PORT (127.0.0.1:31400) or [IPv6]:PORT ([::1]:31400)";
pub(crate) const SUBSET_FORMS: &str =
    "IPv4:PORT (127.0.0.1:9001) or [IPv6]:PORT (\"[::1]:9001\", quoted)";

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Any { port } => write!(f, "*:{port}"),
            Listen::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        Listen::parse(s)
    }
}

fn parse_port(digits: &str) -> Result<u16, String> {
    match digits.parse::<u64>() {
        Ok(v) => port_number(v),
        Err(_) => Err(format!(
            "port {digits} is out of range; expected a port number in 1..=65535"
        )),
    }
}

/// A port given as a number: `1..=65535`. The one check of port numbers, for every input
/// format (a YAML integer, the digits of a listen address).
pub fn port_number(v: u64) -> Result<u16, String> {
    match u16::try_from(v) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "port {v} is out of range; expected a port number in 1..=65535"
        )),
    }
}

pub(crate) fn check_port(port: u16, written: &str) -> Result<(), String> {
    if port == 0 {
        Err(format!(
            "port 0 in {written:?} is not allowed; expected a fixed port in 1..=65535"
        ))
    } else {
        Ok(())
    }
}

/// Parses `IPv4:PORT` or `[IPv6]:PORT`, explaining the common mistakes (host names, IPv6
/// without brackets, missing port). `what` names the value, `forms` lists the accepted forms.
fn parse_socket_addr(s: &str, what: &str, forms: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bracketed = t.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
    if let Ok(IpAddr::V6(_)) = t.parse::<IpAddr>()
        && let Some((host, port)) = t.rsplit_once(':')
        && host.parse::<Ipv6Addr>().is_ok()
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!(
            "{what} {t:?} has no port: an IPv6 address and its port are written with \
             brackets, e.g. \"[{host}]:{port}\"; expected {forms}"
        ));
    }
    if t.parse::<IpAddr>().is_ok() || bracketed.is_some_and(|a| a.parse::<Ipv6Addr>().is_ok()) {
        return Err(format!("{what} {t:?} has no port; expected {forms}"));
    }
    let (host, port) = match t.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (t, None),
    };
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    if let Some(port) = port {
        if bare_host.parse::<Ipv6Addr>().is_ok() && !host.starts_with('[') {
            return Err(format!(
                "{what} {t:?}: an IPv6 address must be written in brackets, \
                 e.g. \"[{bare_host}]:{port}\"; expected {forms}"
            ));
        }
        if bare_host.parse::<IpAddr>().is_ok() {
            if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "port {port} in {what} {t:?} is out of range; expected 1..=65535"
                ));
            }
            return Err(format!(
                "invalid port {port:?} in {what} {t:?}; expected {forms}"
            ));
        }
    }
    let looks_like_host = !bare_host.is_empty()
        && bare_host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        && bare_host.bytes().any(|b| b.is_ascii_alphabetic());
    if looks_like_host {
        return Err(format!(
            "{what} {t:?}: {bare_host:?} is a host name but an IP address is needed \
             (names are not resolved); expected {forms}"
        ));
    }
    Err(format!("invalid {what} {t:?}; expected {forms}"))
}

/// Parses a subset's address: `IPv4:PORT` or `[IPv6]:PORT` with a non-zero port. Host names
/// are rejected (an IP address is needed).
pub fn parse_subset_addr(s: &str) -> Result<SocketAddr, String> {
    let addr = parse_socket_addr(s, "subset address", SUBSET_FORMS)?;
    check_port(addr.port(), s.trim())?;
    Ok(addr)
}

// ---------------------------------------------------------------------------------------------
// Names

/// Checks a service name: 1 to [`MAX_SERVICE_NAME`] bytes of `[A-Za-z0-9._-]`.
pub fn validate_service_name(name: &str) -> Result<(), String> {
    validate_name(name, MAX_SERVICE_NAME, "service")
}

/// Checks a subset name: 1 to [`MAX_SUBSET_NAME`] bytes of `[A-Za-z0-9._-]`.
pub fn validate_subset_name(name: &str) -> Result<(), String> {
    validate_name(name, MAX_SUBSET_NAME, "subset")
}

pub(crate) fn name_byte_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'
}

fn validate_name(name: &str, max: usize, kind: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!(
            "empty {kind} name; use 1 to {max} characters from A-Z a-z 0-9 . _ -"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !c.is_ascii() || !name_byte_ok(c as u8))
    {
        return Err(format!(
            "{kind} name {name:?} contains {c:?}; use only characters from A-Z a-z 0-9 . _ -"
        ));
    }
    if name.len() > max {
        return Err(format!(
            "{kind} name {name:?} is {} bytes long; at most {max} are allowed",
            name.len()
        ));
    }
    Ok(())
}

impl Listen {
    /// True when `self` and `other` are the same kernel map entry (IPv4-mapped IPv6 addresses
    /// equal their IPv4 address; IPv6 scope and flow information are ignored).
    pub fn same_key(&self, other: &Listen) -> bool {
        self.key() == other.key()
    }
}
/// What makes two listen addresses the same kernel map entry: IPv4-mapped IPv6 addresses
/// equal their IPv4 address, IPv6 scope and flow information are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenKey {
    /// The canonical address, `None` for any local address.
    pub ip: Option<IpAddr>,
    /// The port.
    pub port: u16,
}

/// The rule "one listen address per service": services claim their listen keys one by one,
/// and a claim on a key another service holds is refused.
#[derive(Debug, Default, Clone)]
pub struct ListenClaims {
    owners: HashMap<ListenKey, String>,
    /// UDP claims (TCP ones are `owners`), with the claiming service's protocol.
    udp_owners: HashMap<ListenKey, (String, Protocol)>,
}

/// A listen address already claimed by another service (see [`ListenClaims::claim`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "service {service:?} would listen on {listen}, which service {owner:?} already uses; each \
     service needs its own port or address"
)]
pub struct ListenTaken {
    /// The service that claimed the address.
    pub service: String,
    /// The address that was claimed again.
    pub listen: Listen,
    /// The service that holds it.
    pub owner: String,
}

impl ListenClaims {
    /// An empty set of claims.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `listen` for `service`. Claiming a key again for the same service is allowed.
    pub fn claim(&mut self, listen: &Listen, service: &str) -> Result<(), ListenTaken> {
        match self.owners.get(&listen.key()) {
            Some(owner) if owner != service => Err(ListenTaken {
                service: service.to_owned(),
                listen: *listen,
                owner: owner.clone(),
            }),
            Some(_) => Ok(()),
            None => {
                self.owners.insert(listen.key(), service.to_owned());
                Ok(())
            }
        }
    }

    /// The service holding `listen`'s key, if any.
    pub fn owner(&self, listen: &Listen) -> Option<&str> {
        self.owners.get(&listen.key()).map(String::as_str)
    }

    /// Claims `listen` for `service` for each protocol of `protocol`: a TCP and a UDP service
    /// may share a listen address, two services steering the same protocol may not.
    pub fn claim_protocol(
        &mut self,
        listen: &Listen,
        protocol: Protocol,
        service: &str,
    ) -> Result<(), ListenTaken> {
        if protocol.udp()
            && let Some((owner, _)) = self.udp_owners.get(&listen.key())
            && owner != service
        {
            return Err(ListenTaken {
                service: service.to_owned(),
                listen: *listen,
                owner: owner.clone(),
            });
        }
        if protocol.tcp() {
            self.claim(listen, service)?;
        }
        if protocol.udp() {
            self.udp_owners
                .insert(listen.key(), (service.to_owned(), protocol));
        }
        Ok(())
    }

    /// The service holding `listen` for any protocol of `protocol`, if any.
    pub fn owner_protocol(&self, listen: &Listen, protocol: Protocol) -> Option<&str> {
        let tcp = protocol.tcp().then(|| self.owner(listen)).flatten();
        tcp.or_else(|| {
            protocol
                .udp()
                .then(|| self.udp_owners.get(&listen.key()).map(|(o, _)| o.as_str()))
                .flatten()
        })
    }

    /// The service whose kernel entry is stored under the key of a `protocol` service at
    /// `listen` (a `tcp` or `tcp+udp` service under the TCP key, a `udp` one under the UDP
    /// key), if any.
    pub fn key_holder(&self, listen: &Listen, protocol: Protocol) -> Option<&str> {
        if protocol.tcp() {
            self.owner(listen)
        } else {
            match self.udp_owners.get(&listen.key()) {
                Some((o, Protocol::Udp)) => Some(o.as_str()),
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_and_v4_are_one_key() {
        let a = Listen::parse("127.0.0.1:31400").unwrap();
        let b = Listen::parse("[::ffff:127.0.0.1]:31400").unwrap();
        assert!(a.same_key(&b));
        let mut claims = ListenClaims::new();
        claims.claim(&a, "one").unwrap();
        let err = claims.claim(&b, "two").unwrap_err();
        assert_eq!(err.owner, "one");
        assert!(claims.claim(&b, "one").is_ok());
        assert_eq!(
            err.to_string(),
            "service \"two\" would listen on [::ffff:127.0.0.1]:31400, which service \"one\" \
             already uses; each service needs its own port or address"
        );
    }

    #[test]
    fn tcp_and_udp_services_share_a_port() {
        let l = Listen::parse("53").unwrap();
        let mut claims = ListenClaims::new();
        claims.claim_protocol(&l, Protocol::Tcp, "tcp").unwrap();
        claims.claim_protocol(&l, Protocol::Udp, "udp").unwrap();
        let err = claims
            .claim_protocol(&l, Protocol::TcpUdp, "both")
            .unwrap_err();
        assert_eq!(err.owner, "udp");
        assert_eq!(claims.owner_protocol(&l, Protocol::Udp), Some("udp"));
        assert_eq!(claims.key_holder(&l, Protocol::Udp), Some("udp"));
        assert_eq!(claims.key_holder(&l, Protocol::Tcp), Some("tcp"));
        assert_eq!(Protocol::parse("TCP+UDP"), Ok(Protocol::TcpUdp));
        assert!(
            Protocol::parse("sctp")
                .unwrap_err()
                .contains("tcp, udp or tcp+udp")
        );
    }

    #[test]
    fn any_and_specific_address_are_different_keys() {
        let a = Listen::parse("31400").unwrap();
        let b = Listen::parse("127.0.0.1:31400").unwrap();
        let mut claims = ListenClaims::new();
        claims.claim(&a, "one").unwrap();
        claims.claim(&b, "two").unwrap();
        assert_eq!(claims.owner(&Listen::Any { port: 31400 }), Some("one"));
    }
}

#[cfg(test)]
mod owner_rule_tests {
    use super::OwnerRule;

    #[test]
    fn a_rule_matches_every_part_it_names() {
        assert!(OwnerRule::default().is_empty());
        let user = OwnerRule {
            uid: Some(1000),
            cgroup: None,
        };
        assert!(user.allows(1000, None));
        assert!(!user.allows(0, None));
        let cgroup = OwnerRule {
            uid: None,
            cgroup: Some("/system.slice/x.service".into()),
        };
        assert!(cgroup.allows(0, Some("/system.slice/x.service")));
        assert!(cgroup.allows(7, Some("/system.slice/x.service/worker")));
        assert!(!cgroup.allows(0, Some("/system.slice/x.service2")));
        assert!(!cgroup.allows(0, None));
        let both = OwnerRule {
            uid: Some(1000),
            cgroup: Some("/a".into()),
        };
        assert!(both.allows(1000, Some("/a")));
        assert!(!both.allows(1001, Some("/a")));
    }
}
