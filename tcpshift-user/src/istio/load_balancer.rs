//! A DestinationRule's `trafficPolicy.loadBalancer`: how the connections of its host are
//! placed on the subsets ([`Balance`]).
//!
//! - `loadBalancer.simple: ROUND_ROBIN` → exact weighted round-robin; `RANDOM` and
//!   `UNSPECIFIED` → the default hash placement; `LEAST_REQUEST`, `LEAST_CONN` and
//!   `PASSTHROUGH` need per-connection state tcpshift does not keep: hash placement, with a
//!   warning.
//! - `loadBalancer.consistentHash.useSourceIp: true` → source-IP affinity. The HTTP keys
//!   (`httpHeaderName`, `httpCookie`, `httpQueryParameterName`) have no meaning for TCP:
//!   hash placement, with a warning; `ringHash`, `maglev` and `minimumRingSize` describe
//!   Envoy's table, not the placement: ignored.
//! - **Per subset**: Istio applies a subset's `trafficPolicy` to the endpoints *within* that
//!   subset. A tcpshift subset is one listening socket, so the only choice left is the one
//!   *between* subsets, made once per service. A subset-level `loadBalancer` therefore sets
//!   the mode of the whole service: all subsets that give one, and the top-level policy, must
//!   agree (an error names the two that differ), and a warning says so.
//!
//! The rest of a `trafficPolicy` is read by `traffic_policy` (connection limits, outlier
//! detection), which also warns about the parts that are ignored (TLS, ...).

use serde_yaml::{Mapping, Value};

use super::ApplyError;
use super::objects::DestinationRule;
use super::parse::Document;
use crate::model::Balance;
use crate::yaml::{FieldPath, path};

/// The mode `dr` asks for its host (`None` when it names none), and warnings about what of
/// its traffic policies is ignored or how it was read.
pub(super) fn rule_balance(
    doc: &Document,
    dr: &DestinationRule,
) -> Result<(Option<Balance>, Vec<String>), ApplyError> {
    let mut warnings = Vec::new();
    let name = &dr.metadata.name;
    let top_path = path(&["spec", "trafficPolicy"]);
    let top = match &dr.spec.traffic_policy {
        Some(policy) => policy_balance(doc, policy, &top_path, name, &mut warnings)?,
        None => None,
    };
    // (mode, subset name, path) of the first subset that sets one.
    let mut from_subset: Option<(Balance, &str, FieldPath)> = None;
    for (i, s) in dr.spec.subsets.iter().enumerate() {
        let Some(policy) = &s.traffic_policy else {
            continue;
        };
        let p = path(&["spec", "subsets"]).index(i).key("trafficPolicy");
        let Some(b) = policy_balance(doc, policy, &p, name, &mut warnings)? else {
            continue;
        };
        let lb = p.key("loadBalancer");
        if let Some(t) = top
            && t != b
        {
            return Err(doc.error(
                &lb,
                format!(
                    "subset {} asks for {b} placement but the rule's trafficPolicy asks for \
                     {t}: tcpshift chooses among a service's subsets with one mode for the \
                     whole service (a subset is one socket, there is nothing to balance \
                     within it); give one loadBalancer",
                    s.name
                ),
            ));
        }
        match &from_subset {
            Some((other, other_name, _)) if *other != b => {
                return Err(doc.error(
                    &lb,
                    format!(
                        "subset {} asks for {b} placement but subset {other_name} asks for \
                         {other}: tcpshift chooses among a service's subsets with one mode for \
                         the whole service; give every subset the same loadBalancer, or one at \
                         the top of the rule's trafficPolicy",
                        s.name
                    ),
                ));
            }
            Some(_) => {}
            None => from_subset = Some((b, &s.name, lb)),
        }
    }
    let balance = match (top, from_subset) {
        (Some(t), _) => Some(t),
        (None, Some((b, subset, _))) => {
            warnings.push(format!(
                "DestinationRule {name}: the loadBalancer of subset {subset} ({b}) applies to \
                 the whole service {}: tcpshift places each connection on a subset with one \
                 mode per service",
                dr.spec.host
            ));
            Some(b)
        }
        (None, None) => None,
    };
    Ok((balance, warnings))
}

/// The mode one `trafficPolicy` (at `at`) asks for, if it has a `loadBalancer`.
fn policy_balance(
    doc: &Document,
    policy: &Mapping,
    at: &FieldPath,
    rule: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<Balance>, ApplyError> {
    // The other keys are read, or warned about as ignored, by `traffic_policy`.
    let mut balance = None;
    if let Some(value) = policy.get("loadBalancer") {
        balance = Some(load_balancer(
            doc,
            value,
            &at.key("loadBalancer"),
            rule,
            warnings,
        )?);
    }
    Ok(balance)
}

/// The mode of one `loadBalancer` value (at `at`).
fn load_balancer(
    doc: &Document,
    value: &Value,
    at: &FieldPath,
    rule: &str,
    warnings: &mut Vec<String>,
) -> Result<Balance, ApplyError> {
    let Some(lb) = value.as_mapping() else {
        return Err(doc.error(
            at,
            "expected a mapping, e.g. `loadBalancer: {simple: ROUND_ROBIN}` or \
             `loadBalancer: {consistentHash: {useSourceIp: true}}`",
        ));
    };
    let simple = lb.get("simple");
    let hash = lb.get("consistentHash");
    if simple.is_some() && hash.is_some() {
        return Err(doc.error(
            &at.key("consistentHash"),
            "`simple` and `consistentHash` exclude each other; give one of them",
        ));
    }
    for key in lb.keys().filter_map(Value::as_str) {
        if !matches!(key, "simple" | "consistentHash") {
            warnings.push(format!(
                "DestinationRule {rule}: loadBalancer.{key} is ignored"
            ));
        }
    }
    if let Some(simple) = simple {
        let p = at.key("simple");
        let Some(s) = simple.as_str() else {
            return Err(doc.error(&p, SIMPLE_VALUES));
        };
        return match s {
            "ROUND_ROBIN" => Ok(Balance::RoundRobin),
            "RANDOM" | "UNSPECIFIED" => Ok(Balance::Hash),
            "LEAST_REQUEST" | "LEAST_CONN" | "PASSTHROUGH" => {
                warnings.push(format!(
                    "DestinationRule {rule}: loadBalancer.simple {s} is not supported \
                     (tcpshift keeps no per-connection state to compare subsets); connections \
                     are placed by hash of the connection, as with RANDOM"
                ));
                Ok(Balance::Hash)
            }
            other => Err(doc.error(&p, format!("unknown value {other:?}; {SIMPLE_VALUES}"))),
        };
    }
    let Some(hash) = hash else {
        return Ok(Balance::Hash);
    };
    let p = at.key("consistentHash");
    let Some(hash) = hash.as_mapping() else {
        return Err(doc.error(
            &p,
            "expected a mapping, e.g. `consistentHash: {useSourceIp: true}`",
        ));
    };
    let mut balance = Balance::Hash;
    for (key, value) in hash {
        match key.as_str() {
            Some("useSourceIp") => match value.as_bool() {
                Some(true) => balance = Balance::SourceIp,
                Some(false) => {}
                None => {
                    return Err(doc.error(
                        &p.key("useSourceIp"),
                        "expected true or false (`useSourceIp: true`: every connection of a \
                         client address to one subset)",
                    ));
                }
            },
            Some("ringHash" | "maglev" | "minimumRingSize") => {}
            Some(other) => warnings.push(format!(
                "DestinationRule {rule}: consistentHash.{other} has no meaning for TCP and is \
                 ignored; only useSourceIp selects a placement"
            )),
            None => {}
        }
    }
    Ok(balance)
}

const SIMPLE_VALUES: &str = "expected ROUND_ROBIN (exact weighted round-robin), RANDOM or \
                             UNSPECIFIED (placement by hash of the connection), or \
                             LEAST_REQUEST, LEAST_CONN, PASSTHROUGH (not supported: placed by hash)";

#[cfg(test)]
mod tests {
    use crate::istio::{Manifest, Plan};
    use crate::model::Balance;

    const SERVICES: &str = include_str!("../../tests/fixtures/istio/tcp-echo-services.yaml");
    const ALL_V1: &str = include_str!("../../tests/fixtures/istio/tcp-echo-all-v1.yaml");

    /// The seed's all-v1 manifest with `policy` as the DestinationRule's top-level
    /// trafficPolicy (`None`: as shipped) and `subset_policy` as v2's.
    fn apply(policy: Option<&str>, subset_policy: Option<&str>) -> Result<Plan, String> {
        let mut dr = ALL_V1.to_string();
        if let Some(p) = policy {
            dr = dr.replace(
                "spec:\n  host: tcp-echo\n",
                &format!("spec:\n  host: tcp-echo\n  trafficPolicy: {p}\n"),
            );
        }
        if let Some(p) = subset_policy {
            dr = dr.replace(
                "      version: v2\n",
                &format!("      version: v2\n    trafficPolicy: {p}\n"),
            );
        }
        let mut m = Manifest::parse(SERVICES, "services.yaml").map_err(|e| e.to_string())?;
        m.extend(Manifest::parse(&dr, "f.yaml").map_err(|e| e.to_string())?);
        m.resolve(&[]).map_err(|e| e.to_string())
    }

    fn balance(plan: &Plan) -> Balance {
        plan.services[0].config.balance
    }

    #[test]
    fn load_balancer_sets_the_mode() {
        let plan = apply(None, None).unwrap();
        assert_eq!(balance(&plan), Balance::Hash);
        let rr = apply(Some("{loadBalancer: {simple: ROUND_ROBIN}}"), None).unwrap();
        assert_eq!(balance(&rr), Balance::RoundRobin);
        let src = "{loadBalancer: {consistentHash: {useSourceIp: true}}}";
        assert_eq!(balance(&apply(Some(src), None).unwrap()), Balance::SourceIp);
        // Per subset: the whole service, with a warning saying so.
        let plan = apply(None, Some(src)).unwrap();
        assert_eq!(balance(&plan), Balance::SourceIp);
        assert!(
            plan.warnings
                .iter()
                .any(|w| w.contains("loadBalancer of subset v2 (source-ip) applies to the whole")),
            "{:?}",
            plan.warnings
        );
        // Unsupported values: hash, with a warning; the rest of a policy is ignored.
        let plan = apply(Some("{loadBalancer: {simple: LEAST_CONN}, tls: {}}"), None).unwrap();
        assert_eq!(balance(&plan), Balance::Hash);
        assert_eq!(plan.warnings.len(), 2, "{:?}", plan.warnings);
    }

    #[test]
    fn contradictions_are_refused_with_the_field() {
        let e = apply(
            Some("{loadBalancer: {simple: ROUND_ROBIN}}"),
            Some("{loadBalancer: {consistentHash: {useSourceIp: true}}}"),
        )
        .unwrap_err();
        assert!(
            e.contains("spec.subsets[1].trafficPolicy.loadBalancer")
                && e.contains("subset v2 asks for source-ip placement but the rule's"),
            "{e}"
        );
        let e = apply(
            Some("{loadBalancer: {simple: ROUND_ROBIN, consistentHash: {useSourceIp: true}}}"),
            None,
        )
        .unwrap_err();
        assert!(
            e.contains("`simple` and `consistentHash` exclude each other"),
            "{e}"
        );
        let e = apply(Some("{loadBalancer: {simple: FASTEST}}"), None).unwrap_err();
        assert!(
            e.contains("unknown value \"FASTEST\"; expected ROUND_ROBIN"),
            "{e}"
        );
        let e = apply(
            Some("{loadBalancer: {consistentHash: {useSourceIp: yes}}}"),
            None,
        )
        .unwrap_err();
        assert!(e.contains("useSourceIp"), "{e}");
    }

    #[test]
    fn a_document_and_a_rule_that_disagree_are_refused() {
        let services = SERVICES.replace("  tcp-echo:\n", "  tcp-echo:\n    balance: round-robin\n");
        let dr = ALL_V1.replace(
            "spec:\n  host: tcp-echo\n",
            "spec:\n  host: tcp-echo\n  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}\n",
        );
        let mut m = Manifest::parse(&services, "services.yaml").unwrap();
        m.extend(Manifest::parse(&dr, "f.yaml").unwrap());
        let e = m.resolve(&[]).unwrap_err().to_string();
        assert!(
            e.contains("placed by round-robin here and by source-ip by DestinationRule"),
            "{e}"
        );
        let mut m = Manifest::parse(&services, "services.yaml").unwrap();
        m.extend(Manifest::parse(ALL_V1, "f.yaml").unwrap());
        assert_eq!(balance(&m.resolve(&[]).unwrap()), Balance::RoundRobin);
    }
}
