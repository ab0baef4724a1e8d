//! The loader's YAML configuration, parsed and validated, and the `services:` documents of
//! `tcpshiftctl apply` (the same format; see [`spec`]).
//!
//! ```yaml
//! services:
//!   tcp-echo:
//!     listen: 31400            # port on any local address; "ADDR:PORT" and "[v6]:PORT" also accepted
//!     subsets:
//!       v1: 127.0.0.1:9001     # address where that version's server listens
//!       v2: 127.0.0.1:9002
//!     weights: {v1: 100, v2: 0}   # relative integer weights; omitted subsets get 0
//! ```
//!
//! Parsing is strict: unknown keys, duplicate keys, host names instead of IP addresses,
//! negative or fractional weights and strings where numbers are expected are all rejected with
//! a [`ConfigError`] that names the file, the line and column when the YAML parser knows them,
//! the path of the offending field (`services.tcp-echo.weights.v3`) and what is expected.
//!
//! Syntax and per-value errors (a malformed address, a negative weight) are reported by the
//! YAML deserializer and carry a line and column; errors that involve several values (an
//!
//! - [`fields`]: what both share (name-keyed mappings, subset addresses, subset and weight
//!   rules);
//! - [`spec`]: `services:` documents ([`ServiceSpec`], [`specs_from_yaml_str`]);
//! - [`render`]: services written back in this format ([`services_document`]).
//!
//! Reading, documents, locations, weights, ports and the error type come from
//! [`crate::yaml`].

mod balance;
mod fields;
pub mod limits;
pub mod render;
pub mod spec;

use std::path::Path;

use serde::Deserialize;

use crate::model::traffic_policy::ServicePolicy;
use crate::model::{ListenClaims, Protocol, ServiceConfig, validate_service_name};
use crate::yaml::{self, Weight, seg};
use fields::{Entries, EntryKind, SubsetAddr, check_service_count, invalid, validate_subsets};

pub use crate::model::Listen;
pub use crate::yaml::{MAX_FILE_BYTES, clip, read_file_limited, read_limited};
pub use render::services_document;
pub use spec::{ServiceSpec, specs_from_yaml_str};

/// Why a configuration was rejected: the YAML toolkit's one error type (see
/// [`crate::yaml::Error`]). Every message names the source and says what is expected.
pub type ConfigError = yaml::Error;

/// Weight given to the only subset of a service whose `weights` key is absent.
pub const DEFAULT_SINGLE_WEIGHT: u32 = 100;

/// A complete, validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The services, sorted by name (names are unique).
    pub services: Vec<ServiceConfig>,
    /// Their traffic policies (`maxConnections`, `outlierDetection`), one per service (empty
    /// when it has none), in the same order.
    pub policies: Vec<ServicePolicy>,
}

/// The message of an empty configuration.
const EMPTY: &str = "the configuration is empty; expected a mapping with a `services` key, e.g. \
                     `services: {tcp-echo: {listen: 31400, subsets: {v1: \"127.0.0.1:9001\"}}}`";

/// Parses the one document `text` of the loader's format as a `T`.
fn parse<T: serde::de::DeserializeOwned>(text: &str, source: &str) -> Result<T, ConfigError> {
    const SECOND: &str = "a second YAML document starts here; the configuration is one \
                          document (remove this `---` line and what follows, or merge them)";
    yaml::documents::parse_one(text, source, SECOND)?.ok_or_else(|| ConfigError::Empty {
        file: source.to_owned(),
        message: EMPTY.to_owned(),
    })
}

impl Config {
    /// Parses and validates a configuration. `source` names the text in error messages
    /// (usually the file name).
    pub fn from_yaml_str(text: &str, source: &str) -> Result<Config, ConfigError> {
        parse::<RawConfig>(text, source)?.validate(source)
    }

    /// Reads, parses and validates a configuration file. Messages name the file as given.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let bytes = read_file_limited(path).map_err(|error| ConfigError::Read {
            file: name.clone(),
            error,
        })?;
        Config::from_yaml_str(&yaml::utf8(bytes, &name)?, &name)
    }

    /// The service called `name`, if any.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.services.get(i))
    }
}

// ---------------------------------------------------------------------------------------------
// Raw document

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with a `services` key at the top level"
)]
struct RawConfig {
    services: Entries<RawService>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service: a mapping with the keys `listen`, `subsets`, `weights`, `takeOver`, \
                 `failClosed`, `affinity`, `balance`, `protocol`, `maxConnections` and
                 `outlierDetection`"
)]
struct RawService {
    listen: Listen,
    subsets: Entries<SubsetAddr>,
    #[serde(default)]
    weights: Option<Entries<Weight>>,
    /// `takeOver: true`: the service may shadow a server already listening on its address.
    #[serde(default, rename = "takeOver")]
    take_over: bool,
    /// `failClosed: true`: refuse the service's connections while no subset is live.
    #[serde(default, rename = "failClosed")]
    fail_closed: bool,
    /// `affinity: source-ip`: every connection of a client to one subset.
    #[serde(default)]
    affinity: Option<balance::Affinity>,
    /// `balance: round-robin`: exact weighted round-robin.
    #[serde(default)]
    balance: Option<balance::BalanceKey>,
    #[serde(default)]
    protocol: Protocol,
    /// Most open connections of each subset (see `limits.rs`).
    #[serde(default, rename = "maxConnections")]
    max_connections: Option<limits::MaxConnections>,
    /// Outlier ejection of the subsets (see `limits.rs`).
    #[serde(default, rename = "outlierDetection")]
    outlier_detection: Option<limits::RawOutlierDetection>,
}

impl EntryKind for RawService {
    const MAPPING: &'static str = fields::SERVICES_MAPPING;
}

impl RawConfig {
    fn validate(self, file: &str) -> Result<Config, ConfigError> {
        let raw_services = self.services.0;
        check_service_count(
            file,
            raw_services.len(),
            "tcp-echo: {listen: 31400, subsets: {v1: 127.0.0.1:9001}}",
        )?;
        let mut services = Vec::with_capacity(raw_services.len());
        let mut policies = Vec::with_capacity(raw_services.len());
        let mut listens = ListenClaims::new();
        for (name, raw) in raw_services {
            let path = format!("services.{}", seg(&name));
            validate_service_name(&name).map_err(|m| invalid(file, &path, m))?;
            listens
                .claim_protocol(&raw.listen, raw.protocol, &name)
                .map_err(|e| invalid(file, format!("{path}.listen"), e.to_string()))?;
            policies.push(ServicePolicy {
                service: name.clone(),
                top: limits::policy(raw.max_connections, raw.outlier_detection.as_ref()),
                subsets: (raw.subsets.0.iter())
                    .map(|(n, a)| (n.clone(), a.policy()))
                    .filter(|(_, p)| !p.is_empty())
                    .collect(),
            });
            let subsets = validate_subsets(file, &path, raw.subsets.0, raw.weights, true)?;
            let balance = balance::balance_of(file, &path, raw.affinity, raw.balance)?;
            services.push(ServiceConfig {
                name,
                listen: raw.listen,
                subsets,
                take_over: raw.take_over,
                fail_closed: raw.fail_closed,
                balance: balance.unwrap_or_default(),
                protocol: raw.protocol,
            });
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        policies.sort_by(|a, b| a.service.cmp(&b.service));
        Ok(Config { services, policies })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        MAX_SERVICE_NAME, MAX_SUBSET_NAME, SubsetConfig, validate_service_name,
        validate_subset_name,
    };
    use proptest::prelude::*;
    use std::net::SocketAddr;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};
    use std::path::PathBuf;
    use tcpshift_common::{MAX_SERVICES, MAX_SUBSETS};

    const SAMPLE: &str = r#"services:
  tcp-echo:
    listen: 31400            # port on any local address; "ADDR:PORT" and "[v6]:PORT" also accepted
    subsets:
      v1: 127.0.0.1:9001     # address where that version's server listens
      v2: 127.0.0.1:9002
    weights: {v1: 100, v2: 0}   # relative integer weights; omitted subsets get 0
"#;

    fn v4(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(a), port))
    }

    fn err(doc: &str) -> String {
        match Config::from_yaml_str(doc, "tcpshift.yaml") {
            Ok(c) => panic!("expected an error for {doc:?}, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn ok(doc: &str) -> Config {
        match Config::from_yaml_str(doc, "tcpshift.yaml") {
            Ok(c) => c,
            Err(e) => panic!("expected {doc:?} to parse, got: {e}"),
        }
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for part in parts {
            assert!(msg.contains(part), "{msg:?} does not contain {part:?}");
        }
    }

    /// One service `s` listening on 31400 with the given `subsets:` and `weights:` bodies
    /// (flow-style YAML, `None` leaves the key out).
    fn service(subsets: &str, weights: Option<&str>) -> String {
        let mut doc = format!("services:\n  s:\n    listen: 31400\n    subsets: {subsets}\n");
        if let Some(w) = weights {
            doc.push_str(&format!("    weights: {w}\n"));
        }
        doc
    }

    #[test]
    fn sample_document() {
        let config = ok(SAMPLE);
        assert_eq!(
            config,
            Config {
                services: vec![ServiceConfig {
                    name: "tcp-echo".into(),
                    listen: Listen::Any { port: 31400 },
                    subsets: vec![
                        SubsetConfig {
                            name: "v1".into(),
                            addr: v4([127, 0, 0, 1], 9001),
                            weight: 100,
                            owner: Default::default(),
                        },
                        SubsetConfig {
                            name: "v2".into(),
                            addr: v4([127, 0, 0, 1], 9002),
                            weight: 0,
                            owner: Default::default(),
                        },
                    ],
                    take_over: false,
                    fail_closed: false,
                    balance: Default::default(),
                    protocol: Protocol::Tcp,
                }],
                policies: vec![ServicePolicy {
                    service: "tcp-echo".into(),
                    ..Default::default()
                }],
            }
        );
        let service = config.service("tcp-echo").map(ServiceConfig::weights);
        assert_eq!(service, Some(vec![100, 0]));
        assert!(config.service("nope").is_none());
    }

    #[test]
    fn services_sorted_subsets_in_yaml_order() {
        let doc = "services:
  zeta:
    listen: 1
    subsets: {b: 127.0.0.1:1, a: 127.0.0.1:2, c: 127.0.0.1:3}
    weights: {c: 1, a: 2, b: 3}
  alpha:
    listen: 2
    subsets: {only: \"[::1]:9001\"}
";
        let config = ok(doc);
        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["alpha", "zeta"]);
        let zeta = &config.services[1];
        let subsets: Vec<(&str, u32)> = zeta
            .subsets
            .iter()
            .map(|s| (s.name.as_str(), s.weight))
            .collect();
        assert_eq!(subsets, [("b", 3), ("a", 2), ("c", 1)]);
        let alpha = &config.services[0];
        assert_eq!(alpha.subsets[0].weight, DEFAULT_SINGLE_WEIGHT);
        assert_eq!(alpha.subsets[0].addr, "[::1]:9001".parse().unwrap());
    }

    #[test]
    fn listen_parse_forms() {
        let any = Listen::Any { port: 31400 };
        for s in ["31400", " 31400 ", "*:31400", "0.0.0.0:31400", "[::]:31400"] {
            assert_eq!(Listen::parse(s), Ok(any), "{s}");
        }
        assert_eq!(
            Listen::parse("127.0.0.1:31400"),
            Ok(Listen::Addr(v4([127, 0, 0, 1], 31400)))
        );
        let v6 = Listen::parse("[::1]:31400");
        assert_eq!(
            v6,
            Ok(Listen::Addr(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::LOCALHOST,
                31400,
                0,
                0
            ))))
        );
        assert_eq!(any.port(), 31400);
        assert_eq!(v6.map(|l| l.port()), Ok(31400));
        assert_eq!(any.ip(), None);
    }

    #[test]
    fn listen_display_round_trips() {
        for (s, shown) in [
            ("31400", "*:31400"),
            ("127.0.0.1:31400", "127.0.0.1:31400"),
            ("[::1]:31400", "[::1]:31400"),
        ] {
            let listen = Listen::parse(s).unwrap();
            assert_eq!(listen.to_string(), shown);
            assert_eq!(Listen::parse(shown), Ok(listen));
            assert_eq!(shown.parse::<Listen>(), Ok(listen));
        }
    }

    #[test]
    fn listen_parse_errors() {
        let cases: &[(&str, &[&str])] = &[
            ("", &["empty listen address", "expected a port (31400)"]),
            ("0", &["port 0", "1..=65535"]),
            ("70000", &["port 70000 is out of range", "1..=65535"]),
            ("99999999999999999999", &["out of range"]),
            ("127.0.0.1:0", &["port 0", "1..=65535"]),
            ("127.0.0.1:70000", &["port 70000", "out of range"]),
            ("*:", &["invalid port", "expected a port"]),
            ("*:abc", &["invalid port"]),
            ("localhost:31400", &["host name", "IP address is needed"]),
            ("::1:31400", &["brackets", "[::1]:31400"]),
            ("127.0.0.1", &["has no port"]),
            ("[::1]", &["has no port"]),
            ("127.0.0.1:http", &["invalid port \"http\""]),
            ("what?", &["invalid listen address", "IPv4:PORT"]),
        ];
        for (s, parts) in cases {
            match Listen::parse(s) {
                Ok(l) => panic!("{s:?} parsed as {l}"),
                Err(e) => assert_contains(&e, parts),
            }
        }
    }

    #[test]
    fn listen_in_yaml() {
        let doc = |listen: &str| {
            format!("services:\n  s:\n    listen: {listen}\n    subsets: {{v1: 127.0.0.1:1}}\n")
        };
        for (listen, expected) in [
            ("31400", Listen::Any { port: 31400 }),
            ("\"31400\"", Listen::Any { port: 31400 }),
            ("0.0.0.0:31400", Listen::Any { port: 31400 }),
            ("\"[::]:31400\"", Listen::Any { port: 31400 }),
            ("127.0.0.1:31400", Listen::Addr(v4([127, 0, 0, 1], 31400))),
            ("\"[::1]:31400\"", Listen::parse("[::1]:31400").unwrap()),
        ] {
            assert_eq!(ok(&doc(listen)).services[0].listen, expected, "{listen}");
        }
        let cases: &[(&str, &[&str])] = &[
            (
                "0",
                &["tcpshift.yaml:3:13: services.s.listen: port 0", "1..=65535"],
            ),
            ("70000", &["services.s.listen: port 70000 is out of range"]),
            ("-1", &["services.s.listen: port -1 is negative"]),
            (
                "1.5",
                &["services.s.listen: invalid type", "expected a port (31400)"],
            ),
            ("true", &["invalid type: boolean", "expected a port"]),
            ("[::1]:31400", &["must be quoted", "\"[::1]:31400\""]),
            ("localhost:31400", &["IP address is needed"]),
            ("127.0.0.1:0", &["port 0"]),
        ];
        for (listen, parts) in cases {
            assert_contains(&err(&doc(listen)), parts);
        }
    }

    #[test]
    fn subset_addresses() {
        let config = ok(&service(
            "{v1: \"[::1]:9001\", v2: 10.0.0.1:80}",
            Some("{v1: 1}"),
        ));
        assert_eq!(config.services[0].subsets[0].addr.port(), 9001);
        assert!(config.services[0].subsets[0].addr.is_ipv6());
        let cases: &[(&str, &[&str])] = &[
            (
                "{v1: localhost:9001}",
                &[
                    "tcpshift.yaml:4:19: services.s.subsets.v1:",
                    "\"localhost\" is a host name but an IP address is needed",
                ],
            ),
            ("{v1: backend}", &["host name", "IP address is needed"]),
            ("{v1: 127.0.0.1:0}", &["services.s.subsets.v1", "port 0"]),
            ("{v1: 127.0.0.1}", &["has no port", "IPv4:PORT"]),
            ("{v1: 9001}", &["9001 is only a port", "IPv4:PORT"]),
            ("{v1: -1}", &["-1 is not an address"]),
            ("{v1: [::1]:9001}", &["must be quoted"]),
            ("{v1: \"::1:9001\"}", &["brackets"]),
            ("{v1: ~}", &["invalid type: unit value", "subset address"]),
            (
                "{v1: {addr: 1}}",
                &[
                    "4:19: services.s.subsets.v1: unknown field \"addr\"",
                    "expected address, user",
                ],
            ),
            (
                "{v1: {user: root}}",
                &["services.s.subsets.v1", "needs `address`"],
            ),
            (
                "{v1: {address: 127.0.0.1:9001, user: no-such-user-here}}",
                &[
                    "services.s.subsets.v1",
                    "unknown user \"no-such-user-here\"",
                ],
            ),
            (
                "{v1: {address: 127.0.0.1:9001, cgroup: system.slice}}",
                &["services.s.subsets.v1", "is not a path"],
            ),
            (
                "[127.0.0.1:1]",
                &["services.s.subsets", "mapping of subset names"],
            ),
        ];
        for (subsets, parts) in cases {
            assert_contains(&err(&service(subsets, Some("{v1: 1}"))), parts);
        }
    }

    #[test]
    fn names() {
        let long_service = "s".repeat(MAX_SERVICE_NAME);
        let doc = format!(
            "services:\n  {long_service}:\n    listen: 1\n    subsets: {{{}: 127.0.0.1:1}}\n",
            "v".repeat(MAX_SUBSET_NAME)
        );
        assert_eq!(ok(&doc).services[0].name, long_service);

        let doc = format!(
            "services:\n  {long_service}x:\n    listen: 1\n    subsets: {{v1: 127.0.0.1:1}}\n"
        );
        assert_contains(&err(&doc), &["is 64 bytes long", "at most 63"]);
        let doc = service(&format!("{{{}: 127.0.0.1:1}}", "v".repeat(32)), None);
        assert_contains(
            &err(&doc),
            &["services.s.subsets.vvv", "is 32 bytes long", "at most 31"],
        );

        let doc = "services:\n  \"tcp echo\":\n    listen: 1\n    subsets: {v1: 127.0.0.1:1}\n";
        assert_contains(
            &err(doc),
            &[
                "services.\"tcp echo\":",
                "contains ' '",
                "A-Z a-z 0-9 . _ -",
            ],
        );
        let doc = "services:\n  \"\":\n    listen: 1\n    subsets: {v1: 127.0.0.1:1}\n";
        assert_contains(&err(doc), &["empty service name"]);
        assert_contains(
            &err(&service("{v/1: 127.0.0.1:1}", None)),
            &["subset name", "'/'"],
        );
        assert_contains(&err(&service("{é: 127.0.0.1:1}", None)), &["'é'"]);
        assert_eq!(validate_subset_name("v1.2_rc-3"), Ok(()));
        assert!(validate_service_name("").is_err());
    }

    #[test]
    fn subset_counts() {
        assert_contains(
            &err(&service("{}", None)),
            &["services.s.subsets: no subsets", "1 to 16"],
        );
        let many = |n: usize| {
            let body: Vec<String> = (0..n)
                .map(|i| format!("v{i}: 127.0.0.1:{}", i + 1))
                .collect();
            format!("{{{}}}", body.join(", "))
        };
        let config = ok(&service(&many(MAX_SUBSETS), Some("{v0: 1}")));
        assert_eq!(config.services[0].subsets.len(), MAX_SUBSETS);
        assert_contains(
            &err(&service(&many(MAX_SUBSETS + 1), Some("{v0: 1}"))),
            &["services.s.subsets: 17 subsets", "at most 16"],
        );
    }

    #[test]
    fn service_counts() {
        assert_contains(&err("services: {}\n"), &["services: no services defined"]);
        assert_contains(&err("services:\n"), &["no services defined"]);
        let n = MAX_SERVICES as usize + 1;
        let mut doc = String::from("services:\n");
        for i in 0..n {
            doc.push_str(&format!(
                "  s{i}: {{listen: {}, subsets: {{v: 127.0.0.1:1}}}}\n",
                i + 1
            ));
        }
        assert_contains(
            &err(&doc),
            &["services: 16385 services defined", "at most 16384"],
        );
    }

    #[test]
    fn weights() {
        let subsets = "{v1: 127.0.0.1:9001, v2: 127.0.0.1:9002, v3: 127.0.0.1:9003}";
        let config = ok(&service(subsets, Some("{v2: 7}")));
        assert_eq!(config.services[0].weights(), [0, 7, 0]);
        let config = ok(&service(subsets, Some("{v1: 1000000, v3: 1}")));
        assert_eq!(config.services[0].weights(), [1_000_000, 0, 1]);

        let doc = SAMPLE.replace("{v1: 100, v2: 0}", "{v1: 100, v3: 5}");
        assert_eq!(
            err(&doc),
            "tcpshift.yaml: services.tcp-echo.weights.v3: unknown subset \"v3\" (declared: v1, v2)"
        );
        let cases: &[(&str, &[&str])] = &[
            (
                "{v1: 0, v2: 0}",
                &[
                    "services.s.weights: all weights are 0",
                    "at least one subset needs a weight above 0",
                ],
            ),
            ("{}", &["all weights are 0"]),
            (
                "{v1: -5}",
                &[
                    "tcpshift.yaml:5:19: services.s.weights.v1: weight -5 is negative; \
                     expected an integer in 0..=1000000",
                ],
            ),
            (
                "{v1: 1.5}",
                &["weight 1.5 is not an integer", "0..=1000000"],
            ),
            ("{v1: .inf}", &["not an integer"]),
            (
                "{v1: \"5\"}",
                &["weight \"5\" is a string", "expected an integer"],
            ),
            ("{v1: abc}", &["weight \"abc\" is a string"]),
            (
                "{v1: 1000001}",
                &["weight 1000001 is too large", "0..=1000000"],
            ),
            ("{v1: 99999999999999999999999}", &["too large"]),
            // Beyond 64 bits (serde_yaml: u128) and beyond 128 bits (a float): too large,
            // like any other weight above the maximum (issue 20).
            (
                "{v1: 99999999999999999999}",
                &[
                    "tcpshift.yaml:5:19: services.s.weights.v1: weight 99999999999999999999 is \
                     too large; expected an integer in 0..=1000000",
                ],
            ),
            (
                "{v1: 999999999999999999999999999999999999999999}",
                &["services.s.weights.v1: weight 1e42 is too large"],
            ),
            ("{v1: -99999999999999999999}", &["is negative"]),
            ("{v1: true}", &["weight true is a boolean"]),
            ("{v1: }", &["missing weight"]),
            ("{v1: [1]}", &["invalid type: sequence", "integer weight"]),
            (
                "{v1: 1, v1: 2}",
                &["services.s.weights", "duplicate key \"v1\""],
            ),
            (
                "[1, 2]",
                &[
                    "services.s.weights",
                    "mapping of subset names to integer weights",
                ],
            ),
        ];
        for (weights, parts) in cases {
            assert_contains(&err(&service(subsets, Some(weights))), parts);
        }
    }

    #[test]
    fn weights_absent() {
        let config = ok(&service("{v1: 127.0.0.1:9001}", None));
        assert_eq!(config.services[0].weights(), [100]);
        let message = err(&service("{v1: 127.0.0.1:9001, v2: 127.0.0.1:9002}", None));
        assert_contains(
            &message,
            &[
                "services.s:",
                "`weights` is missing",
                "`weights: {v1: 100, v2: 0}`",
            ],
        );
    }

    #[test]
    fn listen_conflicts() {
        let doc = |a: &str, b: &str| {
            format!(
                "services:\n  a: {{listen: {a}, subsets: {{v1: 127.0.0.1:1}}}}\n  \
                 b: {{listen: {b}, subsets: {{v1: 127.0.0.1:2}}}}\n"
            )
        };
        assert_contains(
            &err(&doc("31400", "\"0.0.0.0:31400\"")),
            &[
                "services.b.listen: service \"b\" would listen on *:31400, which service \"a\" \
                 already uses; each service needs its own port or address",
            ],
        );
        assert_contains(
            &err(&doc("\"127.0.0.1:5\"", "\"127.0.0.1:5\"")),
            &["services.b.listen: service \"b\" would listen on 127.0.0.1:5, which"],
        );
        assert_contains(
            &err(&doc("\"127.0.0.1:5\"", "\"[::ffff:127.0.0.1]:5\"")),
            &["which service \"a\" already uses"],
        );
        // Any and a specific address on the same port are fine; so are different ports.
        assert_eq!(ok(&doc("5", "\"127.0.0.1:5\"")).services.len(), 2);
        assert_eq!(ok(&doc("\"[::1]:5\"", "\"127.0.0.1:5\"")).services.len(), 2);
        assert_eq!(ok(&doc("5", "6")).services.len(), 2);
    }

    #[test]
    fn duplicate_subset_addresses() {
        let message = err(&service(
            "{v1: 127.0.0.1:9001, v2: 127.0.0.1:9001}",
            Some("{v1: 1}"),
        ));
        assert_contains(
            &message,
            &["services.s.subsets.v2: address 127.0.0.1:9001 is already used by subset v1"],
        );
        let message = err(&service(
            "{v1: 127.0.0.1:9001, v2: \"[::ffff:127.0.0.1]:9001\"}",
            Some("{v1: 1}"),
        ));
        assert_contains(&message, &["already used by subset v1"]);
    }

    #[test]
    fn structure_errors() {
        let cases: &[(&str, &[&str])] = &[
            (
                "",
                &["tcpshift.yaml: the configuration is empty", "`services`"],
            ),
            ("# nothing\n\n", &["the configuration is empty"]),
            ("---\n# nothing\n...\n", &["the configuration is empty"]),
            (
                "~\n",
                &[
                    "invalid type: unit value",
                    "a mapping with a `services` key",
                ],
            ),
            (
                "[1, 2]\n",
                &[
                    "tcpshift.yaml:1:1: invalid type: sequence",
                    "a mapping with a `services` key",
                ],
            ),
            (
                "hello\n",
                &[
                    "invalid type: string \"hello\"",
                    "a mapping with a `services` key",
                ],
            ),
            ("42\n", &["invalid type: integer", "a mapping"]),
            (
                "servics: {}\n",
                &["unknown field `servics`, expected `services`"],
            ),
            ("services: {}\nextra: 1\n", &["unknown field `extra`"]),
            (
                "services: [a]\n",
                &["invalid type: sequence", "mapping of service names"],
            ),
            (
                "services:\n  s: 5\n",
                &["services.s: invalid type: integer", "a service"],
            ),
            (
                "services:\n  s:\n    subsets: {v1: 127.0.0.1:1}\n",
                &["services.s: missing field `listen`"],
            ),
            (
                "services:\n  s:\n    listen: 1\n",
                &["services.s: missing field `subsets`"],
            ),
            (
                "services:\n  s:\n    listen: 1\n    subsets: {v1: 127.0.0.1:1}\n    wieghts: {}\n",
                &["tcpshift.yaml:", "unknown field `wieghts`", "`weights`"],
            ),
            (
                "services:\n  s:\n    listen: 1\n    listen: 2\n    subsets: {v1: 127.0.0.1:1}\n",
                &["duplicate field `listen`"],
            ),
            (
                "services:\n  s: {listen: 1, subsets: {v1: 127.0.0.1:1}}\n  s: {listen: 2, subsets: {v1: 127.0.0.1:1}}\n",
                &["services: duplicate key \"s\""],
            ),
            (
                "services: {s: {listen: 1, subsets: {v: 127.0.0.1:1}}}\n---\nservices: {}\n",
                &["tcpshift.yaml:2: a second YAML document starts here"],
            ),
            (
                "\u{0}\u{1}\u{2}\u{7f}",
                &["tcpshift.yaml:", "control characters"],
            ),
            (
                "services: {s: {listen: 1",
                &["tcpshift.yaml:", "did not find expected"],
            ),
            ("services:\n  s:\n\tlisten: 1\n", &["tcpshift.yaml:3:"]),
            ("services: *nope\n", &["unknown anchor"]),
            ("services: !!binary AAAA\n", &["tcpshift.yaml:"]),
        ];
        for (doc, parts) in cases {
            assert_contains(&err(doc), parts);
        }
    }

    #[test]
    fn yaml_errors_carry_locations() {
        let doc = SAMPLE.replace("v2: 127.0.0.1:9002", "v2: localhost:9002");
        let e = Config::from_yaml_str(&doc, "x.yaml").unwrap_err();
        assert_eq!(e.location(), Some((6, Some(11))));
        let message = e.to_string();
        assert!(
            message.starts_with("x.yaml:6:11: services.tcp-echo.subsets.v2: "),
            "{message}"
        );
        assert!(!message.contains(" at line "), "{message}");
    }

    #[test]
    fn truncated_sample_never_panics() {
        for (i, _) in SAMPLE.char_indices() {
            let _ = Config::from_yaml_str(&SAMPLE[..i], "t.yaml");
        }
        assert_contains(
            &err(&SAMPLE[..SAMPLE.len() - 70]),
            &["tcpshift.yaml:", "weights"],
        );
        assert_contains(&err(&SAMPLE[..40]), &["tcpshift.yaml:"]);
    }

    #[test]
    fn deep_nesting_is_an_error() {
        // (libyaml is quadratic in the flow nesting depth: keep these moderate.)
        for doc in [
            "[".repeat(10_000),
            "{a: ".repeat(5_000),
            "- ".repeat(10_000),
        ] {
            assert!(Config::from_yaml_str(&doc, "t.yaml").is_err());
        }
        let doc = format!("services: {}", "[".repeat(1000));
        assert_contains(&err(&doc), &["tcpshift.yaml:"]);
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "tcpshift-config-test-{}-{name}",
            std::process::id()
        ))
    }

    #[test]
    fn from_file() {
        let path = temp_path("ok.yaml");
        std::fs::write(&path, SAMPLE).unwrap();
        let config = Config::from_file(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(config.unwrap().services[0].name, "tcp-echo");

        let path = temp_path("bad.yaml");
        std::fs::write(&path, SAMPLE.replace("v1: 100", "v1: -100")).unwrap();
        let message = Config::from_file(&path).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert_contains(
            &message,
            &[&format!("{}:7:", path.display()), "weight -100 is negative"],
        );

        let path = temp_path("missing.yaml");
        let message = Config::from_file(&path).unwrap_err().to_string();
        assert_contains(&message, &[&path.display().to_string(), ": cannot read: "]);

        let path = temp_path("binary.yaml");
        std::fs::write(&path, b"services:\n  a\xff\xfe: 1\n").unwrap();
        let e = Config::from_file(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(e, ConfigError::NotUtf8 { line: 2, .. }), "{e:?}");
        assert_contains(
            &e.to_string(),
            &[&format!("{}:2: not valid UTF-8", path.display())],
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            let _ = Config::from_yaml_str(&text, "fuzz.yaml");
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Config::from_yaml_str(&String::from_utf8_lossy(&bytes), "fuzz.yaml");
        }

        #[test]
        fn yaml_like_text_never_panics(
            text in "[a-z0-9:{}\\[\\], \\n\"'&*!#.-]{0,200}"
        ) {
            let _ = Config::from_yaml_str(&text, "fuzz.yaml");
        }

        #[test]
        fn mutated_sample_never_panics(
            at in 0..SAMPLE.len(),
            len in 0..20usize,
            insert in "[ -~\\n]{0,10}",
        ) {
            let mut doc = SAMPLE.to_owned();
            let end = (at + len).min(doc.len());
            doc.replace_range(at..end, &insert);
            let _ = Config::from_yaml_str(&doc, "fuzz.yaml");
        }

        #[test]
        fn any_port_listen_round_trips(port in 1u16..) {
            let listen = Listen::parse(&port.to_string());
            prop_assert_eq!(listen, Ok(Listen::Any { port }));
            let shown = Listen::Any { port }.to_string();
            prop_assert_eq!(Listen::parse(&shown), Ok(Listen::Any { port }));
        }
    }
}
