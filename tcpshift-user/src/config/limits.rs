//! `maxConnections` and `outlierDetection` in the loader's format: on a service (for all its
//! subsets) and on a subset written as a mapping (for that subset; each part given replaces
//! the service's). The same fields as Istio's `DestinationRule.trafficPolicy`
//! (`connectionPool.tcp.maxConnections`, `outlierDetection`), which `istio/` reads with the
//! types here too.
//!
//! ```yaml
//! services:
//!   tcp-echo:
//!     listen: 31400
//!     subsets:
//!       v1: 127.0.0.1:9001
//!       v2: {address: 127.0.0.1:9002, maxConnections: 20}
//!     weights: {v1: 80, v2: 20}
//!     outlierDetection: {consecutiveGatewayErrors: 5, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
//! ```

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::model::traffic_policy::{OutlierDetection, TrafficPolicy, parse_duration};

/// `outlierDetection` as written.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "outlierDetection: a mapping with consecutiveGatewayErrors, consecutive5xxErrors, \
                 interval, baseEjectionTime and maxEjectionPercent"
)]
pub struct RawOutlierDetection {
    /// Connection errors in a row that eject.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// For TCP the same errors (Istio counts both for TCP).
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    /// How often the counters are read.
    #[serde(default)]
    pub interval: Option<IstioDuration>,
    /// The first ejection's length.
    #[serde(default)]
    pub base_ejection_time: Option<IstioDuration>,
    /// The most subsets ejected at once.
    #[serde(default)]
    pub max_ejection_percent: Option<Percent>,
    /// Istio's field; accepted, not used (tcpshift never panics into ejected subsets: one
    /// subset always stays).
    #[serde(default)]
    pub min_health_percent: Option<Percent>,
    /// Istio's field for HTTP; accepted, not used (TCP errors are always counted).
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
}

impl RawOutlierDetection {
    /// The domain value (`None`: both thresholds 0, detection off).
    pub fn detection(&self) -> Option<OutlierDetection> {
        OutlierDetection::from_thresholds(
            self.consecutive_gateway_errors,
            self.consecutive_5xx_errors,
            self.interval.map(|d| d.0),
            self.base_ejection_time.map(|d| d.0),
            self.max_ejection_percent.map(|p| p.0),
        )
    }
}

/// A duration written as Istio writes them (`10s`, `500ms`, `1m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IstioDuration(pub Duration);

impl<'de> Deserialize<'de> for IstioDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IstioDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, e.g. \"10s\" or \"500ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IstioDuration, E> {
                parse_duration(v).map(IstioDuration).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IstioDuration, E> {
                Err(E::custom(format!(
                    "{v} has no unit; write a duration with a unit, e.g. \"{v}s\" or \"{v}ms\""
                )))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A percentage, 0 to 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percent(pub u32);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(deserializer)?;
        if v > 100 {
            return Err(de::Error::custom(format!(
                "{v} is not a percentage; give 0 to 100"
            )));
        }
        Ok(Percent(v as u32))
    }
}

/// A connection limit: 1 or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxConnections(pub u32);

impl<'de> Deserialize<'de> for MaxConnections {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(deserializer)?;
        match u32::try_from(v) {
            Ok(n) if n > 0 => Ok(MaxConnections(n)),
            _ => Err(de::Error::custom(format!(
                "maxConnections {v} is out of range; give 1 to {} (leave it out for no limit)",
                u32::MAX
            ))),
        }
    }
}

/// The policy of `maxConnections` and `outlierDetection` as written.
pub fn policy(
    max_connections: Option<MaxConnections>,
    outlier: Option<&RawOutlierDetection>,
) -> TrafficPolicy {
    TrafficPolicy {
        max_connections: max_connections.map(|m| m.0),
        outlier_detection: outlier.and_then(RawOutlierDetection::detection),
    }
}

/// `trafficPolicy` of an Istio DestinationRule (top level or a subset's): the parts tcpshift
/// applies, `connectionPool.tcp.maxConnections` and `outlierDetection`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawTrafficPolicy {
    /// `connectionPool`.
    #[serde(default)]
    pub connection_pool: Option<RawConnectionPool>,
    /// `outlierDetection`.
    #[serde(default)]
    pub outlier_detection: Option<RawOutlierDetection>,
}

/// `connectionPool` of a `trafficPolicy`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RawConnectionPool {
    /// `tcp`.
    #[serde(default)]
    pub tcp: Option<RawTcpPool>,
}

/// `connectionPool.tcp`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawTcpPool {
    /// `maxConnections`.
    #[serde(default)]
    pub max_connections: Option<MaxConnections>,
}

impl RawTrafficPolicy {
    /// The domain value.
    pub fn policy(&self) -> TrafficPolicy {
        let max = self
            .connection_pool
            .as_ref()
            .and_then(|p| p.tcp.as_ref())
            .and_then(|t| t.max_connections);
        policy(max, self.outlier_detection.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_traffic_policy() {
        let p: RawTrafficPolicy = serde_yaml::from_str(
            "connectionPool: {tcp: {maxConnections: 20, connectTimeout: 1s}, http: {}}\n\
             outlierDetection: {consecutiveGatewayErrors: 3, interval: 500ms, baseEjectionTime: 2s, maxEjectionPercent: 50}\n\
             loadBalancer: {simple: ROUND_ROBIN}\n",
        )
        .unwrap();
        let p = p.policy();
        assert_eq!(p.max_connections, Some(20));
        let d = p.outlier_detection.unwrap();
        assert_eq!(d.consecutive_errors, 3);
        assert_eq!(d.interval, Duration::from_millis(500));
        assert_eq!(d.max_ejection_percent, 50);
    }

    const CONFIG: &str = "services:
  s:
    listen: 31400
    subsets:
      v1: 127.0.0.1:9001
      v2: {address: 127.0.0.1:9002, maxConnections: 20}
    weights: {v1: 1, v2: 1}
    outlierDetection: {consecutiveGatewayErrors: 3, interval: 1s}
";

    #[test]
    fn config_fields_on_the_service_and_the_subset() {
        let c = crate::config::Config::from_yaml_str(CONFIG, "f.yaml").unwrap();
        let p = &c.policies[0];
        assert_eq!(p.service, "s");
        assert_eq!(p.for_subset("v2").max_connections, Some(20));
        assert_eq!(p.for_subset("v1").max_connections, None);
        let d = p.for_subset("v2").outlier_detection.unwrap();
        assert_eq!(
            (d.consecutive_errors, d.interval),
            (3, Duration::from_secs(1))
        );
        let bad = CONFIG.replace("interval: 1s", "interval: 10");
        let e = crate::config::Config::from_yaml_str(&bad, "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("f.yaml:8:")
                && e.contains("outlierDetection.interval")
                && e.contains("has no unit"),
            "{e}"
        );
        let bad = CONFIG.replace("maxConnections: 20", "maxConnections: 0");
        let e = crate::config::Config::from_yaml_str(&bad, "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("f.yaml:6:") && e.contains("out of range"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_say_what_to_write() {
        let e = serde_yaml::from_str::<RawOutlierDetection>("interval: 10")
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no unit"), "{e}");
        let e = serde_yaml::from_str::<RawOutlierDetection>("maxEjectionPercent: 150")
            .unwrap_err()
            .to_string();
        assert!(e.contains("give 0 to 100"), "{e}");
        let e = serde_yaml::from_str::<RawOutlierDetection>("consecutiveErrors: 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let e = serde_yaml::from_str::<MaxConnections>("0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range"), "{e}");
    }
}
