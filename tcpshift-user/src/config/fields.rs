//! The pieces of the loader's format that the configuration and `services:` documents
//! share: name-keyed mappings, subset addresses and the subset/weight rules.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use tcpshift_common::{MAX_SERVICES, MAX_SUBSETS};

use super::DEFAULT_SINGLE_WEIGHT;
use super::limits::{MaxConnections, RawOutlierDetection};
use crate::model::service::SUBSET_FORMS;
use crate::model::traffic_policy::TrafficPolicy;
use crate::model::{OwnerRule, SubsetConfig, parse_subset_addr, validate_subset_name};
use crate::yaml::{Error, Located, Weight, seg};

/// A YAML mapping read as a list of (key, value) pairs in document order; duplicate keys are
/// rejected.
pub(super) struct Entries<V>(pub(super) Vec<(String, V)>);

/// What the values of an [`Entries`] mapping are, for messages.
pub(super) trait EntryKind {
    const MAPPING: &'static str;
}

impl EntryKind for SubsetAddr {
    const MAPPING: &'static str =
        "a mapping of subset names to addresses, e.g. `{v1: 127.0.0.1:9001, v2: 127.0.0.1:9002}`";
}

impl EntryKind for Weight {
    const MAPPING: &'static str =
        "a mapping of subset names to integer weights, e.g. `{v1: 100, v2: 0}`";
}

/// What [`EntryKind::MAPPING`] says for a mapping of services.
pub(super) const SERVICES_MAPPING: &str =
    "a mapping of service names to services, e.g. `tcp-echo: {listen: 31400, subsets: ...}`";

impl<'de, V: Deserialize<'de> + EntryKind> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de> + EntryKind> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(V::MAPPING)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<V>, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                let mut seen = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!(
                            "duplicate key {key:?}; each name may appear only once"
                        )));
                    }
                    let value = map.next_value::<V>()?;
                    entries.push((key, value));
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

/// A subset's address, and who may serve it: written `127.0.0.1:9001`, or
/// `{address: 127.0.0.1:9001, user: NAME|UID, cgroup: /PATH, unit: NAME.service}` (also with
/// `maxConnections` and `outlierDetection`: see `limits.rs`).
pub(super) struct SubsetAddr(SocketAddr, OwnerRule, TrafficPolicy);

impl SubsetAddr {
    /// The subset's own `maxConnections` and `outlierDetection`.
    pub(super) fn policy(&self) -> TrafficPolicy {
        self.2
    }
}

impl<'de> Deserialize<'de> for SubsetAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AddrVisitor;

        impl<'de> Visitor<'de> for AddrVisitor {
            type Value = SubsetAddr;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a subset address: {SUBSET_FORMS}")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SubsetAddr, E> {
                parse_subset_addr(v)
                    .map(|a| SubsetAddr(a, OwnerRule::default(), TrafficPolicy::default()))
                    .map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SubsetAddr, E> {
                Err(E::custom(format!(
                    "{v} is only a port; a subset needs the address its server listens on: \
                     {SUBSET_FORMS}"
                )))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SubsetAddr, E> {
                Err(E::custom(format!(
                    "{v} is not an address; expected {SUBSET_FORMS}"
                )))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SubsetAddr, A::Error> {
                let mut addr = None;
                let mut rule = OwnerRule::default();
                let mut max_connections = None;
                let mut outlier = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "address" => {
                            let v = map.next_value::<String>()?;
                            addr = Some(parse_subset_addr(&v).map_err(de::Error::custom)?);
                        }
                        "user" => {
                            let v = map.next_value::<UserRef>()?;
                            rule.uid = Some(v.resolve().map_err(de::Error::custom)?);
                        }
                        "cgroup" => {
                            let v = map.next_value::<String>()?;
                            if !v.starts_with('/') {
                                return Err(de::Error::custom(format!(
                                    "cgroup {v:?} is not a path; write it as in /proc/PID/cgroup, \
                                     e.g. /system.slice/tcp-echo.service"
                                )));
                            }
                            rule.cgroup = Some(v);
                        }
                        "unit" => {
                            let v = map.next_value::<String>()?;
                            rule.cgroup = Some(unit_cgroup(&v).map_err(de::Error::custom)?);
                        }
                        "maxConnections" => {
                            max_connections = Some(map.next_value::<MaxConnections>()?);
                        }
                        "outlierDetection" => {
                            outlier = Some(map.next_value::<RawOutlierDetection>()?);
                        }
                        other => {
                            return Err(de::Error::custom(format!(
                                "unknown field {other:?} of a subset; expected address, user, \
                                 cgroup, unit, maxConnections or outlierDetection"
                            )));
                        }
                    }
                }
                let policy = super::limits::policy(max_connections, outlier.as_ref());
                match addr {
                    Some(a) => Ok(SubsetAddr(a, rule, policy)),
                    None => Err(de::Error::custom(format!(
                        "a subset written as a mapping needs `address`: {SUBSET_FORMS}"
                    ))),
                }
            }

            fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<SubsetAddr, A::Error> {
                Err(de::Error::custom(format!(
                    "got a YAML list; an IPv6 address must be quoted, e.g. \"[::1]:9001\"; \
                     expected {SUBSET_FORMS}"
                )))
            }
        }

        deserializer.deserialize_any(AddrVisitor)
    }
}

/// A rule broken at `path` of `file` (no line: the rule involves several values).
pub(super) fn invalid(file: &str, path: impl Into<String>, message: impl Into<String>) -> Error {
    Located::new(file, message).field(path).into()
}

/// Checks the number of services: 1 to [`MAX_SERVICES`]. `example` is shown when there are
/// none.
pub(super) fn check_service_count(file: &str, count: usize, example: &str) -> Result<(), Error> {
    if count == 0 {
        return Err(invalid(
            file,
            "services",
            format!("no services defined; add at least one, e.g. `{example}`"),
        ));
    }
    if count > MAX_SERVICES as usize {
        return Err(invalid(
            file,
            "services",
            format!("{count} services defined; at most {MAX_SERVICES} are supported"),
        ));
    }
    Ok(())
}

/// The subsets of the service at `path`, with the weights of `weights` (all 0 when there
/// are none and `require_weights` is false; see [`super::ServiceSpec`]).
pub(super) fn validate_subsets(
    file: &str,
    path: &str,
    raw: Vec<(String, SubsetAddr)>,
    weights: Option<Entries<Weight>>,
    require_weights: bool,
) -> Result<Vec<SubsetConfig>, Error> {
    let subsets_path = format!("{path}.subsets");
    if raw.is_empty() {
        return Err(invalid(
            file,
            subsets_path,
            format!(
                "no subsets; a service needs 1 to {MAX_SUBSETS} subsets, \
                 e.g. `subsets: {{v1: 127.0.0.1:9001}}`"
            ),
        ));
    }
    if raw.len() > MAX_SUBSETS {
        return Err(invalid(
            file,
            subsets_path,
            format!(
                "{} subsets; a service can have at most {MAX_SUBSETS}",
                raw.len()
            ),
        ));
    }

    let mut subsets: Vec<SubsetConfig> = Vec::with_capacity(raw.len());
    for (name, SubsetAddr(addr, owner, _)) in raw {
        let sub_path = format!("{subsets_path}.{}", seg(&name));
        validate_subset_name(&name).map_err(|m| invalid(file, &sub_path, m))?;
        let key = (addr.ip().to_canonical(), addr.port());
        if let Some(other) = subsets
            .iter()
            .find(|s| (s.addr.ip().to_canonical(), s.addr.port()) == key)
        {
            return Err(invalid(
                file,
                sub_path,
                format!(
                    "address {addr} is already used by subset {}; each subset needs its own \
                     server address",
                    other.name
                ),
            ));
        }
        subsets.push(SubsetConfig {
            name,
            addr,
            weight: 0,
            owner,
        });
    }

    let weights_path = format!("{path}.weights");
    match weights {
        // `tcpshiftctl apply`: the weights come from elsewhere (see `ServiceSpec`).
        None if !require_weights => {}
        None if subsets.len() == 1 => {
            if let Some(only) = subsets.first_mut() {
                only.weight = DEFAULT_SINGLE_WEIGHT;
            }
        }
        None => {
            let example = subsets
                .iter()
                .enumerate()
                .map(|(i, s)| format!("{}: {}", s.name, if i == 0 { 100 } else { 0 }))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(invalid(
                file,
                path,
                format!(
                    "`weights` is missing; a service with several subsets needs explicit \
                     weights (traffic is never split implicitly), add e.g. \
                     `weights: {{{example}}}`"
                ),
            ));
        }
        Some(Entries(entries)) => {
            for (name, Weight(w)) in entries {
                match subsets.iter_mut().find(|s| s.name == name) {
                    Some(subset) => subset.weight = w,
                    None => {
                        let declared = subsets
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ");
                        return Err(invalid(
                            file,
                            format!("{weights_path}.{}", seg(&name)),
                            format!("unknown subset {name:?} (declared: {declared})"),
                        ));
                    }
                }
            }
            if subsets.iter().all(|s| s.weight == 0) {
                return Err(invalid(
                    file,
                    weights_path,
                    format!(
                        "all weights are 0; at least one subset needs a weight above 0, \
                         e.g. `{}: 100`",
                        subsets.first().map_or("v1", |s| s.name.as_str())
                    ),
                ));
            }
        }
    }
    Ok(subsets)
}

/// A subset's `user`: a name (looked up in `/etc/passwd`) or a numeric uid.
#[derive(Deserialize)]
#[serde(untagged)]
enum UserRef {
    Uid(u32),
    Name(String),
}

impl UserRef {
    fn resolve(self) -> Result<u32, String> {
        match self {
            UserRef::Uid(uid) => Ok(uid),
            UserRef::Name(name) => match name.parse::<u32>() {
                Ok(uid) => Ok(uid),
                Err(_) => user_uid(&name).ok_or_else(|| {
                    format!(
                        "unknown user {name:?} (not in /etc/passwd); create it or give its numeric uid"
                    )
                }),
            },
        }
    }
}

/// The uid of user `name` in `/etc/passwd`.
fn user_uid(name: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// The cgroup of systemd unit `unit` (`systemctl show -p ControlGroup`).
fn unit_cgroup(unit: &str) -> Result<String, String> {
    let out = std::process::Command::new("systemctl")
        .args(["show", "--property=ControlGroup", "--value", "--", unit])
        .output()
        .map_err(|e| {
            format!(
                "cannot resolve unit {unit:?} to its cgroup: cannot run systemctl ({e}); \
                 give `cgroup: /PATH` instead"
            )
        })?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || !path.starts_with('/') {
        return Err(format!(
            "cannot resolve unit {unit:?} to its cgroup (is it loaded and running? \
             `systemctl show -p ControlGroup {unit}` shows none); give `cgroup: /PATH` instead"
        ));
    }
    Ok(path)
}
