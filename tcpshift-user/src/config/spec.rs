//! `services:` documents given to `tcpshiftctl apply`: the loader's format, where `listen`
//! and `weights` may be left out.

use serde::Deserialize;

use super::balance::{Affinity, BalanceKey, balance_of};
use super::fields::{
    Entries, EntryKind, SERVICES_MAPPING, SubsetAddr, check_service_count, invalid,
    validate_subsets,
};
use super::{ConfigError, parse};
use crate::model::{Balance, Listen, ListenClaims, Protocol, SubsetConfig, validate_service_name};
use crate::yaml::{Weight, seg};

/// One service of a `services:` document given to `tcpshiftctl apply`.
///
/// The document has the loader's format, with two keys that may be left out because
/// `tcpshiftctl apply` can take them from elsewhere: `listen` (from a VirtualService's
/// `match.port` or a Gateway's server port in the same apply, or the service already in the
/// kernel) and `weights` (from a VirtualService, or the kernel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name: 1 to [`crate::model::MAX_SERVICE_NAME`] bytes of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Where the service listens, when the document says.
    pub listen: Option<Listen>,
    /// The subsets in YAML order (1 to [`tcpshift_common::MAX_SUBSETS`]). Their weights are those of the
    /// document when [`ServiceSpec::weights_given`], else 0.
    pub subsets: Vec<SubsetConfig>,
    /// Whether the document has a `weights` key for this service.
    pub weights_given: bool,
    /// `takeOver: true`: the service may take over a listen address another server listens on
    /// (see [`crate::model::ServiceConfig::take_over`]).
    pub take_over: bool,
    /// `failClosed`, when the document says (see [`crate::model::ServiceConfig::fail_closed`]);
    /// left out, an existing service keeps the kernel's setting and a new one passes through.
    pub fail_closed: Option<bool>,
    /// How its connections are placed (`affinity`, `balance`), when the document says.
    pub balance: Option<Balance>,
    /// The protocol, when the document says (else the service's in the kernel, or TCP).
    pub protocol: Option<Protocol>,
}

impl ServiceSpec {
    /// The path of the service in its document, for messages: `services.NAME`.
    pub fn path(&self) -> String {
        format!("services.{}", seg(&self.name))
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with a `services` key at the top level"
)]
struct RawSpecs {
    services: Entries<RawSpec>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service: a mapping with the keys `listen`, `subsets`, `weights`, `takeOver`, \
                 `failClosed`, `affinity`, `balance` and `protocol`"
)]
struct RawSpec {
    #[serde(default)]
    listen: Option<Listen>,
    subsets: Entries<SubsetAddr>,
    #[serde(default)]
    weights: Option<Entries<Weight>>,
    /// `takeOver: true`: the service may shadow a server already listening on its address.
    #[serde(default, rename = "takeOver")]
    take_over: bool,
    /// `failClosed: true|false`: refuse the service's connections while no subset is live.
    #[serde(default, rename = "failClosed")]
    fail_closed: Option<bool>,
    /// `affinity: source-ip`: every connection of a client to one subset.
    #[serde(default)]
    affinity: Option<Affinity>,
    /// `balance: round-robin`: exact weighted round-robin.
    #[serde(default)]
    balance: Option<BalanceKey>,
    #[serde(default)]
    protocol: Option<Protocol>,
}

impl EntryKind for RawSpec {
    const MAPPING: &'static str = SERVICES_MAPPING;
}

/// Parses and validates a `services:` document given to `tcpshiftctl apply` (one YAML
/// document; `source` names it in messages). The rules are those of [`Config::from_yaml_str`]
/// except that `listen` and `weights` may be left out (see [`ServiceSpec`]); weights that are
/// given must still be valid (integers in `0..=1000000`, not all 0, known subsets). Services
/// are returned sorted by name.
pub fn specs_from_yaml_str(text: &str, source: &str) -> Result<Vec<ServiceSpec>, ConfigError> {
    let raw: RawSpecs = parse(text, source)?;
    let raw_services = raw.services.0;
    check_service_count(
        source,
        raw_services.len(),
        "tcp-echo: {subsets: {v1: 127.0.0.2:9000}}",
    )?;
    let mut specs = Vec::with_capacity(raw_services.len());
    let mut listens = ListenClaims::new();
    for (name, raw) in raw_services {
        let path = format!("services.{}", seg(&name));
        validate_service_name(&name).map_err(|m| invalid(source, &path, m))?;
        if let Some(listen) = &raw.listen {
            listens
                .claim_protocol(listen, raw.protocol.unwrap_or_default(), &name)
                .map_err(|e| invalid(source, format!("{path}.listen"), e.to_string()))?;
        }
        // A subset's limits are read by the loader's configuration and from DestinationRules;
        // here they would be dropped without a word, so they are refused.
        if let Some((subset, _)) = raw.subsets.0.iter().find(|(_, a)| !a.policy().is_empty()) {
            return Err(invalid(
                source,
                format!("{path}.subsets.{}", seg(subset)),
                "`maxConnections` and `outlierDetection` are not read from a `services:` \
                 document given to `tcpshiftctl apply`; set them with a DestinationRule's \
                 `trafficPolicy` (`connectionPool.tcp.maxConnections`, `outlierDetection`; per \
                 subset under `subsets[].trafficPolicy`) in the same apply, or in tcpshiftd's \
                 configuration file",
            ));
        }
        let weights_given = raw.weights.is_some();
        let subsets = validate_subsets(source, &path, raw.subsets.0, raw.weights, false)?;
        let balance = balance_of(source, &path, raw.affinity, raw.balance)?;
        specs.push(ServiceSpec {
            name,
            listen: raw.listen,
            subsets,
            weights_given,
            take_over: raw.take_over,
            fail_closed: raw.fail_closed,
            balance,
            protocol: raw.protocol,
        });
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}
