//! What the kernel holds and what a change wants: the plan types shared by every way in
//! (loader configuration, `tcpshiftctl apply`, set-weight, the fleet store).

use serde::Serialize;

use super::service::ServiceConfig;

/// How `State::apply` treats the weights of a service that already exists unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// Write the configuration's weights.
    FromConfig,
    /// Keep the weights in the kernel (a restarted loader must not reset a shift in progress).
    KeepExisting,
}

/// What `State::apply` did to one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// The service was added.
    Created,
    /// Its listen address or subsets changed.
    Redefined,
    /// Same definition, new weights.
    Reweighted,
    /// Nothing changed.
    Unchanged,
}

impl Change {
    /// What changing a service from `old` (`None`: it does not exist yet) to `new` does:
    /// [`Change::Created`], [`Change::Redefined`] (another listen key or other subsets, see
    /// [`same_definition`]), [`Change::Reweighted`] (same definition, other weights) or
    /// [`Change::Unchanged`]. Every way in classifies a change with this one rule: the state
    /// owner's plan, `tcpshiftctl apply` on the fleet store, tcpshiftd's reload.
    pub fn classify(old: Option<&ServiceConfig>, new: &ServiceConfig) -> Change {
        match old {
            None => Change::Created,
            Some(old) if !same_definition(old, new) => Change::Redefined,
            Some(old) if old.weights() == new.weights() && same_settings(old, new) => {
                Change::Unchanged
            }
            Some(_) => Change::Reweighted,
        }
    }
}

/// Whether two definitions carry the same per-service settings the data path reads from the
/// service's entry (rewritten in place, like weights, when they differ).
fn same_settings(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    a.fail_closed == b.fail_closed
}

/// Whether two definitions of a service are the same in the kernel: the same listen key
/// ([`super::Listen::same_key`]: an IPv4-mapped IPv6 address equals its IPv4 address) and
/// the same subsets (names and backends, in order) and the same [`super::Balance`]. Weights and owner rules are not part of
/// the definition.
pub fn same_definition(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    a.listen.same_key(&b.listen)
        && a.balance == b.balance
        && a.protocol == b.protocol
        && a.subsets.len() == b.subsets.len()
        && a.subsets
            .iter()
            .zip(&b.subsets)
            .all(|(x, y)| x.name == y.name && x.addr == y.addr)
}

/// A service as the kernel maps hold it (see `State::services`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    /// Internal id (slot base in the maps).
    pub id: u32,
    /// Name, listen address, subsets and their current weights.
    pub config: ServiceConfig,
    /// Per subset, in order: whether a live listening socket is registered.
    pub live: Vec<bool>,
    /// Text stored with the service by `State::apply_with` (`tcpshiftctl apply` keeps
    /// the Istio VirtualService the service was routed by there); never read by the data path.
    pub annotation: Option<String>,
}

/// What `State::apply_with` does with a service's annotation (at most `MAX_ANNOTATION`
/// bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Annotation {
    /// Leave it as it is (a new service gets none).
    Keep,
    /// Replace it.
    Set(String),
    /// Remove it.
    Clear,
}

/// One service as a change wants it (see `State::apply_with`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// The complete definition, weights included.
    pub config: ServiceConfig,
    /// What to do with its annotation.
    pub annotation: Annotation,
}

/// What a change wants (see `State::apply_with`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Services to create or change; services not named are left alone.
    pub services: Vec<DesiredService>,
    /// Other services whose annotation is removed.
    pub clear_annotations: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Listen, SubsetConfig};

    fn svc(listen: &str, subsets: &[(&str, u16, u32)]) -> ServiceConfig {
        ServiceConfig {
            name: "a".into(),
            listen: Listen::parse(listen).expect("listen"),
            subsets: subsets
                .iter()
                .map(|&(name, port, weight)| SubsetConfig {
                    name: name.into(),
                    addr: ([127, 0, 0, 1], port).into(),
                    weight,
                    owner: Default::default(),
                })
                .collect(),
            take_over: false,
            fail_closed: false,
            balance: Default::default(),
            protocol: Default::default(),
        }
    }

    #[test]
    fn a_change_is_classified_by_definition_then_weights() {
        let base = svc("127.0.0.1:31400", &[("v1", 9001, 80), ("v2", 9002, 20)]);
        assert_eq!(Change::classify(None, &base), Change::Created);
        assert_eq!(Change::classify(Some(&base), &base), Change::Unchanged);
        let mapped = svc(
            "[::ffff:127.0.0.1]:31400",
            &[("v1", 9001, 80), ("v2", 9002, 20)],
        );
        assert_eq!(Change::classify(Some(&base), &mapped), Change::Unchanged);
        let reweighted = svc("127.0.0.1:31400", &[("v1", 9001, 50), ("v2", 9002, 50)]);
        assert_eq!(
            Change::classify(Some(&base), &reweighted),
            Change::Reweighted
        );
        for other in [
            svc("127.0.0.1:31401", &[("v1", 9001, 80), ("v2", 9002, 20)]),
            svc("127.0.0.1:31400", &[("v1", 9001, 80), ("v2", 9003, 20)]),
            svc("127.0.0.1:31400", &[("v1", 9001, 80), ("v3", 9002, 20)]),
            svc("127.0.0.1:31400", &[("v1", 9001, 100)]),
        ] {
            assert_eq!(Change::classify(Some(&base), &other), Change::Redefined);
        }
    }
}
