//! Translation between the domain types and the kernel's records: `ServiceMeta` and
//! `SubsetMeta` (a [`Definition`]), `ServiceEntry`, `ServiceKey`, fixed-size names, and the
//! annotations of `TS_ROUTES`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Deref,
};

use aya::maps::{HashMap, MapData, MapError};
use tcpshift_common::{
    IPPROTO_TCP, IPPROTO_UDP, MAX_SUBSETS, SUBSET_NAME_LEN, ServiceEntry, ServiceKey, ServiceMeta,
    SubsetMeta, mode, protocols, service_flags,
};

use crate::{
    model::{Balance, Listen, Protocol, ServiceConfig},
    weights,
};

use super::error::*;

/// The `TS_SERVICES` entry of service `id` with weights `ws` and the ranges derived from them
/// ([`weights::bounds`]), with `config`'s per-service settings (fail-closed, balance,
/// protocol; a round-robin service's sequence period, [`weights::round_robin_period`]). Error
/// for weights no service can have (none above 0, too many, too large: the plan checked them).
pub(super) fn new_entry(id: u32, ws: &[u32], config: &ServiceConfig) -> Result<ServiceEntry> {
    let ws = &ws[..ws.len().min(MAX_SUBSETS)];
    let (fail_closed, balance, protocol) = (config.fail_closed, config.balance, config.protocol);
    let n_subsets = config.subsets.len().min(MAX_SUBSETS) as u8;
    let mut weights = [0u32; MAX_SUBSETS];
    let mut weighted_mask = 0;
    for (i, w) in ws.iter().enumerate().take(MAX_SUBSETS) {
        weights[i] = *w;
        if *w > 0 {
            weighted_mask |= 1 << i;
        }
    }
    Ok(ServiceEntry {
        id,
        mode: entry_mode(balance),
        n_subsets,
        flags: entry_flags(protocol)
            | if fail_closed {
                service_flags::FAIL_CLOSED
            } else {
                0
            },
        weighted_mask,
        weights,
        bounds: weights::bounds(ws)?,
        rr_period: if balance == Balance::RoundRobin {
            weights::round_robin_period(ws)?
        } else {
            0
        },
        fallback_order: fallback_order(ws),
    })
}

/// The order in which the data path tries the subsets when the chosen one has no live socket
/// ([`ServiceEntry::fallback_order`]): those with a weight above 0, then the others, each group
/// by index; unused entries 0.
pub(super) fn fallback_order(ws: &[u32]) -> [u8; MAX_SUBSETS] {
    let mut order = [0u8; MAX_SUBSETS];
    let weighted = (0..ws.len()).filter(|&i| ws[i] > 0);
    let rest = (0..ws.len()).filter(|&i| ws[i] == 0);
    for (slot, i) in order.iter_mut().zip(weighted.chain(rest)) {
        // i < MAX_SUBSETS <= 32.
        *slot = i as u8;
    }
    order
}

/// [`ServiceEntry::mode`] of a [`Balance`].
pub(super) fn entry_mode(balance: Balance) -> u8 {
    match balance {
        Balance::Hash => mode::HASH_CONNECTION,
        Balance::SourceIp => mode::HASH_SOURCE_IP,
        Balance::RoundRobin => mode::ROUND_ROBIN,
    }
}

/// The [`Balance`] of a [`ServiceEntry::mode`] (an unknown mode steers as the hash mode).
pub(super) fn balance_of(entry_mode: u8) -> Balance {
    match entry_mode {
        mode::HASH_SOURCE_IP => Balance::SourceIp,
        mode::ROUND_ROBIN => Balance::RoundRobin,
        _ => Balance::Hash,
    }
}

/// Size of a `TS_ROUTES` value: a little-endian `u16` length, then the annotation's bytes.
pub(super) const ROUTE_VALUE_SIZE: usize = 1024;
/// Longest annotation stored with a service, in bytes.
pub const MAX_ANNOTATION: usize = ROUTE_VALUE_SIZE - 2;
/// `BPF_F_NO_PREALLOC`: entries are allocated as they are written.
pub(super) const BPF_F_NO_PREALLOC: u32 = 1;

pub(super) type RouteValue = [u8; ROUTE_VALUE_SIZE];
pub(super) type RoutesMap = HashMap<MapData, u32, RouteValue>;

pub(super) fn read_annotation(routes: &RoutesMap, id: u32) -> Result<Option<String>> {
    match routes.get(&id, 0) {
        Ok(v) => {
            let len = usize::from(u16::from_le_bytes([v[0], v[1]])).min(MAX_ANNOTATION);
            let body = v.get(2..2 + len).unwrap_or_default();
            Ok(Some(String::from_utf8_lossy(body).into_owned()))
        }
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_err("cannot read an annotation")(e)),
    }
}

/// The `TS_ROUTES` value holding `text` (cut at [`MAX_ANNOTATION`] bytes; the plan refuses
/// longer ones).
pub(super) fn encode_annotation(text: &str) -> RouteValue {
    let mut v: RouteValue = [0; ROUTE_VALUE_SIZE];
    let b = text.as_bytes();
    let n = b.len().min(MAX_ANNOTATION);
    v[..2].copy_from_slice(&(n as u16).to_le_bytes());
    v[2..2 + n].copy_from_slice(&b[..n]);
    v
}

/// The [`service_flags`] a service steering `protocol` needs: [`service_flags::UDP`] for a
/// `tcp+udp` service (stored under its TCP key).
pub(super) fn entry_flags(p: Protocol) -> u16 {
    if p == Protocol::TcpUdp {
        service_flags::UDP
    } else {
        0
    }
}

/// The [`tcpshift_common::protocols`] bits of a protocol.
pub(super) fn protocol_bits(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => protocols::TCP,
        Protocol::Udp => protocols::UDP,
        Protocol::TcpUdp => protocols::TCP | protocols::UDP,
    }
}

/// The protocol of [`tcpshift_common::protocols`] bits (0, from before UDP, is TCP).
pub(super) fn protocol_of(bits: u8) -> Protocol {
    match (bits & protocols::TCP != 0, bits & protocols::UDP != 0) {
        (true, true) => Protocol::TcpUdp,
        (false, true) => Protocol::Udp,
        _ => Protocol::Tcp,
    }
}

/// The `TS_SERVICES` key of a service steering `protocol` at `listen`: a `udp` service is
/// stored under the UDP key, a `tcp` or `tcp+udp` one under the TCP key.
pub fn service_key_for(listen: &Listen, protocol: Protocol) -> ServiceKey {
    let mut key = service_key(listen);
    if !protocol.tcp() {
        key.proto = IPPROTO_UDP;
    }
    key
}

/// The `TS_SERVICES` key of a TCP service's listen address.
pub fn service_key(listen: &Listen) -> ServiceKey {
    let addr = match listen {
        Listen::Any { .. } => [0; 16],
        Listen::Addr(a) => ip_bytes(a.ip()),
    };
    ServiceKey {
        addr,
        port: listen.port(),
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

pub(super) fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A service's definition as userspace stores it: its `TS_META` record and the
/// `TS_SUBSET_META` records of its subsets (slots `0..n_subsets`, by index). Derefs to the
/// service's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Definition {
    /// The `TS_META` record.
    pub(super) service: ServiceMeta,
    /// The subsets' records, `service.n_subsets` of them.
    pub(super) subsets: Vec<SubsetMeta>,
}

impl Deref for Definition {
    type Target = ServiceMeta;

    fn deref(&self) -> &ServiceMeta {
        &self.service
    }
}

/// The `TS_SUBSET_META` record standing in for one that is missing (a definition being
/// written or removed while it is read without the lock): no name, no address.
pub(super) const NO_SUBSET: SubsetMeta = SubsetMeta {
    name: [0; SUBSET_NAME_LEN],
    addr: [0; 16],
    port: 0,
    family: 0,
    _pad: [0; 5],
};

/// The records of `svc`'s definition.
pub(super) fn service_meta(svc: &ServiceConfig) -> Definition {
    let subsets = svc
        .subsets
        .iter()
        .take(MAX_SUBSETS)
        .map(|s| SubsetMeta {
            name: name_bytes(&s.name),
            addr: ip_bytes(s.addr.ip()),
            port: s.addr.port(),
            family: if s.addr.is_ipv4() { 4 } else { 6 },
            _pad: [0; 5],
        })
        .collect::<Vec<_>>();
    Definition {
        service: ServiceMeta {
            name: name_bytes(&svc.name),
            key: service_key_for(&svc.listen, svc.protocol),
            listen_family: match svc.listen {
                Listen::Any { .. } => 0,
                Listen::Addr(a) if a.is_ipv4() => 4,
                Listen::Addr(_) => 6,
            },
            // At most MAX_SUBSETS (16).
            n_subsets: subsets.len() as u8,
            protocols: protocol_bits(svc.protocol),
            _pad: 0,
        },
        subsets,
    }
}

pub(super) fn name_bytes<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let b = s.as_bytes();
    let n = b.len().min(N - 1);
    out[..n].copy_from_slice(&b[..n]);
    out
}

pub(super) fn name_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub(super) fn subset_addr(s: &SubsetMeta) -> SocketAddr {
    let v6 = Ipv6Addr::from(s.addr);
    let ip = match (s.family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, s.port)
}

pub(super) fn listen_of(meta: &ServiceMeta) -> Listen {
    let v6 = Ipv6Addr::from(meta.key.addr);
    match meta.listen_family {
        0 => Listen::Any {
            port: meta.key.port,
        },
        4 => Listen::Addr(SocketAddr::new(
            IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
            meta.key.port,
        )),
        _ => Listen::Addr(SocketAddr::new(IpAddr::V6(v6), meta.key.port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_config(subsets: u16) -> ServiceConfig {
        ServiceConfig {
            name: "a".into(),
            listen: Listen::parse("127.0.0.1:31400").expect("listen"),
            subsets: (0..subsets)
                .map(|i| crate::model::SubsetConfig {
                    name: format!("v{i}"),
                    addr: ([127, 0, 0, 1], 9000 + i).into(),
                    weight: 1,
                    owner: Default::default(),
                })
                .collect(),
            take_over: false,
            fail_closed: false,
            balance: Balance::Hash,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn a_definition_has_one_subset_record_per_subset_and_reads_back() {
        let mut config = test_config(2);
        config.subsets[1].addr = "[::1]:9001".parse().expect("addr");
        let def = service_meta(&config);
        assert_eq!((def.n_subsets, def.subsets.len()), (2, 2));
        assert_eq!(name_str(&def.name), "a");
        assert_eq!(listen_of(&def), config.listen);
        let back: Vec<_> = def
            .subsets
            .iter()
            .map(|s| (name_str(&s.name), subset_addr(s)))
            .collect();
        assert_eq!(
            back,
            vec![
                ("v0".to_string(), config.subsets[0].addr),
                ("v1".to_string(), config.subsets[1].addr)
            ]
        );
        assert_eq!(service_meta(&test_config(16)).subsets.len(), 16);
    }

    #[test]
    fn fallback_order_weighted_first() {
        assert_eq!(&fallback_order(&[0, 5, 0, 1])[..4], &[1, 3, 0, 2]);
        assert_eq!(&fallback_order(&[100])[..1], &[0]);
        let mut config = test_config(3);
        config.balance = Balance::RoundRobin;
        let e = new_entry(7, &[0, 80, 20], &config).unwrap();
        assert_eq!(
            (e.mode, e.rr_period, &e.fallback_order[..3]),
            (mode::ROUND_ROBIN, 100, &[1u8, 2, 0][..])
        );
        assert_eq!(&e.bounds[..3], &[0, 13107, 16384]);
        let mut config = test_config(2);
        config.balance = Balance::SourceIp;
        let e = new_entry(7, &[80, 20], &config).unwrap();
        assert!(new_entry(7, &[0, 0], &config).is_err());
        assert_eq!((e.mode, e.rr_period), (mode::HASH_SOURCE_IP, 0));
        for b in [Balance::Hash, Balance::SourceIp, Balance::RoundRobin] {
            assert_eq!(balance_of(entry_mode(b)), b);
        }
    }
}
