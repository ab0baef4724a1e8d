//! `tcpshiftctl apply`: Istio networking objects and tcpshift `services:` documents.
//!
//! An apply reads one or more multi-document YAML files holding any mix of:
//!
//! - tcpshift's own `services:` document (the loader's format, see [`crate::config`]), which
//!   says where each subset's server listens; `listen` and `weights` may be left out there
//!   (see [`ServiceSpec`]);
//! - Istio `networking.istio.io` objects (API versions `v1`, `v1beta1`, `v1alpha3`), written
//!   exactly as for Istio: [`VirtualServiceSpec`] (TCP routes), [`DestinationRuleSpec`] and
//!   [`GatewaySpec`].
//!
//! # Mapping
//!
//! - A VirtualService destination's `host` is the tcpshift service of that name; its `subset`
//!   is a subset of that service, whose address comes from a `services:` document of the
//!   same apply or from the service already in the kernel.
//! - The port a TCP route matches (`match[].port`), or else the TCP port of the Gateway the
//!   VirtualService is bound to, is the service's listen port (on any local address, or on
//!   the address the `services:` document or the kernel gives).
//! - `destination.port.number`, when present, must equal the port of that subset's address
//!   (the local analogue of a Kubernetes service port).
//! - Weights are relative integers (0 to 1 000 000); a route with a single destination and
//!   no weight sends it everything (weight 100); subsets a route does not name get 0.
//! - Fields without local meaning (`hosts`, `gateways`, `exportTo`, `selector`, labels,
//!   annotations, server-set metadata such as `uid`) are accepted and, except the names,
//!   hosts and gateways kept for `tcpshiftctl get virtualservice`, ignored. Fields whose
//!   meaning tcpshift cannot honour (HTTP and TLS routes, source matches, TLS servers) are
//!   errors, as are unknown fields and values of the wrong type.
//!
//! # All or nothing
//!
//! [`Manifest::parse`] checks each document on its own (syntax, types, names, weights);
//! [`Manifest::resolve`] checks the objects against each other and against the services in
//! the kernel and returns the complete new definition of every service concerned
//! ([`Plan`]). Only then does [`crate::state::State::apply_with`] write anything, under the
//! namespace's lock. Every error names the file, the line and column of the offending value
//! (also for errors found after parsing), the object, the field and what is expected.
//!
//! YAML streams are split into documents at `---` / `...` lines (the YAML markers, which
//! cannot occur inside a document), and each document is parsed on its own: one bad document
//! never confuses the parsing of the others.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    path::Path,
};

use serde::{
    Deserialize, Serialize, Serializer,
    de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor},
};
use serde_yaml::{Mapping, Value};
use tcpshift_common::MAX_SUBSETS;

use crate::{
    config::{self, ConfigError, DEFAULT_SINGLE_WEIGHT, ServiceSpec},
    model::{
        self as model, Annotation, Desired, DesiredService, Listen, ListenClaims, ListenTaken,
        ServiceConfig, ServiceView, SubsetConfig,
    },
    state::MAX_ANNOTATION,
    weights::MAX_WEIGHT,
};

/// The Istio API group tcpshift understands.
pub const GROUP: &str = "networking.istio.io";
/// The versions of [`GROUP`] tcpshift understands (their networking objects are the same).
pub const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// The `apiVersion` of the objects `tcpshiftctl get` prints.
pub const DEFAULT_API_VERSION: &str = "networking.istio.io/v1";
/// Longest Kubernetes object name (a DNS subdomain).
pub const MAX_OBJECT_NAME: usize = 253;

// ---------------------------------------------------------------------------------------------
// Errors

/// Why an apply (or a delete by file) was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A file could not be read.
    #[error("{file}: cannot read: {error}")]
    Read {
        /// The file as named on the command line.
        file: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A file is not UTF-8 text.
    #[error("{file}:{line}: not valid UTF-8; expected YAML text")]
    NotUtf8 {
        /// The file.
        file: String,
        /// 1-based line of the first invalid byte.
        line: usize,
    },
    /// No document in any file.
    #[error(
        "{file}: no YAML documents; expected Istio VirtualService, DestinationRule or Gateway \
         objects and/or a tcpshift `services:` document"
    )]
    Empty {
        /// The file (or files) read.
        file: String,
    },
    /// An error in a tcpshift `services:` document.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Anything else: a YAML error, a wrong value, objects that do not fit together.
    #[error("{0}")]
    Invalid(Box<Located>),
}

/// An error at a place in a file (see [`ApplyError::Invalid`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The file.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The object, e.g. `VirtualService tcp-echo`, when known.
    pub object: Option<String>,
    /// The field, e.g. `spec.tcp[0].route[1].weight`, when it is not already at the start of
    /// `message`.
    pub field: Option<String>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for Located {
    /// `FILE:LINE:COLUMN: OBJECT: FIELD: MESSAGE`, leaving out what is not known.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, ":{l}:{c}")?,
            (Some(l), None) => write!(f, ":{l}")?,
            _ => {}
        }
        f.write_str(": ")?;
        if let Some(o) = &self.object {
            write!(f, "{}: ", config::clip(o))?;
        }
        if let Some(field) = &self.field {
            write!(f, "{}: ", config::clip(field))?;
        }
        f.write_str(&config::clip(&self.message))
    }
}

impl From<Located> for ApplyError {
    fn from(l: Located) -> Self {
        ApplyError::Invalid(Box::new(l))
    }
}

impl ApplyError {
    /// 1-based line and column of the error, when known.
    pub fn location(&self) -> Option<(usize, Option<usize>)> {
        match self {
            ApplyError::Invalid(l) => l.line.map(|line| (line, l.column)),
            ApplyError::Config(e) => e.location().map(|(l, c)| (l, Some(c))),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Field paths and locations

/// One step of a [`FieldPath`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Path of a value in a document, e.g. `spec.tcp[0].route[1].weight`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FieldPath(Vec<Seg>);

impl FieldPath {
    fn key(&self, k: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_owned()));
        p
    }

    fn index(&self, i: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
}

fn path(keys: &[&str]) -> FieldPath {
    FieldPath(keys.iter().map(|k| Seg::Key((*k).to_owned())).collect())
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Finds the line and column of the value at `path` in the YAML document `text`, by walking
/// the document with a deserializer that stops there (the YAML parser attaches the position
/// of the value it stopped at to the error). Falls back to the closest parent that exists.
fn locate(text: &str, path: &FieldPath) -> Option<(usize, usize)> {
    for len in (0..=path.0.len()).rev() {
        let segs = &path.0[..len];
        let de = serde_yaml::Deserializer::from_str(text);
        if let Err(e) = Locate(segs).deserialize(de)
            && let Some(loc) = e.location()
        {
            return Some((loc.line(), loc.column()));
        }
    }
    None
}

struct Locate<'a>(&'a [Seg]);

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.0.is_empty() {
            // `Here` accepts nothing: the parser reports the value's position.
            return d.deserialize_any(Here);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or a sequence")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Value>()? {
            if let (Some(Seg::Key(want)), Some(key)) = (self.0.first(), key.as_str())
                && want == key
            {
                return map.next_value_seed(Locate(&self.0[1..]));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            if let Some(Seg::Index(want)) = self.0.first()
                && *want == i
            {
                return seq.next_element_seed(Locate(&self.0[1..])).map(|_| ());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
}

/// A visitor that accepts nothing (the default of every `visit_*` is an error).
struct Here;

impl Visitor<'_> for Here {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nothing (locating a value)")
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar types

/// An Istio weight: an integer in `0..=`[`MAX_WEIGHT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weight(pub u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Weight;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an integer weight in 0..={MAX_WEIGHT}")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Weight, E> {
                match u32::try_from(v) {
                    Ok(w) if w <= MAX_WEIGHT => Ok(Weight(w)),
                    _ => Err(E::custom(format!(
                        "weight {v} is too large; expected an integer in 0..={MAX_WEIGHT} \
                         (weights are relative)"
                    ))),
                }
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Weight, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "weight {v} is negative; expected an integer in 0..={MAX_WEIGHT}"
                    ))),
                }
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "weight {v} is too large; expected an integer in 0..={MAX_WEIGHT}"
                )))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "weight {v} is out of range; expected an integer in 0..={MAX_WEIGHT}"
                )))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "weight {v} is not an integer; expected an integer in 0..={MAX_WEIGHT}"
                )))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "weight {v:?} is a string; expected an integer in 0..={MAX_WEIGHT} \
                     (without quotes)"
                )))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Weight, E> {
                Err(E::custom(format!(
                    "weight {v} is a boolean; expected an integer in 0..={MAX_WEIGHT}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Weight {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

/// A TCP port number in `1..=65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number in 1..=65535")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                match u16::try_from(v) {
                    Ok(p) if p > 0 => Ok(Port(p)),
                    _ => Err(E::custom(format!(
                        "port {v} is out of range; expected a port number in 1..=65535"
                    ))),
                }
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "port {v} is negative; expected a port number in 1..=65535"
                    ))),
                }
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Port, E> {
                Err(E::custom(format!(
                    "port {v} is out of range; expected a port number in 1..=65535"
                )))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Port, E> {
                Err(E::custom(format!(
                    "port {v} is out of range; expected a port number in 1..=65535"
                )))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Port, E> {
                Err(E::custom(format!(
                    "port {v} is not an integer; expected a port number in 1..=65535"
                )))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                Err(E::custom(format!(
                    "port {v:?} is a string; expected a port number in 1..=65535 (without \
                     quotes)"
                )))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Port, E> {
                Err(E::custom(format!(
                    "port {v} is a boolean; expected a port number in 1..=65535"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.0)
    }
}

fn is_none<T>(v: &Option<T>) -> bool {
    v.is_none()
}

// ---------------------------------------------------------------------------------------------
// Objects

/// A Kubernetes object of [`GROUP`]: `apiVersion`, `kind`, `metadata`, `spec` (and an
/// ignored `status`, as `kubectl get -o yaml` prints it).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Object<S> {
    /// `networking.istio.io/v1`, `.../v1beta1` or `.../v1alpha3`.
    pub api_version: String,
    /// `VirtualService`, `DestinationRule` or `Gateway`.
    pub kind: String,
    /// Name and the like.
    pub metadata: Metadata,
    /// The object's specification.
    pub spec: S,
    /// `status`, as a Kubernetes API server reports it: ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<Value>,
}

/// `metadata` of an object. Besides `name`, only `namespace` is kept (for display).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// The object's name (a DNS subdomain: `a-z 0-9 - .`, at most 253 characters).
    pub name: String,
    /// The Kubernetes namespace, shown back by `tcpshiftctl get`; no local meaning.
    #[serde(default, skip_serializing_if = "is_none")]
    pub namespace: Option<String>,
    /// Labels: no local meaning.
    #[serde(default, skip_serializing)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations: no local meaning.
    #[serde(default, skip_serializing)]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub uid: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub resource_version: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub generation: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub creation_timestamp: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub deletion_timestamp: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub deletion_grace_period_seconds: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub generate_name: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub finalizers: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub owner_references: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub managed_fields: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub self_link: Option<Value>,
}

/// `spec` of a VirtualService. Only `tcp` routes are supported.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Hosts the VirtualService applies to; kept and shown back, no local meaning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Gateways it is bound to; a Gateway of the same apply gives routes without a
    /// `match.port` their port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// HTTP routes: not supported (an error when not empty).
    #[serde(default, skip_serializing)]
    pub http: Option<Vec<Value>>,
    /// TLS routes: not supported (an error when not empty).
    #[serde(default, skip_serializing)]
    pub tls: Option<Vec<Value>>,
    /// The TCP routes: each one is a tcpshift service.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// `exportTo`: no local meaning.
    #[serde(default, skip_serializing)]
    pub export_to: Option<Vec<String>>,
}

/// A TCP route: match conditions and weighted destinations.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRoute {
    /// Match conditions; only `port` (and `gateways`, ignored) are supported.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<L4Match>,
    /// The destinations: subsets of one service.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// A TCP match condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct L4Match {
    /// The port the route matches: the service's listen port.
    #[serde(default, skip_serializing_if = "is_none")]
    pub port: Option<Port>,
    /// Gateways the condition is limited to: no local meaning.
    #[serde(default, skip_serializing)]
    pub gateways: Option<Vec<String>>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub destination_subnets: Option<Vec<String>>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub source_labels: Option<BTreeMap<String, String>>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub source_namespace: Option<String>,
}

/// A weighted destination.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteDestination {
    /// Where connections go.
    pub destination: Destination,
    /// Relative weight; see the module documentation for the defaults.
    #[serde(default, skip_serializing_if = "is_none")]
    pub weight: Option<Weight>,
}

/// A destination: a subset of a service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Destination {
    /// The tcpshift service.
    pub host: String,
    /// The port of the subset's address, when given.
    #[serde(default, skip_serializing_if = "is_none")]
    pub port: Option<PortSelector>,
    /// The subset.
    #[serde(default, skip_serializing_if = "is_none")]
    pub subset: Option<String>,
}

/// `destination.port`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    /// The port number.
    pub number: Port,
}

/// `spec` of a DestinationRule: the subsets of a host.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The tcpshift service.
    pub host: String,
    /// Its subsets; each must be a subset of the service.
    #[serde(default)]
    pub subsets: Vec<DestinationRuleSubset>,
    /// Traffic policy: ignored, with a warning.
    #[serde(default, skip_serializing)]
    pub traffic_policy: Option<Mapping>,
    /// `exportTo`: no local meaning.
    #[serde(default, skip_serializing)]
    pub export_to: Option<Vec<String>>,
    /// Workload selector: no local meaning.
    #[serde(default, skip_serializing)]
    pub workload_selector: Option<Mapping>,
}

/// A DestinationRule subset.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSubset {
    /// Subset name.
    pub name: String,
    /// Labels: no local meaning.
    #[serde(default, skip_serializing)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Traffic policy: ignored, with a warning.
    #[serde(default, skip_serializing)]
    pub traffic_policy: Option<Mapping>,
}

/// `spec` of a Gateway: its servers' ports.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Selector of the gateway workload: no local meaning.
    #[serde(default, skip_serializing)]
    pub selector: Option<BTreeMap<String, String>>,
    /// The servers; each must be plain TCP.
    #[serde(default)]
    pub servers: Vec<Server>,
}

/// A Gateway server.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Server {
    /// The port.
    pub port: ServerPort,
    /// Hosts: no local meaning.
    #[serde(default, skip_serializing)]
    pub hosts: Option<Vec<String>>,
    /// Name: no local meaning.
    #[serde(default, skip_serializing)]
    pub name: Option<String>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub bind: Option<String>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub tls: Option<Mapping>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub default_endpoint: Option<String>,
}

/// A Gateway server's port.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerPort {
    /// The port number: the listen port of the services routed through this server.
    pub number: Port,
    /// Must be `TCP`.
    pub protocol: String,
    /// Name: no local meaning.
    #[serde(default, skip_serializing)]
    pub name: Option<String>,
    /// Target port: no local meaning.
    #[serde(default, skip_serializing)]
    pub target_port: Option<Port>,
}

/// A VirtualService.
pub type VirtualService = Object<VirtualServiceSpec>;
/// A DestinationRule.
pub type DestinationRule = Object<DestinationRuleSpec>;
/// A Gateway.
pub type Gateway = Object<GatewaySpec>;

// ---------------------------------------------------------------------------------------------
// Documents

/// One document of an apply.
#[derive(Clone, Debug)]
struct Document {
    /// File name for messages.
    file: String,
    /// Lines before the document in its file.
    line_offset: usize,
    /// The document's text, for locating fields.
    text: String,
    body: Body,
}

#[derive(Clone, Debug)]
enum Body {
    Services(Vec<ServiceSpec>),
    VirtualService(Box<VirtualService>),
    DestinationRule(Box<DestinationRule>),
    Gateway(Box<Gateway>),
}

impl Document {
    /// `VirtualService NAME` etc., or `None` for a `services:` document.
    fn object(&self) -> Option<String> {
        match &self.body {
            Body::Services(_) => None,
            Body::VirtualService(o) => Some(format!("VirtualService {}", o.metadata.name)),
            Body::DestinationRule(o) => Some(format!("DestinationRule {}", o.metadata.name)),
            Body::Gateway(o) => Some(format!("Gateway {}", o.metadata.name)),
        }
    }

    /// An error about the value at `field`, located in the file.
    fn error(&self, field: &FieldPath, message: impl Into<String>) -> ApplyError {
        let loc = locate(&self.text, field);
        ApplyError::from(Located {
            file: self.file.clone(),
            line: loc.map(|(l, _)| l + self.line_offset),
            column: loc.map(|(_, c)| c),
            object: self.object(),
            field: Some(field.to_string()),
            message: message.into(),
        })
    }
}

/// The parsed documents of an apply, each checked on its own. Build one with
/// [`Manifest::parse`] (one per file) and [`Manifest::extend`].
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    docs: Vec<Document>,
    files: Vec<String>,
}

/// Splits a YAML stream into documents at the document markers: a `---` line starts a
/// document (unless nothing but comments and directives came before it in the current one),
/// a `...` line ends one. Returns each document's first line (0-based) and text.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 0usize;
    let mut has_content = false;
    let mut has_marker = false;
    let mut offset = 0usize;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = |m: &str| {
            bare.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        // A second `---` with nothing between starts a document too (the first is empty).
        if marker("---") && (has_content || has_marker) {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = line_no;
            has_content = false;
        }
        offset += line.len();
        if marker("...") {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = line_no + 1;
            has_content = false;
            has_marker = false;
            continue;
        }
        has_marker |= marker("---");
        let t = bare.trim_start();
        let content = !(t.is_empty()
            || t.starts_with('#')
            || (bare.starts_with('%') && !has_content)
            || marker("---") && bare.trim_start_matches('-').trim().is_empty());
        has_content |= content;
    }
    if start < text.len() {
        docs.push((start_line, &text[start..]));
    }
    docs
}

/// A YAML parser error in a document of `file` starting after `offset` lines.
fn yaml_error(
    file: &str,
    offset: usize,
    object: Option<String>,
    err: &serde_yaml::Error,
) -> ApplyError {
    let mut message = err.to_string();
    let (line, column) = match err.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            message = config::shift_line_mentions(&message.replacen(&suffix, "", 1), offset);
            (Some(loc.line() + offset), Some(loc.column()))
        }
        None => (None, None),
    };
    ApplyError::from(Located {
        file: file.to_owned(),
        line,
        column,
        object,
        field: None,
        message,
    })
}

/// What a document is, from its top-level keys.
enum Class {
    Empty,
    Services,
    Object(Kind),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    VirtualService,
    DestinationRule,
    Gateway,
}

const SUPPORTED: &str = "networking.istio.io VirtualService, DestinationRule and Gateway \
                         objects, and tcpshift `services:` documents";

impl Manifest {
    /// Parses the YAML stream `text` of the file `file` (the name used in messages) and checks
    /// each document on its own. Empty documents are skipped.
    pub fn parse(text: &str, file: &str) -> Result<Manifest, ApplyError> {
        if let Err((line, column, message)) = config::check_flow_nesting(text) {
            return Err(ApplyError::from(Located {
                file: file.to_owned(),
                line: Some(line),
                column: Some(column),
                object: None,
                field: None,
                message,
            }));
        }
        let mut docs = Vec::new();
        for (line_offset, chunk) in split_documents(text) {
            let value: Value = serde_yaml::from_str(chunk).map_err(|e| {
                let e = config::yaml_error_with_location(chunk, e);
                match config::second_document_line(chunk) {
                    Some(line) if e.location().is_none() => ApplyError::from(Located {
                        file: file.to_owned(),
                        line: Some(line + line_offset),
                        column: None,
                        object: None,
                        field: None,
                        message: "a second YAML document starts here; separate \
                                      documents with a line holding only `---`"
                            .to_owned(),
                    }),
                    _ => yaml_error(file, line_offset, None, &e),
                }
            })?;
            let located = |p: &FieldPath, message: String| {
                let loc = locate(chunk, p);
                ApplyError::from(Located {
                    file: file.to_owned(),
                    line: loc.map(|(l, _)| l + line_offset),
                    column: loc.map(|(_, c)| c),
                    object: None,
                    field: (!p.0.is_empty()).then(|| p.to_string()),
                    message,
                })
            };
            let body = match classify(&value).map_err(|(p, m)| located(&p, m))? {
                Class::Empty => continue,
                Class::Services => {
                    let specs = config::specs_from_yaml_str(chunk, file)
                        .map_err(|e| ApplyError::Config(e.shift_lines(line_offset)))?;
                    Body::Services(specs)
                }
                Class::Object(kind) => {
                    let object = object_label(kind, &value);
                    let typed = |e: serde_yaml::Error| yaml_error(file, line_offset, object, &e);
                    match kind {
                        Kind::VirtualService => {
                            Body::VirtualService(serde_yaml::from_str(chunk).map_err(typed)?)
                        }
                        Kind::DestinationRule => {
                            Body::DestinationRule(serde_yaml::from_str(chunk).map_err(typed)?)
                        }
                        Kind::Gateway => Body::Gateway(serde_yaml::from_str(chunk).map_err(typed)?),
                    }
                }
            };
            let doc = Document {
                file: file.to_owned(),
                line_offset,
                text: chunk.to_owned(),
                body,
            };
            doc.check()?;
            docs.push(doc);
        }
        Ok(Manifest {
            docs,
            files: vec![file.to_owned()],
        })
    }

    /// Reads and parses a file; `-` is standard input (named `<stdin>` in messages).
    pub fn from_file(file: &str) -> Result<Manifest, ApplyError> {
        let (bytes, name) = if file == "-" {
            let buf = config::read_limited(std::io::stdin()).map_err(|error| ApplyError::Read {
                file: "<stdin>".into(),
                error,
            })?;
            (buf, "<stdin>".to_owned())
        } else {
            let bytes =
                config::read_file_limited(Path::new(file)).map_err(|error| ApplyError::Read {
                    file: file.to_owned(),
                    error,
                })?;
            (bytes, file.to_owned())
        };
        let text = String::from_utf8(bytes).map_err(|err| {
            let valid = err.utf8_error().valid_up_to();
            let line = 1 + err.as_bytes()[..valid]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            ApplyError::NotUtf8 {
                file: name.clone(),
                line,
            }
        })?;
        Manifest::parse(&text, &name)
    }

    /// Adds the documents of `other` (another file of the same apply).
    pub fn extend(&mut self, other: Manifest) {
        self.docs.extend(other.docs);
        self.files.extend(other.files);
    }

    /// Whether there is no document at all.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// An [`ApplyError::Empty`] naming the files read.
    pub fn empty_error(&self) -> ApplyError {
        ApplyError::Empty {
            file: self.files.join(", "),
        }
    }

    /// The Istio objects, as `KIND NAME`, in document order.
    pub fn objects(&self) -> Vec<String> {
        self.docs.iter().filter_map(Document::object).collect()
    }
}

fn classify(value: &Value) -> Result<Class, (FieldPath, String)> {
    let map = match value {
        Value::Null => return Ok(Class::Empty),
        Value::Mapping(m) => m,
        other => {
            return Err((
                FieldPath::default(),
                format!("the document is {}; expected {SUPPORTED}", describe(other)),
            ));
        }
    };
    let kind = map.get("kind");
    let api = map.get("apiVersion");
    if kind.is_none() && api.is_none() {
        if map.contains_key("services") {
            return Ok(Class::Services);
        }
        return Err((
            FieldPath::default(),
            format!(
                "neither a tcpshift `services:` document nor a Kubernetes object (no \
                 `apiVersion` and `kind`); expected {SUPPORTED}"
            ),
        ));
    }
    let kind = match kind {
        Some(Value::String(k)) => k.as_str(),
        Some(other) => {
            return Err((
                path(&["kind"]),
                format!("got {}; expected a string", describe(other)),
            ));
        }
        None => {
            return Err((
                FieldPath::default(),
                "missing field `kind`; expected VirtualService, DestinationRule or Gateway".into(),
            ));
        }
    };
    let api_version = match api {
        Some(Value::String(a)) => a.as_str(),
        Some(other) => {
            return Err((
                path(&["apiVersion"]),
                format!("got {}; expected a string", describe(other)),
            ));
        }
        None => {
            return Err((
                FieldPath::default(),
                format!("missing field `apiVersion`; expected {DEFAULT_API_VERSION}"),
            ));
        }
    };
    let versions = VERSIONS
        .iter()
        .map(|v| format!("{GROUP}/{v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let known_kind = match kind {
        "VirtualService" => Some(Kind::VirtualService),
        "DestinationRule" => Some(Kind::DestinationRule),
        "Gateway" => Some(Kind::Gateway),
        _ => None,
    };
    match api_version.split_once('/') {
        Some((GROUP, v)) if VERSIONS.contains(&v) => {}
        Some((GROUP, v)) => {
            return Err((
                path(&["apiVersion"]),
                format!("unsupported version {v:?} of {GROUP}; expected one of {versions}"),
            ));
        }
        _ if known_kind.is_some() => {
            return Err((
                path(&["apiVersion"]),
                format!(
                    "{api_version:?} is not Istio's networking API; expected one of {versions}"
                ),
            ));
        }
        _ => {
            return Err((
                path(&["kind"]),
                format!(
                    "{kind} ({api_version}) is not something tcpshift applies; it applies \
                     {SUPPORTED} (where the subsets' servers listen is said by the \
                     `services:` document, not by Kubernetes Services or Deployments)"
                ),
            ));
        }
    }
    match known_kind {
        Some(kind) => Ok(Class::Object(kind)),
        None => Err((
            path(&["kind"]),
            format!(
                "{GROUP} kind {kind:?} is not supported; tcpshift applies VirtualService, \
                 DestinationRule and Gateway"
            ),
        )),
    }
}

/// `VirtualService NAME` from an unchecked document, for messages.
fn object_label(kind: Kind, value: &Value) -> Option<String> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    let kind = match kind {
        Kind::VirtualService => "VirtualService",
        Kind::DestinationRule => "DestinationRule",
        Kind::Gateway => "Gateway",
    };
    Some(match name {
        Some(n) => format!("{kind} {n}"),
        None => kind.to_owned(),
    })
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "empty".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Checks a Kubernetes object name: a DNS subdomain.
fn check_object_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_OBJECT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}; expected a Kubernetes object name: 1 to {MAX_OBJECT_NAME} \
             characters from a-z 0-9 - ., starting and ending with a letter or digit"
        ))
    }
}

impl Document {
    /// Checks what can be checked in this document alone.
    fn check(&self) -> Result<(), ApplyError> {
        let meta = |m: &Metadata| -> Result<(), ApplyError> {
            check_object_name(&m.name).map_err(|e| self.error(&path(&["metadata", "name"]), e))
        };
        match &self.body {
            Body::Services(_) => Ok(()),
            Body::VirtualService(vs) => {
                meta(&vs.metadata)?;
                self.check_virtual_service(&vs.spec)
            }
            Body::DestinationRule(dr) => {
                meta(&dr.metadata)?;
                let spec = path(&["spec"]);
                model::validate_service_name(&dr.spec.host)
                    .map_err(|e| self.error(&spec.key("host"), host_message(&e)))?;
                let mut seen = HashSet::new();
                for (i, s) in dr.spec.subsets.iter().enumerate() {
                    let p = spec.key("subsets").index(i).key("name");
                    model::validate_subset_name(&s.name).map_err(|e| self.error(&p, e))?;
                    if !seen.insert(s.name.as_str()) {
                        return Err(self.error(
                            &p,
                            format!("subset {:?} is defined twice; names must be unique", s.name),
                        ));
                    }
                }
                if dr.spec.subsets.len() > MAX_SUBSETS {
                    return Err(self.error(
                        &spec.key("subsets"),
                        format!(
                            "{} subsets; a tcpshift service has at most {MAX_SUBSETS}",
                            dr.spec.subsets.len()
                        ),
                    ));
                }
                Ok(())
            }
            Body::Gateway(gw) => {
                meta(&gw.metadata)?;
                let spec = path(&["spec"]);
                if gw.spec.servers.is_empty() {
                    return Err(self.error(
                        &spec,
                        "no `servers`; expected at least one, e.g. `servers: [{port: {number: \
                         31400, name: tcp, protocol: TCP}, hosts: [\"*\"]}]`",
                    ));
                }
                for (i, s) in gw.spec.servers.iter().enumerate() {
                    let p = spec.key("servers").index(i);
                    if !s.port.protocol.eq_ignore_ascii_case("TCP") {
                        return Err(self.error(
                            &p.key("port").key("protocol"),
                            format!(
                                "protocol {:?} is not supported: tcpshift steers plain TCP \
                                 connections in the kernel, without a proxy; expected TCP",
                                s.port.protocol
                            ),
                        ));
                    }
                    let unsupported = [
                        ("bind", s.bind.is_some()),
                        ("tls", s.tls.is_some()),
                        ("defaultEndpoint", s.default_endpoint.is_some()),
                    ];
                    for (field, present) in unsupported {
                        if present {
                            return Err(self.error(
                                &p.key(field),
                                format!(
                                    "`{field}` is not supported: tcpshift steers plain TCP \
                                     connections without a proxy; remove it (the listen \
                                     address of a service goes in the `services:` document)"
                                ),
                            ));
                        }
                    }
                }
                Ok(())
            }
        }
    }

    fn check_virtual_service(&self, spec: &VirtualServiceSpec) -> Result<(), ApplyError> {
        let sp = path(&["spec"]);
        for (field, present) in [
            ("http", spec.http.as_ref().is_some_and(|v| !v.is_empty())),
            ("tls", spec.tls.as_ref().is_some_and(|v| !v.is_empty())),
        ] {
            if present {
                return Err(self.error(
                    &sp.key(field),
                    format!(
                        "{} routes are not supported: tcpshift steers TCP connections in the \
                         kernel, without a proxy; use `tcp` routes",
                        field.to_uppercase()
                    ),
                ));
            }
        }
        if spec.tcp.is_empty() {
            return Err(self.error(
                &sp,
                "no `tcp` routes; expected at least one, e.g. `tcp: [{match: [{port: 31400}], \
                 route: [{destination: {host: tcp-echo, subset: v1}}]}]`",
            ));
        }
        for (r, route) in spec.tcp.iter().enumerate() {
            let rp = sp.key("tcp").index(r);
            let mut port: Option<Port> = None;
            for (m, cond) in route.matches.iter().enumerate() {
                let mp = rp.key("match").index(m);
                let unsupported = [
                    ("destinationSubnets", cond.destination_subnets.is_some()),
                    ("sourceLabels", cond.source_labels.is_some()),
                    ("sourceNamespace", cond.source_namespace.is_some()),
                ];
                for (field, present) in unsupported {
                    if present {
                        return Err(self.error(
                            &mp.key(field),
                            format!(
                                "`{field}` is not supported: tcpshift steers every new \
                                 connection to the port; remove it"
                            ),
                        ));
                    }
                }
                if let Some(p) = cond.port {
                    match port {
                        Some(first) if first != p => {
                            return Err(self.error(
                                &mp.key("port"),
                                format!(
                                    "a second port ({}) for one route (the first is {}); a \
                                     tcpshift service listens on one port: give each port \
                                     its own route and service",
                                    p.0, first.0
                                ),
                            ));
                        }
                        _ => port = Some(p),
                    }
                }
            }
            let dests = &route.route;
            if dests.is_empty() {
                return Err(self.error(
                    &rp.key("route"),
                    format!(
                        "no destinations; expected 1 to {MAX_SUBSETS}, e.g. `route: \
                         [{{destination: {{host: tcp-echo, subset: v1}}}}]`"
                    ),
                ));
            }
            if dests.len() > MAX_SUBSETS {
                return Err(self.error(
                    &rp.key("route"),
                    format!(
                        "{} destinations; a tcpshift service has at most {MAX_SUBSETS} subsets",
                        dests.len()
                    ),
                ));
            }
            let mut subsets = HashSet::new();
            let mut total: u64 = 0;
            for (d, dest) in dests.iter().enumerate() {
                let dp = rp.key("route").index(d).key("destination");
                let host = &dest.destination.host;
                model::validate_service_name(host)
                    .map_err(|e| self.error(&dp.key("host"), host_message(&e)))?;
                if let Some(first) = dests.first().map(|f| &f.destination.host)
                    && first != host
                {
                    return Err(self.error(
                        &dp.key("host"),
                        format!(
                            "host {host:?} differs from {first:?} of the route's first \
                             destination; the destinations of one route must be subsets of \
                             one service (a tcpshift service has one listen port and one set \
                             of weights): give each service its own route"
                        ),
                    ));
                }
                match &dest.destination.subset {
                    Some(s) => {
                        model::validate_subset_name(s)
                            .map_err(|e| self.error(&dp.key("subset"), e))?;
                        if !subsets.insert(s.as_str()) {
                            return Err(self.error(
                                &dp.key("subset"),
                                format!(
                                    "subset {s:?} is named twice in this route; name each \
                                     subset once"
                                ),
                            ));
                        }
                    }
                    None if dests.len() > 1 => {
                        return Err(self.error(
                            &dp,
                            "no `subset`; when a route has several destinations each names a \
                             subset",
                        ));
                    }
                    None => {}
                }
                total += u64::from(dest.weight.map_or(0, |w| w.0));
            }
            if dests.len() > 1 && total == 0 {
                return Err(self.error(
                    &rp.key("route"),
                    "all weights are 0 (a missing weight counts as 0 when a route has several \
                     destinations); at least one destination needs a weight above 0, e.g. \
                     `weight: 100`",
                ));
            }
        }
        Ok(())
    }
}

fn host_message(e: &str) -> String {
    format!("{e} (a destination host is the name of a tcpshift service)")
}

// ---------------------------------------------------------------------------------------------
// Resolving

/// Where a service's route comes from, stored with the service (as its
/// [`crate::state::ServiceView::annotation`], JSON) so that `tcpshiftctl get
/// virtualservice` can show the VirtualService back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteInfo {
    /// Name of the VirtualService.
    pub virtual_service: String,
    /// Its namespace, if it had one.
    #[serde(default, skip_serializing_if = "is_none")]
    pub namespace: Option<String>,
    /// Its `apiVersion`.
    pub api_version: String,
    /// Its `hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Its `gateways`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Index of the route in `spec.tcp`.
    pub route: usize,
}

impl RouteInfo {
    /// Parses a stored annotation; `None` if it is not a [`RouteInfo`].
    pub fn from_annotation(text: &str) -> Option<RouteInfo> {
        serde_json::from_str(text).ok()
    }
}

/// One service as an apply wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedService {
    /// The complete definition, weights included.
    pub config: ServiceConfig,
    /// The VirtualService route it comes from, if any.
    pub route: Option<RouteInfo>,
}

/// What an apply does: the new definition of every service concerned, and lines describing
/// the Istio objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Services to create or change, sorted by name.
    pub services: Vec<PlannedService>,
    /// Services whose stored VirtualService this apply replaces without routing them any
    /// more (a VirtualService re-applied with other routes): their route is forgotten, their
    /// weights stay.
    pub unrouted: Vec<String>,
    /// One line per Istio object: what it was taken to mean.
    pub objects: Vec<String>,
    /// Things the user should know (ignored fields).
    pub warnings: Vec<String>,
}

impl Plan {
    /// The change for [`crate::state::State::apply_with`].
    pub fn desired(&self) -> Desired {
        Desired {
            services: self
                .services
                .iter()
                .map(|s| DesiredService {
                    config: s.config.clone(),
                    annotation: match &s.route {
                        Some(r) => Annotation::Set(serde_json::to_string(r).unwrap_or_default()),
                        None => Annotation::Keep,
                    },
                })
                .collect(),
            clear_annotations: self.unrouted.clone(),
        }
    }
}

/// A VirtualService route resolved to one service.
struct Routed<'a> {
    doc: &'a Document,
    route_path: FieldPath,
    service: String,
    port: Option<(Port, FieldPath)>,
    /// (subset or `None` for "every subset", weight, destination path)
    destinations: Vec<(Option<String>, u32, Option<Port>, FieldPath)>,
    info: RouteInfo,
}

impl Manifest {
    /// Checks the objects against each other and against `current` (the services in the
    /// kernel) and returns the new definition of every service the apply concerns. See the
    /// module documentation for the rules.
    pub fn resolve(&self, current: &[ServiceView]) -> Result<Plan, ApplyError> {
        let kernel: HashMap<&str, &ServiceView> = current
            .iter()
            .map(|v| (v.config.name.as_str(), v))
            .collect();
        let mut plan = Plan::default();
        // VirtualService name → the services it routes, as stored with them.
        let mut stored: HashMap<String, Vec<&str>> = HashMap::new();
        for v in current {
            if let Some(info) = v.annotation.as_deref().and_then(RouteInfo::from_annotation) {
                stored
                    .entry(info.virtual_service)
                    .or_default()
                    .push(&v.config.name);
            }
        }

        // Objects by name; each name once per kind.
        let mut specs: Vec<(&Document, &ServiceSpec)> = Vec::new();
        let mut spec_by_name: HashMap<&str, (&Document, &ServiceSpec)> = HashMap::new();
        let mut gateways: HashMap<&str, (&Document, &Gateway)> = HashMap::new();
        let mut rules: HashMap<&str, (&Document, &DestinationRule)> = HashMap::new();
        let mut rule_names: HashMap<&str, &Document> = HashMap::new();
        let mut vs_names: HashMap<&str, &Document> = HashMap::new();
        for doc in &self.docs {
            let name_path = path(&["metadata", "name"]);
            let twice = |first: &Document, what: &str| {
                let line = locate(&first.text, &name_path)
                    .map(|(l, _)| format!(" (line {})", l + first.line_offset))
                    .unwrap_or_default();
                doc.error(
                    &name_path,
                    format!(
                        "{what} is defined twice in this apply: first in {}{line}",
                        first.file
                    ),
                )
            };
            match &doc.body {
                Body::Services(list) => {
                    for spec in list {
                        if let Some((first, _)) = spec_by_name.get(spec.name.as_str()) {
                            let p = FieldPath(vec![
                                Seg::Key("services".into()),
                                Seg::Key(spec.name.clone()),
                            ]);
                            let line = locate(&first.text, &p)
                                .map(|(l, _)| format!(" (line {})", l + first.line_offset))
                                .unwrap_or_default();
                            return Err(doc.error(
                                &p,
                                format!(
                                    "service {:?} is defined twice in this apply: first in \
                                     {}{line}",
                                    spec.name, first.file
                                ),
                            ));
                        }
                        spec_by_name.insert(&spec.name, (doc, spec));
                        specs.push((doc, spec));
                    }
                }
                Body::Gateway(gw) => {
                    if let Some((first, _)) = gateways.get(gw.metadata.name.as_str()) {
                        return Err(twice(first, &format!("Gateway {}", gw.metadata.name)));
                    }
                    gateways.insert(&gw.metadata.name, (doc, gw));
                }
                Body::DestinationRule(dr) => {
                    if let Some(first) = rule_names.get(dr.metadata.name.as_str()) {
                        return Err(twice(
                            first,
                            &format!("DestinationRule {}", dr.metadata.name),
                        ));
                    }
                    rule_names.insert(&dr.metadata.name, doc);
                    if let Some((first, other)) = rules.get(dr.spec.host.as_str()) {
                        return Err(doc.error(
                            &path(&["spec", "host"]),
                            format!(
                                "host {:?} already has DestinationRule {} in this apply ({}); \
                                 give each host one DestinationRule",
                                dr.spec.host, other.metadata.name, first.file
                            ),
                        ));
                    }
                    rules.insert(&dr.spec.host, (doc, dr));
                }
                Body::VirtualService(vs) => {
                    if let Some(first) = vs_names.get(vs.metadata.name.as_str()) {
                        return Err(twice(
                            first,
                            &format!("VirtualService {}", vs.metadata.name),
                        ));
                    }
                    vs_names.insert(&vs.metadata.name, doc);
                }
            }
        }

        // The subsets a service has after this apply: from its `services:` document, else
        // from the kernel.
        let subsets_of = |name: &str| -> Option<Vec<SubsetConfig>> {
            spec_by_name
                .get(name)
                .map(|(_, s)| s.subsets.clone())
                .or_else(|| kernel.get(name).map(|v| v.config.subsets.clone()))
        };
        let known_services = || {
            let mut names: Vec<&str> = spec_by_name.keys().copied().collect();
            names.extend(
                kernel
                    .keys()
                    .copied()
                    .filter(|n| !spec_by_name.contains_key(n)),
            );
            names.sort_unstable();
            match names.len() {
                0 => "there are none yet".to_owned(),
                n if n > 10 => format!("services: {}, … ({n} in all)", names[..10].join(", ")),
                _ => format!("services: {}", names.join(", ")),
            }
        };
        let no_service = |doc: &Document, p: &FieldPath, host: &str| {
            doc.error(
                p,
                format!(
                    "no tcpshift service named {host:?} ({}): declare it with its subsets' \
                     addresses in a `services:` document of this apply (e.g. `services: \
                     {{{host}: {{subsets: {{v1: 127.0.0.2:9000}}}}}}`) or in the loader's \
                     configuration",
                    known_services()
                ),
            )
        };

        // DestinationRules: their subsets must exist.
        for doc in &self.docs {
            let Body::DestinationRule(dr) = &doc.body else {
                continue;
            };
            let host = dr.spec.host.as_str();
            let Some(subsets) = subsets_of(host) else {
                return Err(no_service(doc, &path(&["spec", "host"]), host));
            };
            let mut shown = Vec::new();
            for (i, s) in dr.spec.subsets.iter().enumerate() {
                let Some(local) = subsets.iter().find(|l| l.name == s.name) else {
                    return Err(doc.error(
                        &path(&["spec", "subsets"]).index(i).key("name"),
                        unknown_subset(host, &s.name, &subsets),
                    ));
                };
                shown.push(format!("{} ({})", s.name, local.addr));
            }
            if dr.spec.traffic_policy.is_some()
                || dr.spec.subsets.iter().any(|s| s.traffic_policy.is_some())
            {
                plan.warnings.push(format!(
                    "DestinationRule {}: trafficPolicy is ignored (tcpshift places each new \
                     connection by weight only)",
                    dr.metadata.name
                ));
            }
            plan.objects.push(format!(
                "destinationrule.{GROUP}/{} accepted: host {host}, subsets {}",
                dr.metadata.name,
                if shown.is_empty() {
                    "(none)".to_owned()
                } else {
                    shown.join(", ")
                }
            ));
        }
        for doc in &self.docs {
            if let Body::Gateway(gw) = &doc.body {
                let ports: Vec<String> = gw
                    .spec
                    .servers
                    .iter()
                    .map(|s| format!("{}/TCP", s.port.number.0))
                    .collect();
                plan.objects.push(format!(
                    "gateway.{GROUP}/{} accepted: port {} (tcpshift keeps no gateway state: this \
                     is the listen port of the routes bound to it)",
                    gw.metadata.name,
                    ports.join(", ")
                ));
            }
        }

        // VirtualServices: each TCP route is one service.
        let mut routed: Vec<Routed> = Vec::new();
        let mut routed_by: HashMap<String, (String, FieldPath)> = HashMap::new();
        for doc in &self.docs {
            let Body::VirtualService(vs) = &doc.body else {
                continue;
            };
            let mut summary = Vec::new();
            for (r, route) in vs.spec.tcp.iter().enumerate() {
                let rp = path(&["spec", "tcp"]).index(r);
                let host = route
                    .route
                    .first()
                    .map(|d| d.destination.host.clone())
                    .unwrap_or_default();
                let host_path = rp.key("route").index(0).key("destination").key("host");
                if subsets_of(&host).is_none() {
                    return Err(no_service(doc, &host_path, &host));
                }
                if let Some((other, _)) = routed_by.get(&host) {
                    return Err(doc.error(
                        &host_path,
                        format!(
                            "service {host:?} is already routed by {other}; a service takes \
                             its weights from one route"
                        ),
                    ));
                }
                routed_by.insert(
                    host.clone(),
                    (
                        format!("VirtualService {} spec.tcp[{r}]", vs.metadata.name),
                        rp.clone(),
                    ),
                );
                let port = self.route_port(doc, vs, route, &rp, &gateways)?;
                let single = route.route.len() == 1;
                let destinations = route
                    .route
                    .iter()
                    .enumerate()
                    .map(|(d, dest)| {
                        let w = match dest.weight {
                            Some(Weight(w)) if w > 0 => w,
                            // A single destination receives everything.
                            _ if single => DEFAULT_SINGLE_WEIGHT,
                            _ => 0,
                        };
                        (
                            dest.destination.subset.clone(),
                            w,
                            dest.destination.port.map(|p| p.number),
                            rp.key("route").index(d).key("destination"),
                        )
                    })
                    .collect();
                let info = RouteInfo {
                    virtual_service: vs.metadata.name.clone(),
                    namespace: vs.metadata.namespace.clone(),
                    api_version: vs.api_version.clone(),
                    hosts: vs.spec.hosts.clone(),
                    gateways: vs.spec.gateways.clone(),
                    route: r,
                };
                let stored = serde_json::to_string(&info).map_or(usize::MAX, |s| s.len());
                if stored > MAX_ANNOTATION {
                    return Err(doc.error(
                        &path(&["spec", "hosts"]),
                        format!(
                            "the VirtualService's name, namespace, hosts and gateways take \
                             {stored} bytes; tcpshift keeps at most {MAX_ANNOTATION} per \
                             service: shorten the lists"
                        ),
                    ));
                }
                routed.push(Routed {
                    doc,
                    route_path: rp,
                    service: host.clone(),
                    port,
                    destinations,
                    info,
                });
                summary.push(host);
            }
            plan.objects.push(format!(
                "virtualservice.{GROUP}/{} accepted: routes service {}",
                vs.metadata.name,
                summary.join(", ")
            ));
            let routed_now: HashSet<&str> = vs
                .spec
                .tcp
                .iter()
                .filter_map(|r| r.route.first().map(|d| d.destination.host.as_str()))
                .collect();
            for name in stored.get(&vs.metadata.name).into_iter().flatten() {
                if !routed_now.contains(name) {
                    plan.unrouted.push((*name).to_owned());
                }
            }
        }

        // A route may only name subsets its host's DestinationRule (of this apply) defines.
        for r in &routed {
            let Some((_, dr)) = rules.get(r.service.as_str()) else {
                continue;
            };
            for (subset, _, _, dp) in &r.destinations {
                if let Some(sub) = subset
                    && !dr.spec.subsets.iter().any(|s| &s.name == sub)
                {
                    let defined: Vec<&str> =
                        dr.spec.subsets.iter().map(|s| s.name.as_str()).collect();
                    return Err(r.doc.error(
                        &dp.key("subset"),
                        format!(
                            "subset {sub:?} is not defined by DestinationRule {} of host {:?} \
                             (its subsets: {}); add it there",
                            dr.metadata.name,
                            r.service,
                            if defined.is_empty() {
                                "none".to_owned()
                            } else {
                                defined.join(", ")
                            }
                        ),
                    ));
                }
            }
        }

        // Every service concerned: declared in a `services:` document, or routed.
        let mut names: Vec<String> = specs.iter().map(|(_, s)| s.name.clone()).collect();
        for r in &routed {
            if !spec_by_name.contains_key(r.service.as_str()) {
                names.push(r.service.clone());
            }
        }
        names.sort();
        let routed_index: HashMap<&str, &Routed> =
            routed.iter().map(|r| (r.service.as_str(), r)).collect();
        for name in names {
            let spec = spec_by_name.get(name.as_str()).copied();
            let route = routed_index.get(name.as_str()).copied();
            let old = kernel.get(name.as_str()).copied();
            plan.services.push(plan_service(&name, spec, route, old)?);
        }
        // Listen addresses: unique among the planned services and the others.
        let mut taken = ListenClaims::new();
        let planned: HashSet<&str> = plan
            .services
            .iter()
            .map(|s| s.config.name.as_str())
            .collect();
        for v in current {
            if !planned.contains(v.config.name.as_str()) {
                // The kernel never holds two services on one key.
                let _ = taken.claim(&v.config.listen, &v.config.name);
            }
        }
        for s in &plan.services {
            if let Err(ListenTaken { owner: other, .. }) =
                taken.claim(&s.config.listen, &s.config.name)
            {
                let (doc, p) = match (
                    spec_by_name.get(s.config.name.as_str()),
                    routed_index.get(s.config.name.as_str()),
                ) {
                    (_, Some(r)) => (
                        r.doc,
                        r.port
                            .as_ref()
                            .map_or_else(|| r.route_path.clone(), |(_, p)| p.clone()),
                    ),
                    (Some((doc, spec)), None) => (*doc, spec_path(spec).key("listen")),
                    (None, None) => continue,
                };
                return Err(doc.error(
                    &p,
                    format!(
                        "service {:?} would listen on {}, which service {other:?} already \
                         uses; each service needs its own port or address",
                        s.config.name, s.config.listen
                    ),
                ));
            }
        }
        Ok(plan)
    }

    /// The listen port a route gives: its `match.port`, else the TCP port of the Gateway (of
    /// this apply) it is bound to. A `match.port` must be a port of that Gateway.
    fn route_port(
        &self,
        doc: &Document,
        vs: &VirtualService,
        route: &TcpRoute,
        rp: &FieldPath,
        gateways: &HashMap<&str, (&Document, &Gateway)>,
    ) -> Result<Option<(Port, FieldPath)>, ApplyError> {
        let matched = route
            .matches
            .iter()
            .enumerate()
            .find_map(|(m, c)| c.port.map(|p| (p, rp.key("match").index(m).key("port"))));
        let bound: Vec<(&str, Vec<Port>)> = vs
            .spec
            .gateways
            .iter()
            .filter_map(|g| {
                gateways.get(g.as_str()).map(|(_, gw)| {
                    let mut ports: Vec<Port> =
                        gw.spec.servers.iter().map(|s| s.port.number).collect();
                    ports.sort_unstable();
                    ports.dedup();
                    (g.as_str(), ports)
                })
            })
            .collect();
        match matched {
            Some((p, mp)) => {
                if !bound.is_empty() && !bound.iter().any(|(_, ports)| ports.contains(&p)) {
                    let have: Vec<String> = bound
                        .iter()
                        .map(|(g, ports)| {
                            let ports: Vec<String> =
                                ports.iter().map(|p| p.0.to_string()).collect();
                            format!("{g}: {}", ports.join(", "))
                        })
                        .collect();
                    return Err(doc.error(
                        &mp,
                        format!(
                            "port {} is not a port of the gateways this VirtualService is \
                             bound to ({}); expected one of their server ports",
                            p.0,
                            have.join("; ")
                        ),
                    ));
                }
                Ok(Some((p, mp)))
            }
            None => {
                let mut ports: Vec<Port> = bound.iter().flat_map(|(_, p)| p.clone()).collect();
                ports.sort_unstable();
                ports.dedup();
                match ports.as_slice() {
                    [] => Ok(None),
                    [one] => Ok(Some((*one, path(&["spec", "gateways"])))),
                    many => Err(doc.error(
                        rp,
                        format!(
                            "the route has no `match: [{{port: ...}}]` and its gateways have \
                             several ports ({}); say which one with `match: [{{port: {}}}]`",
                            many.iter()
                                .map(|p| p.0.to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                            many.first().map_or(0, |p| p.0)
                        ),
                    )),
                }
            }
        }
    }

    /// The services a `tcpshiftctl delete -f` of these files removes: those of `services:`
    /// documents, the hosts of VirtualService routes and of DestinationRules, and the
    /// services whose stored route comes from one of the VirtualServices. Gateways remove
    /// nothing. Sorted, without duplicates.
    pub fn services_to_delete(&self, current: &[ServiceView]) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        let mut vs_names: HashSet<&str> = HashSet::new();
        for doc in &self.docs {
            match &doc.body {
                Body::Services(specs) => names.extend(specs.iter().map(|s| s.name.clone())),
                Body::VirtualService(vs) => {
                    vs_names.insert(&vs.metadata.name);
                    for r in &vs.spec.tcp {
                        names.extend(r.route.iter().map(|d| d.destination.host.clone()));
                    }
                }
                Body::DestinationRule(dr) => names.push(dr.spec.host.clone()),
                Body::Gateway(_) => {}
            }
        }
        for v in current {
            if let Some(info) = v.annotation.as_deref().and_then(RouteInfo::from_annotation)
                && vs_names.contains(info.virtual_service.as_str())
            {
                names.push(v.config.name.clone());
            }
        }
        names.sort();
        names.dedup();
        names
    }
}

fn spec_path(spec: &ServiceSpec) -> FieldPath {
    FieldPath(vec![
        Seg::Key("services".into()),
        Seg::Key(spec.name.clone()),
    ])
}

fn unknown_subset(host: &str, subset: &str, subsets: &[SubsetConfig]) -> String {
    let have: Vec<String> = subsets
        .iter()
        .map(|s| format!("{} ({})", s.name, s.addr))
        .collect();
    // An example address next to the others: same port, next loopback address.
    let port = subsets.first().map_or(9000, |s| s.addr.port());
    let example = format!("127.0.0.{}:{port}", (subsets.len() + 2).min(254));
    format!(
        "service {host:?} has no subset {subset:?} (its subsets: {}); declare its address in \
         the `services:` document, e.g. `services: {{{host}: {{subsets: {{..., {subset}: \
         {example}}}}}}}`",
        have.join(", ")
    )
}

/// The new definition of one service.
fn plan_service(
    name: &str,
    spec: Option<(&Document, &ServiceSpec)>,
    route: Option<&Routed>,
    old: Option<&ServiceView>,
) -> Result<PlannedService, ApplyError> {
    let mut subsets: Vec<SubsetConfig> = match (spec, old) {
        (Some((_, s)), _) => s.subsets.clone(),
        (None, Some(v)) => v.config.subsets.clone(),
        // `resolve` only plans services that are declared or in the kernel.
        (None, None) => Vec::new(),
    };

    // Listen address.
    let spec_listen = spec.and_then(|(_, s)| s.listen);
    let listen = match (route.and_then(|r| r.port.as_ref()), spec_listen) {
        (Some((port, port_path)), Some(l)) => {
            if let (Some((doc, s)), Some(r)) = (spec, route)
                && l.port() != port.0
            {
                return Err(doc.error(
                    &spec_path(s).key("listen"),
                    format!(
                        "listen port {} differs from port {} that VirtualService {} routes ({} \
                         in {}); give one port",
                        l.port(),
                        port.0,
                        r.info.virtual_service,
                        port_path,
                        r.doc.file
                    ),
                ));
            }
            l
        }
        (Some((port, _)), None) => match old.map(|v| v.config.listen) {
            Some(Listen::Addr(a)) => Listen::Addr(std::net::SocketAddr::new(a.ip(), port.0)),
            _ => Listen::Any { port: port.0 },
        },
        (None, Some(l)) => l,
        (None, None) => match old {
            Some(v) => v.config.listen,
            None => {
                let (doc, p) = match (spec, route) {
                    (Some((d, s)), _) => (d, spec_path(s)),
                    (None, Some(r)) => (r.doc, r.route_path.clone()),
                    (None, None) => {
                        return Err(ApplyError::from(Located {
                            file: String::new(),
                            line: None,
                            column: None,
                            object: None,
                            field: None,
                            message: format!("service {name:?}: no listen port"),
                        }));
                    }
                };
                return Err(doc.error(
                    &p,
                    format!(
                        "service {name:?} has no listen port: give `listen: PORT` in the \
                         `services:` document, or route it with a VirtualService whose TCP \
                         route matches a port (`match: [{{port: 31400}}]`)"
                    ),
                ));
            }
        },
    };

    // Weights.
    if let Some(r) = route {
        if let Some((doc, s)) = spec
            && s.weights_given
        {
            return Err(doc.error(
                &spec_path(s).key("weights"),
                format!(
                    "service {name:?} gets weights both here and from VirtualService {} ({}); \
                     give them in one place",
                    r.info.virtual_service, r.doc.file
                ),
            ));
        }
        for s in subsets.iter_mut() {
            s.weight = 0;
        }
        for (subset, weight, port, dp) in &r.destinations {
            match subset {
                Some(sub) => {
                    let Some(local) = subsets.iter_mut().find(|s| &s.name == sub) else {
                        return Err(r.doc.error(
                            &dp.key("subset"),
                            unknown_subset(name, sub, &spec_or_old(spec, old)),
                        ));
                    };
                    if let Some(p) = port
                        && p.0 != local.addr.port()
                    {
                        return Err(r.doc.error(
                            &dp.key("port").key("number"),
                            port_mismatch(p.0, &[(&local.name, local.addr)]),
                        ));
                    }
                    local.weight = *weight;
                }
                None => {
                    if let Some(p) = port {
                        let wrong: Vec<(&str, std::net::SocketAddr)> = subsets
                            .iter()
                            .filter(|s| s.addr.port() != p.0)
                            .map(|s| (s.name.as_str(), s.addr))
                            .collect();
                        if !wrong.is_empty() {
                            return Err(r
                                .doc
                                .error(&dp.key("port").key("number"), port_mismatch(p.0, &wrong)));
                        }
                    }
                    // Like a Kubernetes Service over all its pods: every subset equally.
                    for s in subsets.iter_mut() {
                        s.weight = 1;
                    }
                }
            }
        }
        // A DestinationRule in the kernel is not known; one in the apply was checked above.
    } else {
        let given = spec.is_some_and(|(_, s)| s.weights_given);
        if !given {
            match old {
                Some(v) => {
                    for s in subsets.iter_mut() {
                        s.weight = v
                            .config
                            .subsets
                            .iter()
                            .find(|o| o.name == s.name)
                            .map_or(0, |o| o.weight);
                    }
                    if subsets.iter().all(|s| s.weight == 0)
                        && let Some((doc, s)) = spec
                    {
                        return Err(doc.error(
                            &spec_path(s),
                            format!(
                                "`weights` is missing, and none of the subsets kept from the \
                                 service in the kernel has a weight above 0; add e.g. \
                                 `weights: {{{}: 100}}` or route the service with a \
                                 VirtualService",
                                subsets.first().map_or("v1", |s| s.name.as_str())
                            ),
                        ));
                    }
                }
                None if subsets.len() == 1 => {
                    if let Some(s) = subsets.first_mut() {
                        s.weight = DEFAULT_SINGLE_WEIGHT;
                    }
                }
                None => {
                    if let Some((doc, s)) = spec {
                        let example = subsets
                            .iter()
                            .enumerate()
                            .map(|(i, s)| format!("{}: {}", s.name, if i == 0 { 100 } else { 0 }))
                            .collect::<Vec<_>>()
                            .join(", ");
                        return Err(doc.error(
                            &spec_path(s),
                            format!(
                                "new service {name:?} has several subsets but no weights: add \
                                 `weights: {{{example}}}`, or route it with a VirtualService \
                                 in the same apply"
                            ),
                        ));
                    }
                }
            }
        }
    }

    Ok(PlannedService {
        config: ServiceConfig {
            name: name.to_owned(),
            listen,
            subsets,
        },
        route: route.map(|r| r.info.clone()),
    })
}

fn spec_or_old(
    spec: Option<(&Document, &ServiceSpec)>,
    old: Option<&ServiceView>,
) -> Vec<SubsetConfig> {
    match (spec, old) {
        (Some((_, s)), _) => s.subsets.clone(),
        (None, Some(v)) => v.config.subsets.clone(),
        _ => Vec::new(),
    }
}

fn port_mismatch(port: u16, subsets: &[(&str, std::net::SocketAddr)]) -> String {
    let shown: Vec<String> = subsets
        .iter()
        .map(|(n, a)| format!("subset {n} listens on {a}"))
        .collect();
    let expected = subsets.first().map_or(0, |(_, a)| a.port());
    format!(
        "port {port} is not the port of the subset's address ({}): a destination port is \
         the port the subset's server listens on, like a Kubernetes service port; expected \
         {expected}, or leave `port` out",
        shown.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// Showing the kernel's routing as Istio objects

/// The VirtualServices that describe the services in the kernel, sorted by name: a service
/// applied from a VirtualService route is shown in that VirtualService (with its hosts and
/// gateways); any other service as a VirtualService of its own name. Weights are the
/// kernel's; subsets with weight 0 are left out (a route gives them 0), so applying the
/// output again changes nothing.
pub fn virtual_services(views: &[ServiceView]) -> Vec<VirtualService> {
    let mut by_name: BTreeMap<String, Vec<(usize, RouteInfo, &ServiceView)>> = BTreeMap::new();
    for v in views {
        let info = v
            .annotation
            .as_deref()
            .and_then(RouteInfo::from_annotation)
            .unwrap_or_else(|| RouteInfo {
                virtual_service: v.config.name.clone(),
                namespace: None,
                api_version: DEFAULT_API_VERSION.to_owned(),
                hosts: vec![v.config.name.clone()],
                gateways: Vec::new(),
                route: 0,
            });
        by_name
            .entry(info.virtual_service.clone())
            .or_default()
            .push((info.route, info, v));
    }
    by_name
        .into_iter()
        .map(|(name, mut routes)| {
            routes.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.config.name.cmp(&b.2.config.name)));
            let first = routes.first().map(|(_, i, _)| i.clone());
            let tcp = routes
                .iter()
                .map(|(_, _, v)| TcpRoute {
                    matches: vec![L4Match {
                        port: Some(Port(v.config.listen.port())),
                        ..L4Match::default()
                    }],
                    route: v
                        .config
                        .subsets
                        .iter()
                        .filter(|s| s.weight > 0)
                        .map(|s| RouteDestination {
                            destination: Destination {
                                host: v.config.name.clone(),
                                port: Some(PortSelector {
                                    number: Port(s.addr.port()),
                                }),
                                subset: Some(s.name.clone()),
                            },
                            weight: Some(Weight(s.weight)),
                        })
                        .collect(),
                })
                .collect();
            let info = first.unwrap_or_else(|| RouteInfo {
                virtual_service: name.clone(),
                namespace: None,
                api_version: DEFAULT_API_VERSION.to_owned(),
                hosts: Vec::new(),
                gateways: Vec::new(),
                route: 0,
            });
            Object {
                api_version: info.api_version,
                kind: "VirtualService".to_owned(),
                metadata: Metadata {
                    name,
                    namespace: info.namespace,
                    ..Metadata::default()
                },
                spec: VirtualServiceSpec {
                    hosts: info.hosts,
                    gateways: info.gateways,
                    tcp,
                    ..VirtualServiceSpec::default()
                },
                status: None,
            }
        })
        .collect()
}

/// The VirtualService called `name` (see [`virtual_services`]).
pub fn virtual_service(views: &[ServiceView], name: &str) -> Option<VirtualService> {
    virtual_services(views)
        .into_iter()
        .find(|vs| vs.metadata.name == name)
}

/// The VirtualServices' names that `tcpshiftctl delete virtualservice NAME` maps to
/// services: the services shown in VirtualService `name` (see [`virtual_services`]).
pub fn services_of_virtual_service(views: &[ServiceView], name: &str) -> Vec<String> {
    views
        .iter()
        .filter(
            |v| match v.annotation.as_deref().and_then(RouteInfo::from_annotation) {
                Some(info) => info.virtual_service == name,
                None => v.config.name == name,
            },
        )
        .map(|v| v.config.name.clone())
        .collect()
}

/// A `services:` document describing `views` (the loader's configuration format, weights
/// included): what `tcpshiftctl get services -o yaml` prints.
pub fn services_document(views: &[ServiceView]) -> Value {
    let mut services = Mapping::new();
    for v in views {
        let mut svc = Mapping::new();
        let listen = match v.config.listen {
            Listen::Any { port } => Value::from(port),
            Listen::Addr(a) => Value::from(a.to_string()),
        };
        svc.insert("listen".into(), listen);
        let mut subsets = Mapping::new();
        let mut weights = Mapping::new();
        for s in &v.config.subsets {
            subsets.insert(s.name.clone().into(), s.addr.to_string().into());
            weights.insert(s.name.clone().into(), s.weight.into());
        }
        svc.insert("subsets".into(), Value::Mapping(subsets));
        svc.insert("weights".into(), Value::Mapping(weights));
        services.insert(v.config.name.clone().into(), Value::Mapping(svc));
    }
    let mut doc = Mapping::new();
    doc.insert("services".into(), Value::Mapping(services));
    Value::Mapping(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddr;

    const ALL_V1: &str = include_str!("../tests/fixtures/istio/tcp-echo-all-v1.yaml");
    const V2_20: &str = include_str!("../tests/fixtures/istio/tcp-echo-20-v2.yaml");
    const FIFTY: &str = include_str!("../tests/fixtures/istio/tcp-echo-50-50.yaml");
    const SERVICES: &str = include_str!("../tests/fixtures/istio/tcp-echo-services.yaml");
    const BAD_WEIGHT: &str = include_str!("../tests/fixtures/istio/bad-weight.yaml");
    const UNKNOWN_SUBSET: &str = include_str!("../tests/fixtures/istio/unknown-subset.yaml");
    const UNKNOWN_FIELD: &str = include_str!("../tests/fixtures/istio/unknown-field.yaml");
    const WRONG_TYPES: &str = include_str!("../tests/fixtures/istio/wrong-types.yaml");
    const PORT_MISMATCH: &str = include_str!("../tests/fixtures/istio/port-mismatch.yaml");
    const TRUNCATED: &str = include_str!("../tests/fixtures/istio/truncated.yaml");

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Parses each (name, text) as one file of one apply.
    fn manifest(files: &[(&str, &str)]) -> Result<Manifest, ApplyError> {
        let mut m = Manifest::default();
        for (name, text) in files {
            m.extend(Manifest::parse(text, name)?);
        }
        Ok(m)
    }

    fn plan(files: &[(&str, &str)], current: &[ServiceView]) -> Result<Plan, ApplyError> {
        manifest(files)?.resolve(current)
    }

    fn err(files: &[(&str, &str)], current: &[ServiceView]) -> String {
        match plan(files, current) {
            Ok(p) => panic!("expected an error, got {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for part in parts {
            assert!(msg.contains(part), "{msg:?} does not contain {part:?}");
        }
    }

    /// The kernel after applying `plan` on top of `current` (what State::apply_with does).
    fn kernel_after(current: &[ServiceView], plan: &Plan) -> Vec<ServiceView> {
        let mut out: Vec<ServiceView> = current.to_vec();
        let desired = plan.desired();
        for d in desired.services {
            let annotation = match &d.annotation {
                Annotation::Set(a) => Some(a.clone()),
                _ => None,
            };
            match out.iter_mut().find(|v| v.config.name == d.config.name) {
                Some(v) => {
                    v.live = vec![true; d.config.subsets.len()];
                    v.config = d.config;
                    if annotation.is_some() {
                        v.annotation = annotation;
                    }
                }
                None => out.push(ServiceView {
                    id: out.len() as u32,
                    live: vec![true; d.config.subsets.len()],
                    config: d.config,
                    annotation,
                }),
            }
        }
        for name in desired.clear_annotations {
            if let Some(v) = out.iter_mut().find(|v| v.config.name == name) {
                v.annotation = None;
            }
        }
        out.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        out
    }

    fn weights_of(p: &Plan, service: &str) -> Vec<(String, u32)> {
        p.services
            .iter()
            .find(|s| s.config.name == service)
            .map(|s| {
                s.config
                    .subsets
                    .iter()
                    .map(|s| (s.name.clone(), s.weight))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn seed_kernel() -> Vec<ServiceView> {
        let p = plan(&[("services.yaml", SERVICES), ("all-v1.yaml", ALL_V1)], &[]).unwrap();
        kernel_after(&[], &p)
    }

    #[test]
    fn seed_all_v1_then_20_v2() {
        let p = plan(
            &[
                ("tcp-echo-services.yaml", SERVICES),
                ("tcp-echo-all-v1.yaml", ALL_V1),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(p.services.len(), 1);
        let svc = &p.services[0];
        assert_eq!(svc.config.name, "tcp-echo");
        assert_eq!(svc.config.listen, Listen::Any { port: 31400 });
        assert_eq!(
            svc.config.subsets,
            vec![
                SubsetConfig {
                    name: "v1".into(),
                    addr: addr("127.0.0.2:9000"),
                    weight: 100
                },
                SubsetConfig {
                    name: "v2".into(),
                    addr: addr("127.0.0.3:9000"),
                    weight: 0
                },
            ]
        );
        assert_eq!(
            svc.route,
            Some(RouteInfo {
                virtual_service: "tcp-echo".into(),
                namespace: None,
                api_version: "networking.istio.io/v1".into(),
                hosts: vec!["*".into()],
                gateways: vec!["tcp-echo-gateway".into()],
                route: 0,
            })
        );
        assert_eq!(
            p.objects,
            [
                "destinationrule.networking.istio.io/tcp-echo-destination accepted: host \
                 tcp-echo, subsets v1 (127.0.0.2:9000), v2 (127.0.0.3:9000)",
                "gateway.networking.istio.io/tcp-echo-gateway accepted: port 31400/TCP \
                 (tcpshift keeps no gateway state: this is the listen port of the routes bound \
                 to it)",
                "virtualservice.networking.istio.io/tcp-echo accepted: routes service tcp-echo",
            ]
        );
        assert!(p.warnings.is_empty());

        // Step 4 of the seed: the 20-v2 file alone, against the kernel.
        let kernel = kernel_after(&[], &p);
        let p = plan(&[("tcp-echo-20-v2.yaml", V2_20)], &kernel).unwrap();
        assert_eq!(
            weights_of(&p, "tcp-echo"),
            [("v1".into(), 80), ("v2".into(), 20)]
        );
        assert_eq!(p.services[0].config.listen, Listen::Any { port: 31400 });
        let p = plan(&[("50-50.yaml", FIFTY)], &kernel).unwrap();
        assert_eq!(
            weights_of(&p, "tcp-echo"),
            [("v1".into(), 50), ("v2".into(), 50)]
        );
        // All three in one file, in any order.
        let all = format!("{V2_20}---\n{SERVICES}---\n{ALL_V1}");
        let p = plan(&[("all.yaml", &all)], &[]);
        assert_contains(
            &p.unwrap_err().to_string(),
            &["VirtualService tcp-echo is defined twice"],
        );
        let all = format!("{V2_20}---\n{SERVICES}");
        let p = plan(&[("all.yaml", &all)], &[]).unwrap();
        assert_eq!(
            weights_of(&p, "tcp-echo"),
            [("v1".into(), 80), ("v2".into(), 20)]
        );
    }

    #[test]
    fn every_api_version() {
        for v in VERSIONS {
            let text = ALL_V1.replace("networking.istio.io/v1\n", &format!("{GROUP}/{v}\n"));
            let p = plan(&[("s.yaml", SERVICES), ("a.yaml", &text)], &[]).unwrap();
            assert_eq!(
                weights_of(&p, "tcp-echo"),
                [("v1".into(), 100), ("v2".into(), 0)]
            );
            assert_eq!(
                p.services[0].route.as_ref().map(|r| r.api_version.clone()),
                Some(format!("{GROUP}/{v}"))
            );
        }
        let text = ALL_V1.replace(
            "networking.istio.io/v1\nkind: Gateway",
            "networking.istio.io/v2\nkind: Gateway",
        );
        assert_eq!(
            err(&[("a.yaml", &text)], &[]),
            "a.yaml:3:13: apiVersion: unsupported version \"v2\" of networking.istio.io; \
             expected one of networking.istio.io/v1, networking.istio.io/v1beta1, \
             networking.istio.io/v1alpha3"
        );
    }

    #[test]
    fn error_fixtures() {
        let kernel = seed_kernel();
        let cases: &[(&str, &str, &str)] = &[
            (
                "bad-weight.yaml",
                BAD_WEIGHT,
                "bad-weight.yaml:20:15: VirtualService tcp-echo: spec.tcp[0].route[1].weight: \
                 weight -20 is negative; expected an integer in 0..=1000000",
            ),
            (
                "unknown-subset.yaml",
                UNKNOWN_SUBSET,
                "unknown-subset.yaml:19:17: VirtualService tcp-echo: \
                 spec.tcp[0].route[1].destination.subset: service \"tcp-echo\" has no subset \
                 \"v3\" (its subsets: v1 (127.0.0.2:9000), v2 (127.0.0.3:9000)); declare its \
                 address in the `services:` document, e.g. `services: {tcp-echo: {subsets: \
                 {..., v3: 127.0.0.4:9000}}}`",
            ),
            (
                "unknown-field.yaml",
                UNKNOWN_FIELD,
                "unknown-field.yaml:16:7: VirtualService tcp-echo: spec.tcp[0].route[0]: \
                 unknown field `wieght`, expected `destination` or `weight`",
            ),
            (
                "wrong-types.yaml",
                WRONG_TYPES,
                "wrong-types.yaml:16:15: VirtualService tcp-echo: spec.tcp[0].route[0].weight: \
                 weight \"80\" is a string; expected an integer in 0..=1000000 (without quotes)",
            ),
            (
                "port-mismatch.yaml",
                PORT_MISMATCH,
                "port-mismatch.yaml:16:19: VirtualService tcp-echo: \
                 spec.tcp[0].route[0].destination.port.number: port 9001 is not the port of \
                 the subset's address (subset v1 listens on 127.0.0.2:9000): a destination \
                 port is the port the subset's server listens on, like a Kubernetes service \
                 port; expected 9000, or leave `port` out",
            ),
            (
                "truncated.yaml",
                TRUNCATED,
                "truncated.yaml:15:9: found unexpected end of stream, while scanning a quoted \
                 scalar at line 15 column 7",
            ),
        ];
        for (name, text, expected) in cases {
            let message = err(&[(name, text)], &kernel);
            assert_eq!(&message, expected, "{name}");
        }
    }

    /// Every error case, with exactly what it prints (the kernel holds the seed's service).
    #[test]
    fn error_messages() {
        let kernel = seed_kernel();
        let cases: Vec<(&str, String, &str)> = vec![
            ("empty", "".into(), "f.yaml: no YAML documents; expected Istio VirtualService, DestinationRule or Gateway objects and/or a tcpshift `services:` document"),
            ("comments only", "# x\n---\n# y\n".into(), "f.yaml: no YAML documents; expected Istio VirtualService, DestinationRule or Gateway objects and/or a tcpshift `services:` document"),
            ("scalar doc", "hello\n".into(), "f.yaml:1:1: the document is the string \"hello\"; expected networking.istio.io VirtualService, DestinationRule and Gateway objects, and tcpshift `services:` documents"),
            ("list doc", "- a\n- b\n".into(), "f.yaml:1:1: the document is a list; expected networking.istio.io VirtualService, DestinationRule and Gateway objects, and tcpshift `services:` documents"),
            ("no kind", "apiVersion: networking.istio.io/v1\nmetadata: {name: a}\n".into(), "f.yaml:1:1: missing field `kind`; expected VirtualService, DestinationRule or Gateway"),
            ("no apiVersion", "kind: VirtualService\nmetadata: {name: a}\n".into(), "f.yaml:1:1: missing field `apiVersion`; expected networking.istio.io/v1"),
            ("k8s service", "apiVersion: v1\nkind: Service\nmetadata: {name: tcp-echo}\nspec: {}\n".into(), "f.yaml:2:7: kind: Service (v1) is not something tcpshift applies; it applies networking.istio.io VirtualService, DestinationRule and Gateway objects, and tcpshift `services:` documents (where the subsets' servers listen is said by the `services:` document, not by Kubernetes Services or Deployments)"),
            ("serviceentry", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec: {}\n".into(), "f.yaml:2:7: kind: networking.istio.io kind \"ServiceEntry\" is not supported; tcpshift applies VirtualService, DestinationRule and Gateway"),
            ("kind int", "apiVersion: networking.istio.io/v1\nkind: 5\n".into(), "f.yaml:2:7: kind: got the number 5; expected a string"),
            ("wrong apiVersion for VS", "apiVersion: v1\nkind: VirtualService\n".into(), "f.yaml:1:13: apiVersion: \"v1\" is not Istio's networking API; expected one of networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3"),
            ("neither", "foo: bar\n".into(), "f.yaml:1:1: neither a tcpshift `services:` document nor a Kubernetes object (no `apiVersion` and `kind`); expected networking.istio.io VirtualService, DestinationRule and Gateway objects, and tcpshift `services:` documents"),
            ("second doc bad", format!("{V2_20}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g}}\nspec:\n  servers:\n  - port: {{number: 80, name: http, protocol: HTTP}}\n    hosts: ['*']\n"), "f.yaml:34:46: Gateway g: spec.servers[0].port.protocol: protocol \"HTTP\" is not supported: tcpshift steers plain TCP connections in the kernel, without a proxy; expected TCP"),
            ("bad name", V2_20.replace("name: tcp-echo\nspec", "name: TCP_Echo\nspec"), "f.yaml:6:9: VirtualService TCP_Echo: metadata.name: invalid name \"TCP_Echo\"; expected a Kubernetes object name: 1 to 253 characters from a-z 0-9 - ., starting and ending with a letter or digit"),
            ("missing name", V2_20.replace("  name: tcp-echo\nspec", "  namespace: x\nspec"), "f.yaml:6:3: VirtualService: metadata: missing field `name`"),
            ("http", V2_20.replace("  tcp:\n", "  http:\n  - route: [{destination: {host: x}}]\n  tcp:\n"), "f.yaml:13:3: VirtualService tcp-echo: spec.http: HTTP routes are not supported: tcpshift steers TCP connections in the kernel, without a proxy; use `tcp` routes"),
            ("no tcp", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: ['*']}\n".into(), "f.yaml:4:7: VirtualService a: spec: no `tcp` routes; expected at least one, e.g. `tcp: [{match: [{port: 31400}], route: [{destination: {host: tcp-echo, subset: v1}}]}]`"),
            ("hosts string", V2_20.replace("  hosts:\n  - \"*\"\n", "  hosts: \"*\"\n"), "f.yaml:8:10: VirtualService tcp-echo: spec.hosts: invalid type: string \"*\", expected a sequence"),
            ("port string", V2_20.replace("- port: 31400", "- port: \"31400\""), "f.yaml:14:13: VirtualService tcp-echo: spec.tcp[0].match[0].port: port \"31400\" is a string; expected a port number in 1..=65535 (without quotes)"),
            ("port 0", V2_20.replace("- port: 31400", "- port: 0"), "f.yaml:14:13: VirtualService tcp-echo: spec.tcp[0].match[0].port: port 0 is out of range; expected a port number in 1..=65535"),
            ("port big", V2_20.replace("- port: 31400", "- port: 70000"), "f.yaml:14:13: VirtualService tcp-echo: spec.tcp[0].match[0].port: port 70000 is out of range; expected a port number in 1..=65535"),
            ("weight float", V2_20.replace("weight: 80", "weight: 80.5"), "f.yaml:21:15: VirtualService tcp-echo: spec.tcp[0].route[0].weight: weight 80.5 is not an integer; expected an integer in 0..=1000000"),
            ("weight big", V2_20.replace("weight: 80", "weight: 1000001"), "f.yaml:21:15: VirtualService tcp-echo: spec.tcp[0].route[0].weight: weight 1000001 is too large; expected an integer in 0..=1000000 (weights are relative)"),
            ("all zero", V2_20.replace("weight: 80", "weight: 0").replace("weight: 20", "weight: 0"), "f.yaml:16:5: VirtualService tcp-echo: spec.tcp[0].route: all weights are 0 (a missing weight counts as 0 when a route has several destinations); at least one destination needs a weight above 0, e.g. `weight: 100`"),
            ("two hosts", V2_20.replacen("host: tcp-echo", "host: other", 1), "f.yaml:23:15: VirtualService tcp-echo: spec.tcp[0].route[1].destination.host: host \"tcp-echo\" differs from \"other\" of the route's first destination; the destinations of one route must be subsets of one service (a tcpshift service has one listen port and one set of weights): give each service its own route"),
            ("unknown host", V2_20.replace("host: tcp-echo", "host: nope"), "f.yaml:17:15: VirtualService tcp-echo: spec.tcp[0].route[0].destination.host: no tcpshift service named \"nope\" (services: tcp-echo): declare it with its subsets' addresses in a `services:` document of this apply (e.g. `services: {nope: {subsets: {v1: 127.0.0.2:9000}}}`) or in the loader's configuration"),
            ("dup subset", V2_20.replace("subset: v2", "subset: v1"), "f.yaml:26:17: VirtualService tcp-echo: spec.tcp[0].route[1].destination.subset: subset \"v1\" is named twice in this route; name each subset once"),
            ("no subset multi", V2_20.replace("        subset: v2\n", ""), "f.yaml:23:9: VirtualService tcp-echo: spec.tcp[0].route[1].destination: no `subset`; when a route has several destinations each names a subset"),
            ("source labels", V2_20.replace("- port: 31400", "- port: 31400\n      sourceLabels: {app: x}"), "f.yaml:15:21: VirtualService tcp-echo: spec.tcp[0].match[0].sourceLabels: `sourceLabels` is not supported: tcpshift steers every new connection to the port; remove it"),
            ("two ports", V2_20.replace("- port: 31400", "- port: 31400\n    - port: 31401"), "f.yaml:15:13: VirtualService tcp-echo: spec.tcp[0].match[1].port: a second port (31401) for one route (the first is 31400); a tcpshift service listens on one port: give each port its own route and service"),
            ("port not in gateway", ALL_V1.replace("- port: 31400", "- port: 31401"), "f.yaml:43:13: VirtualService tcp-echo: spec.tcp[0].match[0].port: port 31401 is not a port of the gateways this VirtualService is bound to (tcp-echo-gateway: 31400); expected one of their server ports"),
            ("dest port mismatch", V2_20.replace("number: 9000\n        subset: v2", "number: 9001\n        subset: v2"), "f.yaml:25:19: VirtualService tcp-echo: spec.tcp[0].route[1].destination.port.number: port 9001 is not the port of the subset's address (subset v2 listens on 127.0.0.3:9000): a destination port is the port the subset's server listens on, like a Kubernetes service port; expected 9000, or leave `port` out"),
            ("dr unknown subset", ALL_V1.replace("  - name: v2\n", "  - name: v3\n"), "f.yaml:28:11: DestinationRule tcp-echo-destination: spec.subsets[1].name: service \"tcp-echo\" has no subset \"v3\" (its subsets: v1 (127.0.0.2:9000), v2 (127.0.0.3:9000)); declare its address in the `services:` document, e.g. `services: {tcp-echo: {subsets: {..., v3: 127.0.0.4:9000}}}`"),
            ("gateway tls", ALL_V1.replace("      protocol: TCP\n", "      protocol: TCP\n    tls: {mode: SIMPLE}\n"), "f.yaml:15:10: Gateway tcp-echo-gateway: spec.servers[0].tls: `tls` is not supported: tcpshift steers plain TCP connections without a proxy; remove it (the listen address of a service goes in the `services:` document)"),
            ("gateway protocol", ALL_V1.replace("protocol: TCP", "protocol: HTTP"), "f.yaml:14:17: Gateway tcp-echo-gateway: spec.servers[0].port.protocol: protocol \"HTTP\" is not supported: tcpshift steers plain TCP connections in the kernel, without a proxy; expected TCP"),
            ("dup gateway", format!("{ALL_V1}\n---\n{}", ALL_V1.split("---").next().unwrap_or("")), "f.yaml:57:9: Gateway tcp-echo-gateway: metadata.name: Gateway tcp-echo-gateway is defined twice in this apply: first in f.yaml (line 6)"),
            ("vs and weights", format!("{V2_20}---\nservices:\n  tcp-echo:\n    subsets: {{v1: 127.0.0.2:9000, v2: 127.0.0.3:9000}}\n    weights: {{v1: 1}}\n"), "f.yaml:32:14: services.tcp-echo.weights: service \"tcp-echo\" gets weights both here and from VirtualService tcp-echo (f.yaml); give them in one place"),
            ("listen mismatch", format!("{V2_20}---\nservices:\n  tcp-echo:\n    listen: 31401\n    subsets: {{v1: 127.0.0.2:9000, v2: 127.0.0.3:9000}}\n"), "f.yaml:31:13: services.tcp-echo.listen: listen port 31401 differs from port 31400 that VirtualService tcp-echo routes (spec.tcp[0].match[0].port in f.yaml); give one port"),
            ("services bad in 2nd doc", format!("{V2_20}---\nservices:\n  tcp-echo:\n    subsets: {{v1: localhost:9000}}\n"), "f.yaml:31:19: services.tcp-echo.subsets.v1: subset address \"localhost:9000\": \"localhost\" is a host name but an IP address is needed (names are not resolved); expected IPv4:PORT (127.0.0.1:9001) or [IPv6]:PORT (\"[::1]:9001\", quoted)"),
            ("services unknown field", format!("{V2_20}---\nservices:\n  tcp-echo:\n    subset: {{v1: 127.0.0.2:9000}}\n"), "f.yaml:31:5: services.tcp-echo: unknown field `subset`, expected one of `listen`, `subsets`, `weights`"),
            ("new svc no weights", "services:\n  x:\n    listen: 5000\n    subsets: {a: 127.0.0.1:1, b: 127.0.0.1:2}\n".into(), "f.yaml:3:5: services.x: new service \"x\" has several subsets but no weights: add `weights: {a: 100, b: 0}`, or route it with a VirtualService in the same apply"),
            ("new svc no listen", "services:\n  x:\n    subsets: {a: 127.0.0.1:1}\n".into(), "f.yaml:3:5: services.x: service \"x\" has no listen port: give `listen: PORT` in the `services:` document, or route it with a VirtualService whose TCP route matches a port (`match: [{port: 31400}]`)"),
            ("listen conflict kernel", "services:\n  x:\n    listen: 31400\n    subsets: {a: 127.0.0.1:1}\n".into(), "f.yaml:3:13: services.x.listen: service \"x\" would listen on *:31400, which service \"tcp-echo\" already uses; each service needs its own port or address"),
            ("tab", "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\tmetadata: {}\n".into(), "f.yaml:3:1: found a tab character that violates indentation, while scanning a plain scalar at line 2 column 7"),
            ("deep", format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: a}}\nspec: {}", "[".repeat(200)), "f.yaml:4:134: recursion limit exceeded"),
            ("anchor", "a: &x 1\n---\nb: *x\n".into(), "f.yaml:1:1: neither a tcpshift `services:` document nor a Kubernetes object (no `apiVersion` and `kind`); expected networking.istio.io VirtualService, DestinationRule and Gateway objects, and tcpshift `services:` documents"),
            ("weight null", V2_20.replace("weight: 80", "weight:"), "OK [(\"tcp-echo\", [0, 20])]"),
            ("status", format!("{V2_20}status: {{}}\n"), "OK [(\"tcp-echo\", [80, 20])]"),
            ("kubectl meta", V2_20.replace("  name: tcp-echo\nspec", "  name: tcp-echo\n  namespace: default\n  uid: 1234\n  resourceVersion: \"55\"\n  generation: 2\n  creationTimestamp: \"2018-11-12T23:24:57Z\"\n  labels: {app: tcp-echo}\nspec"), "OK [(\"tcp-echo\", [80, 20])]"),
        ];
        for (name, text, expected) in cases {
            let m = Manifest::parse(&text, "f.yaml");
            let got = match m.and_then(|m| {
                if m.is_empty() {
                    Err(m.empty_error())
                } else {
                    m.resolve(&kernel)
                }
            }) {
                Ok(p) => format!(
                    "OK {:?}",
                    p.services
                        .iter()
                        .map(|s| (&s.config.name, s.config.weights()))
                        .collect::<Vec<_>>()
                ),
                Err(e) => e.to_string(),
            };
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn documents_are_split_at_markers() {
        let docs = split_documents("a: 1\n---\nb: 2\n...\nc: 3\n--- {d: 4}\n");
        let texts: Vec<(usize, &str)> = docs;
        assert_eq!(
            texts,
            [
                (0, "a: 1\n"),
                (1, "---\nb: 2\n...\n"),
                (4, "c: 3\n"),
                (5, "--- {d: 4}\n")
            ]
        );
        // A leading marker, comments and directives stay with the document that follows.
        assert_eq!(
            split_documents("# c\n%YAML 1.2\n---\na: 1\n"),
            [(0, "# c\n%YAML 1.2\n---\na: 1\n")]
        );
        // `---` inside a line, or indented, is content.
        assert_eq!(
            split_documents("a: |\n  ---\n  x\nb: ---x\n"),
            [(0, "a: |\n  ---\n  x\nb: ---x\n")]
        );
        assert_eq!(split_documents(""), []);
        // Two markers: two (empty) documents, as the YAML parser sees them.
        assert_eq!(split_documents("---\n---\n"), [(0, "---\n"), (1, "---\n")]);
        // CRLF line ends.
        assert_eq!(
            split_documents("a: 1\r\n---\r\nb: 2\r\n"),
            [(0, "a: 1\r\n"), (1, "---\r\nb: 2\r\n")]
        );
    }

    #[test]
    fn lines_count_from_the_start_of_the_file() {
        let text = format!(
            "{SERVICES}---\n{}",
            V2_20.replace("weight: 20", "weight: x")
        );
        let e = plan(&[("f.yaml", &text)], &[]).unwrap_err();
        let services_lines = SERVICES.lines().count();
        let weight_line = V2_20
            .lines()
            .position(|l| l.contains("weight: 20"))
            .unwrap()
            + 1;
        assert_eq!(
            e.location(),
            Some((services_lines + 1 + weight_line, Some(15)))
        );
        // A `services:` document after an Istio one.
        let text = format!("{V2_20}---\nservices:\n  tcp-echo:\n    subsets: {{v1: 1}}\n");
        let e = plan(&[("f.yaml", &text)], &[]).unwrap_err();
        let line = V2_20.lines().count() + 4;
        assert_eq!(e.location(), Some((line, Some(19))));
        assert!(
            e.to_string()
                .starts_with(&format!("f.yaml:{line}:19: services.tcp-echo"))
        );
    }

    #[test]
    fn get_shows_what_applies_again_unchanged() {
        let kernel = seed_kernel();
        let p = plan(&[("20.yaml", V2_20)], &kernel).unwrap();
        let kernel = kernel_after(&kernel, &p);
        let shown = virtual_service(&kernel, "tcp-echo").unwrap();
        let yaml = serde_yaml::to_string(&shown).unwrap();
        assert_eq!(
            yaml,
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: \
             tcp-echo\nspec:\n  hosts:\n  - '*'\n  gateways:\n  - tcp-echo-gateway\n  tcp:\n  \
             - match:\n    - port: 31400\n    route:\n    - destination:\n        host: \
             tcp-echo\n        port:\n          number: 9000\n        subset: v1\n      \
             weight: 80\n    - destination:\n        host: tcp-echo\n        port:\n          \
             number: 9000\n        subset: v2\n      weight: 20\n"
        );
        let again = plan(&[("get.yaml", &yaml)], &kernel).unwrap();
        assert_eq!(kernel_after(&kernel, &again), kernel);
        // JSON too.
        let json = serde_json::to_string(&shown).unwrap();
        let again = plan(&[("get.json", &json)], &kernel).unwrap();
        assert_eq!(kernel_after(&kernel, &again), kernel);
        // A service nobody routed shows as a VirtualService of its own name.
        let mut plain = kernel.clone();
        plain[0].annotation = None;
        let vs = virtual_service(&plain, "tcp-echo").unwrap();
        assert_eq!(vs.spec.hosts, ["tcp-echo"]);
        assert!(vs.spec.gateways.is_empty());
        assert!(virtual_service(&plain, "nope").is_none());
        let doc = serde_yaml::to_string(&services_document(&kernel)).unwrap();
        assert_eq!(
            doc,
            "services:\n  tcp-echo:\n    listen: 31400\n    subsets:\n      v1: \
             127.0.0.2:9000\n      v2: 127.0.0.3:9000\n    weights:\n      v1: 80\n      v2: \
             20\n"
        );
        // The services document applies again (and is a loader configuration).
        assert!(crate::config::Config::from_yaml_str(&doc, "get.yaml").is_ok());
        let again = plan(&[("get.yaml", &doc)], &kernel).unwrap();
        assert_eq!(weights_of(&again, "tcp-echo"), weights_of(&p, "tcp-echo"));
    }

    #[test]
    fn reapplying_adds_and_removes_subsets() {
        let kernel = seed_kernel();
        let p = plan(&[("20.yaml", V2_20)], &kernel).unwrap();
        let kernel = kernel_after(&kernel, &p);
        // A services document without weights keeps the kernel's, new subsets get 0.
        let three = "services:\n  tcp-echo:\n    subsets: {v1: 127.0.0.2:9000, v2: \
                     127.0.0.3:9000, v3: 127.0.0.4:9000}\n";
        let p = plan(&[("3.yaml", three)], &kernel).unwrap();
        assert_eq!(
            weights_of(&p, "tcp-echo"),
            [("v1".into(), 80), ("v2".into(), 20), ("v3".into(), 0)]
        );
        assert_eq!(p.services[0].config.listen, Listen::Any { port: 31400 });
        assert_eq!(p.services[0].route, None, "the stored route is kept");
        let kernel = kernel_after(&kernel, &p);
        // Dropping v2 keeps v1's weight.
        let p = plan(
            &[(
                "1.yaml",
                "services:\n  tcp-echo:\n    subsets: {v1: 127.0.0.2:9000, v3: 127.0.0.4:9000}\n",
            )],
            &kernel,
        )
        .unwrap();
        assert_eq!(
            weights_of(&p, "tcp-echo"),
            [("v1".into(), 80), ("v3".into(), 0)]
        );
        // Dropping every weighted subset needs weights.
        let e = err(
            &[(
                "v3.yaml",
                "services:\n  tcp-echo:\n    subsets: {v3: 127.0.0.4:9000}\n",
            )],
            &kernel,
        );
        assert!(e.starts_with("v3.yaml:3:5: services.tcp-echo: `weights` is missing, and none"));
        // A single subset needs none when the service is new.
        let p = plan(
            &[(
                "n.yaml",
                "services:\n  n: {listen: 5, subsets: {a: 127.0.0.1:1}}\n",
            )],
            &kernel,
        )
        .unwrap();
        assert_eq!(weights_of(&p, "n"), [("a".into(), 100)]);
    }

    #[test]
    fn listen_port_from_the_route_or_the_gateway() {
        // No match port: the bound gateway's port.
        let no_match = ALL_V1.replace("  - match:\n    - port: 31400\n    route:", "  - route:");
        let p = plan(&[("s.yaml", SERVICES), ("a.yaml", &no_match)], &[]).unwrap();
        assert_eq!(p.services[0].config.listen, Listen::Any { port: 31400 });
        // A gateway with two ports and no match port: ambiguous.
        let two = no_match.replace(
            "  servers:\n",
            "  servers:\n  - port: {number: 31401, name: tcp2, protocol: TCP}\n    hosts: ['*']\n",
        );
        let e = err(&[("s.yaml", SERVICES), ("a.yaml", &two)], &[]);
        assert!(e.contains("several ports (31400, 31401)"), "{e}");
        // The listen address of the kernel is kept, the port follows the route.
        let mut kernel = seed_kernel();
        kernel[0].config.listen = Listen::Addr("[::1]:31400".parse().unwrap());
        let moved = V2_20.replace("port: 31400", "port: 31401");
        let p = plan(&[("m.yaml", &moved)], &kernel).unwrap();
        assert_eq!(
            p.services[0].config.listen,
            Listen::Addr("[::1]:31401".parse().unwrap())
        );
        // No port anywhere for a new service.
        let e = err(
            &[
                ("s.yaml", SERVICES),
                (
                    "v.yaml",
                    &no_match
                        .split("---")
                        .last()
                        .unwrap()
                        .replace("  gateways:\n  - tcp-echo-gateway\n", ""),
                ),
            ],
            &[],
        );
        assert!(e.contains("has no listen port"), "{e}");
    }

    #[test]
    fn route_without_subset_spreads_over_every_subset() {
        let kernel = seed_kernel();
        let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: \
                    all}\nspec:\n  tcp:\n  - match: [{port: 31400}]\n    route:\n    - \
                    destination: {host: tcp-echo, port: {number: 9000}}\n";
        let p = plan(&[("all.yaml", text)], &kernel).unwrap();
        assert_eq!(
            weights_of(&p, "tcp-echo"),
            [("v1".into(), 1), ("v2".into(), 1)]
        );
        let e = err(&[("all.yaml", &text.replace("9000", "9001"))], &kernel);
        assert!(e.contains("port 9001 is not the port"), "{e}");
    }

    #[test]
    fn a_virtual_service_reapplied_with_other_routes_forgets_the_old_ones() {
        let kernel = seed_kernel();
        let other = "services:\n  other: {listen: 5000, subsets: {a: 127.0.0.1:1}}\n---\n\
                     apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: \
                     tcp-echo}\nspec:\n  tcp:\n  - route: [{destination: {host: other}}]\n";
        let p = plan(&[("o.yaml", other)], &kernel).unwrap();
        assert_eq!(p.unrouted, ["tcp-echo"]);
        let kernel = kernel_after(&kernel, &p);
        let shown = virtual_services(&kernel);
        let names: Vec<&str> = shown.iter().map(|v| v.metadata.name.as_str()).collect();
        assert_eq!(names, ["tcp-echo"]);
        // tcp-echo is shown under its own name again, `other` under the VirtualService.
        let hosts: Vec<&str> = shown[0]
            .spec
            .tcp
            .iter()
            .map(|r| r.route[0].destination.host.as_str())
            .collect();
        assert_eq!(hosts, ["other", "tcp-echo"]);
        assert_eq!(
            services_of_virtual_service(&kernel, "tcp-echo"),
            ["other", "tcp-echo"]
        );
    }

    #[test]
    fn services_a_delete_removes() {
        let kernel = seed_kernel();
        let m = manifest(&[("a.yaml", ALL_V1)]).unwrap();
        assert_eq!(m.services_to_delete(&kernel), ["tcp-echo"]);
        let m = manifest(&[("s.yaml", SERVICES)]).unwrap();
        assert_eq!(m.services_to_delete(&kernel), ["tcp-echo"]);
        let gateway_only = ALL_V1.split("---").next().unwrap();
        let m = manifest(&[("g.yaml", gateway_only)]).unwrap();
        assert!(m.services_to_delete(&kernel).is_empty());
        assert_eq!(m.objects(), ["Gateway tcp-echo-gateway"]);
    }

    fn weights_yaml(weights: &[u32]) -> String {
        let mut yaml = String::from("services:\n  s:\n    listen: 7000\n    subsets:\n");
        for (i, _) in weights.iter().enumerate() {
            yaml.push_str(&format!("      v{i}: 127.0.0.1:{}\n", 9000 + i));
        }
        yaml.push_str(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: \
             s}\nspec:\n  tcp:\n  - route:\n",
        );
        for (i, w) in weights.iter().enumerate() {
            yaml.push_str(&format!(
                "    - destination: {{host: s, subset: v{i}}}\n      weight: {w}\n"
            ));
        }
        yaml
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any weights a VirtualService is accepted with give a bucket table whose shares
        /// match the weights to within one bucket.
        #[test]
        fn accepted_weights_give_shares_within_one_bucket(
            weights in proptest::collection::vec(
                prop_oneof![Just(0u32), 0..=100u32, 0..=MAX_WEIGHT],
                1..=MAX_SUBSETS,
            )
        ) {
            let yaml = weights_yaml(&weights);
            let result = plan(&[("w.yaml", &yaml)], &[]);
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            if total == 0 && weights.len() > 1 {
                prop_assert!(result.is_err());
                return Ok(());
            }
            let p = result.map_err(|e| TestCaseError::fail(e.to_string()))?;
            let applied = p.services[0].config.weights();
            let table = crate::weights::build_table(&applied)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let n = tcpshift_common::NUM_BUCKETS as f64;
            let applied_total: f64 = applied.iter().map(|&w| f64::from(w)).sum();
            for (i, &w) in applied.iter().enumerate() {
                let got = table.subset.iter().filter(|&&s| usize::from(s) == i).count() as f64;
                let want = f64::from(w) * n / applied_total;
                prop_assert!((got - want).abs() <= 1.0, "subset {i}: {got} buckets, exact {want}");
            }
            // The route's weights are the applied ones (a lone destination with weight 0
            // receives everything, as in Istio).
            if weights.len() > 1 {
                prop_assert_eq!(applied, weights);
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            if let Ok(m) = Manifest::parse(&text, "fuzz.yaml") {
                let _ = m.resolve(&seed_kernel());
            }
        }

        #[test]
        fn yaml_like_text_never_panics(
            text in "[a-zA-Z0-9:{}\\[\\], \\n\"'&*!#.|>-]{0,300}"
        ) {
            if let Ok(m) = Manifest::parse(&text, "fuzz.yaml") {
                let _ = m.resolve(&seed_kernel());
            }
        }

        #[test]
        fn mutated_fixtures_never_panic(
            which in 0..4usize,
            at in 0..2000usize,
            len in 0..30usize,
            insert in "[ -~\\n]{0,12}",
        ) {
            let base = [ALL_V1, V2_20, SERVICES, FIFTY][which];
            let at = at % base.len();
            let mut doc = base.to_owned();
            let end = (at + len).min(doc.len());
            doc.replace_range(at..end, &insert);
            let kernel = seed_kernel();
            if let Ok(m) = Manifest::parse(&doc, "fuzz.yaml") {
                let _ = m.resolve(&kernel);
                let _ = m.services_to_delete(&kernel);
            }
        }

        #[test]
        fn truncated_fixtures_never_panic(which in 0..4usize, cut in 0..2000usize) {
            let base = [ALL_V1, V2_20, SERVICES, FIFTY][which];
            let mut cut = cut % (base.len() + 1);
            while !base.is_char_boundary(cut) {
                cut -= 1;
            }
            if let Ok(m) = Manifest::parse(&base[..cut], "fuzz.yaml") {
                let _ = m.resolve(&seed_kernel());
            }
        }
    }
}
