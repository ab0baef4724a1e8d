//! Traffic policies: connection limits and outlier detection, per service and per subset.
//!
//! The domain side of Istio's `DestinationRule.trafficPolicy` (`connectionPool.tcp.
//! maxConnections`, `outlierDetection`) and of the loader configuration's fields of the same
//! names. Nothing here knows YAML or BPF: the parsers build these, [`crate::state`] writes
//! them into `TS_LIMITS`, [`crate::outlier`] decides ejections with them.

use std::time::Duration;

/// Istio's default `consecutive5xxErrors` when `outlierDetection` names no threshold.
pub const DEFAULT_CONSECUTIVE_ERRORS: u32 = 5;
/// Istio's default `interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Istio's default `baseEjectionTime`.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// Istio's default `maxEjectionPercent`.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// Which threshold ejects ([`OutlierDetection::trigger`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// `consecutiveGatewayErrors`.
    GatewayErrors,
    /// `consecutive5xxErrors` (for TCP the same connection errors).
    Errors5xx,
}

/// `outlierDetection`: eject a subset after errors in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutlierDetection {
    /// Errors in a row that eject (the smaller of the two thresholds given, at least 1).
    pub consecutive_errors: u32,
    /// Which field `consecutive_errors` came from.
    pub trigger: Trigger,
    /// How often the failure counters are read.
    pub interval: Duration,
    /// An ejection lasts `base_ejection_time` × the times the subset was ejected.
    pub base_ejection_time: Duration,
    /// The most subsets of the service ejected at once, in percent (one subset always stays).
    pub max_ejection_percent: u32,
}

impl OutlierDetection {
    /// From Istio's fields: `gateway` (`consecutiveGatewayErrors`) and `errors_5xx`
    /// (`consecutive5xxErrors`), 0 or absent meaning "not this one". With neither given,
    /// Istio's default of 5 `consecutive5xxErrors` applies; with both set to 0, `None`
    /// (detection off).
    pub fn from_thresholds(
        gateway: Option<u32>,
        errors_5xx: Option<u32>,
        interval: Option<Duration>,
        base_ejection_time: Option<Duration>,
        max_ejection_percent: Option<u32>,
    ) -> Option<OutlierDetection> {
        let (consecutive_errors, trigger) = match (gateway.filter(|&g| g > 0), errors_5xx) {
            (Some(g), Some(e)) if e > 0 && e < g => (e, Trigger::Errors5xx),
            (Some(g), _) => (g, Trigger::GatewayErrors),
            (None, Some(0)) => return None,
            (None, Some(e)) => (e, Trigger::Errors5xx),
            (None, None) if gateway == Some(0) => return None,
            (None, None) => (DEFAULT_CONSECUTIVE_ERRORS, Trigger::Errors5xx),
        };
        Some(OutlierDetection {
            consecutive_errors,
            trigger,
            interval: interval.unwrap_or(DEFAULT_INTERVAL),
            base_ejection_time: base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION),
            max_ejection_percent: max_ejection_percent
                .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT)
                .min(100),
        })
    }
}

/// What applies to one subset (or, at the top, to all of a service's subsets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TrafficPolicy {
    /// `connectionPool.tcp.maxConnections`: most open connections; `None`: no limit.
    pub max_connections: Option<u32>,
    /// `outlierDetection`; `None`: no ejection.
    pub outlier_detection: Option<OutlierDetection>,
}

impl TrafficPolicy {
    /// Whether it asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.max_connections.is_none() && self.outlier_detection.is_none()
    }

    /// `self` with each part `over` gives replacing this one's (a subset's `trafficPolicy`
    /// over its service's).
    pub fn overridden_by(&self, over: &TrafficPolicy) -> TrafficPolicy {
        TrafficPolicy {
            max_connections: over.max_connections.or(self.max_connections),
            outlier_detection: over.outlier_detection.or(self.outlier_detection),
        }
    }
}

/// The traffic policy of one service: its own and its subsets' overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePolicy {
    /// The service's name.
    pub service: String,
    /// For every subset.
    pub top: TrafficPolicy,
    /// Per subset name, replacing parts of `top`.
    pub subsets: Vec<(String, TrafficPolicy)>,
}

impl ServicePolicy {
    /// What applies to subset `name`.
    pub fn for_subset(&self, name: &str) -> TrafficPolicy {
        match self.subsets.iter().find(|(n, _)| n == name) {
            Some((_, p)) => self.top.overridden_by(p),
            None => self.top,
        }
    }

    /// Whether it asks for nothing, for any subset.
    pub fn is_empty(&self) -> bool {
        self.top.is_empty() && self.subsets.iter().all(|(_, p)| p.is_empty())
    }
}

/// Parses a duration as Istio writes them: a number with a unit, `ms`, `s`, `m` or `h`
/// (`500ms`, `10s`, `1.5s`, `2m`); at least 1 ms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "invalid duration {s:?}; expected a number with a unit ms, s, m or h, e.g. \"10s\" or \"500ms\""
            ));
        }
    };
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid duration {s:?}; expected a number with a unit, e.g. \"10s\" or \"500ms\"")
    })?;
    let secs = value * scale;
    if !(0.001..=86_400.0 * 365.0).contains(&secs) {
        return Err(format!(
            "duration {s:?} is out of range; give 1ms to 365 days (8760h)"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_follow_istio() {
        let d = OutlierDetection::from_thresholds(None, None, None, None, None).unwrap();
        assert_eq!((d.consecutive_errors, d.trigger), (5, Trigger::Errors5xx));
        assert_eq!(d.max_ejection_percent, 10);
        let d = OutlierDetection::from_thresholds(Some(3), None, None, None, None).unwrap();
        assert_eq!(
            (d.consecutive_errors, d.trigger),
            (3, Trigger::GatewayErrors)
        );
        let d = OutlierDetection::from_thresholds(Some(7), Some(2), None, None, None).unwrap();
        assert_eq!((d.consecutive_errors, d.trigger), (2, Trigger::Errors5xx));
        assert!(OutlierDetection::from_thresholds(Some(0), Some(0), None, None, None).is_none());
        assert!(OutlierDetection::from_thresholds(Some(0), None, None, None, None).is_none());
    }

    #[test]
    fn subsets_override_parts() {
        let od = OutlierDetection::from_thresholds(Some(3), None, None, None, None);
        let p = ServicePolicy {
            service: "s".into(),
            top: TrafficPolicy {
                max_connections: Some(100),
                outlier_detection: od,
            },
            subsets: vec![(
                "v2".into(),
                TrafficPolicy {
                    max_connections: Some(20),
                    outlier_detection: None,
                },
            )],
        };
        assert_eq!(p.for_subset("v2").max_connections, Some(20));
        assert_eq!(p.for_subset("v2").outlier_detection, od);
        assert_eq!(p.for_subset("v1").max_connections, Some(100));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["10", "s", "-1s", "0s", "1d", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
