//! A DestinationRule's `trafficPolicy` (top level and per subset): the parts tcpshift applies,
//! `connectionPool.tcp.maxConnections` and `outlierDetection`, as a
//! [`ServicePolicy`] for its host. Other parts (load balancer, TLS, HTTP pool settings) have no
//! meaning for kernel steering and are ignored with a warning.

use serde_yaml::{Mapping, Value};

use super::ApplyError;
use super::objects::DestinationRule;
use super::parse::Document;
use crate::config::limits::RawTrafficPolicy;
use crate::model::traffic_policy::{ServicePolicy, TrafficPolicy};
use crate::yaml::{FieldPath, path};

/// Keys of a `trafficPolicy` tcpshift reads (the rest is ignored).
const APPLIED: [&str; 3] = ["connectionPool", "outlierDetection", "loadBalancer"];

/// One `trafficPolicy` at `at`: the policy, and whether it had parts that are ignored.
fn read(doc: &Document, at: &FieldPath, m: &Mapping) -> Result<(TrafficPolicy, bool), ApplyError> {
    let raw: RawTrafficPolicy = serde_yaml::from_value(Value::Mapping(m.clone()))
        .map_err(|e| doc.error(at, format!("{e}")))?;
    let ignored = m
        .keys()
        .any(|k| !APPLIED.iter().any(|a| k.as_str() == Some(*a)))
        || m.get("connectionPool")
            .and_then(Value::as_mapping)
            .is_some_and(|p| p.keys().any(|k| k.as_str() != Some("tcp")));
    Ok((raw.policy(), ignored))
}

/// The traffic policy `dr` gives its host's subsets, and a warning when parts are ignored.
pub(super) fn policy_of(
    doc: &Document,
    dr: &DestinationRule,
) -> Result<(ServicePolicy, Option<String>), ApplyError> {
    let spec = path(&["spec"]);
    let mut ignored = false;
    let top = match &dr.spec.traffic_policy {
        Some(m) => {
            let (p, i) = read(doc, &spec.key("trafficPolicy"), m)?;
            ignored |= i;
            p
        }
        None => TrafficPolicy::default(),
    };
    let mut subsets = Vec::new();
    for (i, s) in dr.spec.subsets.iter().enumerate() {
        if let Some(m) = &s.traffic_policy {
            let at = spec.key("subsets").index(i).key("trafficPolicy");
            let (p, ign) = read(doc, &at, m)?;
            ignored |= ign;
            subsets.push((s.name.clone(), p));
        }
    }
    let warning = ignored.then(|| {
        format!(
            "DestinationRule {}: of trafficPolicy only loadBalancer, \
             connectionPool.tcp.maxConnections and outlierDetection apply (tcpshift places each new connection in the kernel, without \
             a proxy); the rest is ignored",
            dr.metadata.name
        )
    });
    Ok((
        ServicePolicy {
            service: dr.spec.host.clone(),
            top,
            subsets,
        },
        warning,
    ))
}
