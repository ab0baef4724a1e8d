//! The keys under the store's prefix and the JSON records they hold.
//!
//! With the default prefix `/tcpshift/v1/`:
//!
//! | key | value | written by |
//! |---|---|---|
//! | `/tcpshift/v1/desired/meta` | `{"generation":N}` | every change of the desired state |
//! | `/tcpshift/v1/desired/services/NAME` | a [`ServiceRecord`] | apply, set-weight, delete |
//! | `/tcpshift/v1/desired/seed` | `{"seed":N}`, the fleet's hash seed | created once |
//! | `/tcpshift/v1/nodes/NODE` | a [`super::NodeReport`], under the node's lease | each tcpshiftd |
//! | `/tcpshift/v1/rollouts/…` | fleet rollouts: records, driver, nodes' signals (see [`super::rollouts`]) | rollouts |
//!
//! Every change of the desired state is one etcd transaction that compares the `meta` key's
//! mod revision with the one the writer read, rewrites `meta` with the generation plus one and
//! puts or deletes the service keys that changed. The **desired revision** is therefore the
//! `meta` key's mod revision: nodes report the revision they have applied, and a node is in
//! sync when it equals the store's. Nodes watch `desired/` only, so node reports never wake
//! them. The `v1` in the prefix is the layout version: a tcpshift with another layout uses
//! another prefix instead of misreading this one.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::model::{Balance, Listen, Protocol, ServiceConfig, SubsetConfig, parse_subset_addr};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/tcpshift/v1/";

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// The layout under `prefix` (a trailing `/` is added when missing).
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    /// The prefix, ending with `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Everything a node follows: meta, services and seed.
    pub fn desired_prefix(&self) -> String {
        format!("{}desired/", self.prefix)
    }

    /// The key every change rewrites (its mod revision is the desired revision).
    pub fn meta_key(&self) -> String {
        format!("{}desired/meta", self.prefix)
    }

    /// The fleet's hash seed.
    pub fn seed_key(&self) -> String {
        format!("{}desired/seed", self.prefix)
    }

    /// Prefix of the service keys.
    pub fn services_prefix(&self) -> String {
        format!("{}desired/services/", self.prefix)
    }

    /// The key of service `name`.
    pub fn service_key(&self, name: &str) -> String {
        format!("{}{name}", self.services_prefix())
    }

    /// Prefix of the node reports.
    pub fn nodes_prefix(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    /// The report of node `name`.
    pub fn node_key(&self, name: &str) -> String {
        format!("{}{name}", self.nodes_prefix())
    }

    /// Prefix of the fleet rollouts' keys (see [`super::rollouts`]).
    pub fn rollouts_prefix(&self) -> String {
        format!("{}rollouts/", self.prefix)
    }

    /// What `key` is, if it is one of the desired-state keys.
    pub fn classify(&self, key: &str) -> Option<DesiredKey> {
        if key == self.meta_key() {
            Some(DesiredKey::Meta)
        } else if key == self.seed_key() {
            Some(DesiredKey::Seed)
        } else {
            key.strip_prefix(&self.services_prefix())
                .map(|name| DesiredKey::Service(name.to_string()))
        }
    }
}

/// A key under [`Layout::desired_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesiredKey {
    /// [`Layout::meta_key`].
    Meta,
    /// [`Layout::seed_key`].
    Seed,
    /// [`Layout::service_key`] of this service.
    Service(String),
}

/// The value of [`Layout::meta_key`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaRecord {
    /// How many changes the desired state has had (0 before the first).
    pub generation: u64,
}

/// The value of [`Layout::seed_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRecord {
    /// The hash seed every node's flow hash uses.
    pub seed: u32,
}

/// The value of a service key: the service as `services:` documents write it, plus the
/// annotation a local apply would store with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    /// Listen address, as [`Listen`] prints it (`*:31400`, `127.0.0.1:31400`).
    pub listen: String,
    /// The subsets, in order.
    pub subsets: Vec<SubsetRecord>,
    /// The Istio route the service came from (see [`crate::istio::RouteInfo`]), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotation: Option<String>,
    /// How connections are placed ([`crate::model::Balance::name`]); absent for `hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<String>,
    /// `udp` or `tcp+udp` (see [`Protocol`]); absent for a TCP service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// One subset of a [`ServiceRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsetRecord {
    /// Subset name.
    pub name: String,
    /// Backend address, `IPv4:PORT` or `[IPv6]:PORT`.
    pub addr: String,
    /// Relative weight.
    pub weight: u32,
}

impl ServiceRecord {
    /// The record of `config` with `annotation`.
    pub fn new(config: &ServiceConfig, annotation: Option<&str>) -> Self {
        Self {
            listen: config.listen.to_string(),
            subsets: config
                .subsets
                .iter()
                .map(|s| SubsetRecord {
                    name: s.name.clone(),
                    addr: s.addr.to_string(),
                    weight: s.weight,
                })
                .collect(),
            annotation: annotation.map(str::to_string),
            balance: (config.balance != Balance::Hash).then(|| config.balance.name().to_owned()),
            protocol: (config.protocol != Protocol::Tcp).then(|| config.protocol.to_string()),
        }
    }

    /// The service named `name` this record describes, and its annotation. The error says
    /// which field is wrong.
    pub fn to_config(&self, name: &str) -> Result<(ServiceConfig, Option<String>), String> {
        let listen = Listen::parse(&self.listen).map_err(|e| format!("listen: {e}"))?;
        let balance = match self.balance.as_deref() {
            None => Balance::Hash,
            Some(name) => Balance::from_name(name).ok_or_else(|| {
                format!("balance: unknown mode {name:?}; expected hash, source-ip or round-robin")
            })?,
        };
        let subsets = self
            .subsets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let addr: SocketAddr =
                    parse_subset_addr(&s.addr).map_err(|e| format!("subsets[{i}].addr: {e}"))?;
                Ok(SubsetConfig {
                    name: s.name.clone(),
                    addr,
                    weight: s.weight,
                    owner: Default::default(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let protocol = match &self.protocol {
            Some(p) => Protocol::parse(p).map_err(|e| format!("protocol: {e}"))?,
            None => Protocol::Tcp,
        };
        Ok((
            ServiceConfig {
                name: name.to_string(),
                listen,
                subsets,
                // A take-over is a local decision, checked when a node applies: the fleet's
                // desired state does not carry it.
                take_over: false,
                fail_closed: false,
                balance,
                protocol,
            },
            self.annotation.clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_classification() {
        let l = Layout::new("/t/v1");
        assert_eq!(l.prefix(), "/t/v1/");
        assert_eq!(l.meta_key(), "/t/v1/desired/meta");
        assert_eq!(l.service_key("web"), "/t/v1/desired/services/web");
        assert_eq!(l.node_key("gw-1"), "/t/v1/nodes/gw-1");
        assert_eq!(l.classify("/t/v1/desired/meta"), Some(DesiredKey::Meta));
        assert_eq!(l.classify("/t/v1/desired/seed"), Some(DesiredKey::Seed));
        assert_eq!(
            l.classify("/t/v1/desired/services/web"),
            Some(DesiredKey::Service("web".into()))
        );
        assert_eq!(l.classify("/t/v1/nodes/gw-1"), None);
        assert!(l.rollouts_prefix().starts_with(l.prefix()));
    }

    #[test]
    fn record_round_trip() {
        let config = ServiceConfig {
            name: "tcp-echo".into(),
            listen: Listen::parse("[::1]:31400").unwrap(),
            subsets: vec![
                SubsetConfig {
                    name: "v1".into(),
                    addr: "127.0.0.1:9001".parse().unwrap(),
                    weight: 80,
                    owner: Default::default(),
                },
                SubsetConfig {
                    name: "v2".into(),
                    addr: "[::1]:9002".parse().unwrap(),
                    weight: 20,
                    owner: Default::default(),
                },
            ],
            take_over: false,
            fail_closed: false,
            balance: Default::default(),
            protocol: Protocol::Tcp,
        };
        let record = ServiceRecord::new(&config, Some("{}"));
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(
            json,
            r#"{"listen":"[::1]:31400","subsets":[{"name":"v1","addr":"127.0.0.1:9001","weight":80},{"name":"v2","addr":"[::1]:9002","weight":20}],"annotation":"{}"}"#
        );
        let back: ServiceRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.to_config("tcp-echo").unwrap(),
            (config.clone(), Some("{}".into()))
        );
        // A UDP service's record says so; a TCP one's (above) has no `protocol`.
        let udp = ServiceConfig {
            protocol: Protocol::TcpUdp,
            ..config
        };
        let json = serde_json::to_string(&ServiceRecord::new(&udp, None)).unwrap();
        assert!(json.ends_with(r#""protocol":"tcp+udp"}"#), "{json}");
        let back: ServiceRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_config("tcp-echo").unwrap(), (udp, None));
        let bad = ServiceRecord {
            listen: "31400".into(),
            subsets: vec![SubsetRecord {
                name: "v1".into(),
                addr: "localhost:1".into(),
                weight: 1,
            }],
            annotation: None,
            balance: None,
            protocol: None,
        };
        assert!(
            bad.to_config("x")
                .unwrap_err()
                .starts_with("subsets[0].addr: ")
        );
    }
}
