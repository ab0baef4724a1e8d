//! The fleet's complete desired state and the edits made to it.
//!
//! A local change goes through [`crate::state::State::apply_with`], which checks the rules
//! before writing anything. The store has no kernel to write to, so the same rules are
//! checked here, on the complete desired state, with the same errors
//! ([`StateError`]) and therefore the same messages. The edits mirror the local ones:
//! [`DesiredState::applied`] (`apply -f`), [`DesiredState::without`] (`delete`) and
//! [`DesiredState::with_weights`] (`set-weight`).

use std::collections::{BTreeMap, HashMap, HashSet};

use tcpshift_common::MAX_SERVICES;

use crate::{
    model::{Annotation, Desired, DesiredService, ServiceConfig, ServiceView},
    state::{StateError, check_service, service_key},
    weights,
};

/// One service of the fleet's desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetService {
    /// The complete definition, weights included.
    pub config: ServiceConfig,
    /// The text a local apply stores with the service (the Istio route it came from).
    pub annotation: Option<String>,
}

/// What [`DesiredState::with_weights`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reweighted {
    /// The state with the new weights.
    pub state: DesiredState,
    /// The service whose weights changed.
    pub service: String,
    /// Its subsets and their new weights, in order.
    pub weights: Vec<(String, u32)>,
}

/// The fleet's complete desired state: every service, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    services: BTreeMap<String, FleetService>,
}

impl DesiredState {
    /// No services.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state holding `services` (a later service replaces an earlier one of the same
    /// name). Not validated: see [`DesiredState::validate`].
    pub fn from_services(services: impl IntoIterator<Item = FleetService>) -> Self {
        Self {
            services: services
                .into_iter()
                .map(|s| (s.config.name.clone(), s))
                .collect(),
        }
    }

    /// The services, sorted by name.
    pub fn services(&self) -> impl Iterator<Item = &FleetService> {
        self.services.values()
    }

    /// The service called `name`.
    pub fn get(&self, name: &str) -> Option<&FleetService> {
        self.services.get(name)
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether there is no service.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The services as [`ServiceView`]s, so that what reads the kernel's services (the Istio
    /// resolver, `get`) reads the fleet's the same way. Ids are positions; no subset is live
    /// (liveness is per node, see the node reports).
    pub fn views(&self) -> Vec<ServiceView> {
        self.services
            .values()
            .enumerate()
            .map(|(i, s)| ServiceView {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                config: s.config.clone(),
                live: vec![false; s.config.subsets.len()],
                annotation: s.annotation.clone(),
            })
            .collect()
    }

    /// Checks every rule a local apply checks: names, 1 to 16 subsets with distinct valid
    /// names, weights, annotation size, one listen address per service, the service limit.
    pub fn validate(&self) -> Result<(), StateError> {
        for s in self.services.values() {
            check_service(&s.config, s.annotation.as_deref())?;
        }
        check_listens(self.services.values().map(|s| &s.config), [].into_iter())?;
        check_count(self.services.len())
    }

    /// The state after a change as [`crate::state::State::apply_with`] makes it: the
    /// services `change` names are replaced (their annotation kept, set or cleared), the
    /// annotations of `change.clear_annotations` removed, the others left alone. The change is
    /// checked first, with a local apply's errors; nothing is changed on error.
    pub fn applied(&self, change: &Desired) -> Result<DesiredState, StateError> {
        let mut names = HashSet::new();
        for d in &change.services {
            if !names.insert(d.config.name.as_str()) {
                return Err(StateError::InvalidService {
                    name: d.config.name.clone(),
                    reason: "named twice in one change".into(),
                });
            }
            let annotation = match &d.annotation {
                Annotation::Set(text) => Some(text.as_str()),
                Annotation::Keep | Annotation::Clear => None,
            };
            check_service(&d.config, annotation)?;
        }
        check_listens(
            change.services.iter().map(|d| &d.config),
            self.services
                .values()
                .filter(|s| !names.contains(s.config.name.as_str()))
                .map(|s| &s.config),
        )?;
        let mut next = self.clone();
        for d in &change.services {
            let annotation = match &d.annotation {
                Annotation::Keep => self
                    .services
                    .get(&d.config.name)
                    .and_then(|s| s.annotation.clone()),
                Annotation::Set(text) => Some(text.clone()),
                Annotation::Clear => None,
            };
            next.services.insert(
                d.config.name.clone(),
                FleetService {
                    config: d.config.clone(),
                    annotation,
                },
            );
        }
        for name in &change.clear_annotations {
            if let Some(s) = next.services.get_mut(name)
                && !names.contains(name.as_str())
            {
                s.annotation = None;
            }
        }
        check_count(next.services.len())?;
        Ok(next)
    }

    /// The state without the services `names` (names that do not exist are skipped), and
    /// the names removed, in the order given.
    pub fn without(&self, names: &[String]) -> (DesiredState, Vec<String>) {
        let mut next = self.clone();
        let removed = names
            .iter()
            .filter(|n| next.services.remove(n.as_str()).is_some())
            .cloned()
            .collect();
        (next, removed)
    }

    /// The state after `set-weight` as [`crate::state::State::set_weights`] does it
    /// locally (same rules, same errors): `service` may be `None` when there is one
    /// service.
    pub fn with_weights(
        &self,
        service: Option<&str>,
        requested: &[(String, u32)],
    ) -> Result<Reweighted, StateError> {
        let known = || self.services.keys().cloned().collect::<Vec<_>>().join(", ");
        let current = match service {
            Some(name) => self
                .services
                .get(name)
                .ok_or_else(|| StateError::UnknownService {
                    name: name.to_string(),
                    known: known(),
                })?,
            None => {
                let mut all = self.services.values();
                match (all.next(), all.next()) {
                    (None, _) => return Err(StateError::NoServices),
                    (Some(one), None) => one,
                    (Some(_), Some(_)) => {
                        return Err(StateError::AmbiguousService {
                            count: self.services.len(),
                            known: known(),
                        });
                    }
                }
            }
        };
        let pairs: Vec<(String, u32)> = current
            .config
            .subsets
            .iter()
            .map(|s| (s.name.clone(), s.weight))
            .collect();
        let new = weights::apply_set_weight(&pairs, requested)?;
        weights::bucket_counts(&new)?;
        let mut service = current.clone();
        for (s, w) in service.config.subsets.iter_mut().zip(&new) {
            s.weight = *w;
        }
        let name = service.config.name.clone();
        let result = service
            .config
            .subsets
            .iter()
            .map(|s| (s.name.clone(), s.weight))
            .collect();
        let mut next = self.clone();
        next.services.insert(name.clone(), service);
        Ok(Reweighted {
            state: next,
            service: name,
            weights: result,
        })
    }

    /// What a node passes to [`crate::state::State::apply_with`] to reach this state: every
    /// service with its annotation set or cleared.
    pub fn to_change(&self) -> Desired {
        Desired {
            services: self
                .services
                .values()
                .map(|s| DesiredService {
                    config: s.config.clone(),
                    annotation: match &s.annotation {
                        Some(text) => Annotation::Set(text.clone()),
                        None => Annotation::Clear,
                    },
                })
                .collect(),
            clear_annotations: Vec::new(),
        }
    }

    /// The services of `current` (a node's kernel, [`crate::state::State::services`]) that
    /// this state does not have: what a node deletes ([`crate::state::State::delete_with`]).
    pub fn extra_in(&self, current: &[ServiceView]) -> Vec<String> {
        current
            .iter()
            .filter(|v| !self.services.contains_key(&v.config.name))
            .map(|v| v.config.name.clone())
            .collect()
    }
}

/// One listen address per service: `changed` are checked in order against each other, then
/// `kept` (services the change leaves alone) against them.
fn check_listens<'a>(
    changed: impl Iterator<Item = &'a ServiceConfig>,
    kept: impl Iterator<Item = &'a ServiceConfig>,
) -> Result<(), StateError> {
    let mut keys = HashMap::new();
    for svc in changed {
        if let Some(other) = keys.insert(service_key(&svc.listen), svc.name.as_str()) {
            return Err(StateError::ListenConflict {
                name: svc.name.clone(),
                listen: svc.listen.to_string(),
                other: other.to_owned(),
            });
        }
    }
    for svc in kept {
        if let Some(other) = keys.get(&service_key(&svc.listen)) {
            return Err(StateError::ListenConflict {
                name: (*other).to_owned(),
                listen: svc.listen.to_string(),
                other: svc.name.clone(),
            });
        }
    }
    Ok(())
}

fn check_count(n: usize) -> Result<(), StateError> {
    if n > MAX_SERVICES as usize {
        return Err(StateError::TooManyServices { wanted: n });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Listen, SubsetConfig};

    fn svc(name: &str, listen: &str, weights: &[u32]) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            listen: Listen::parse(listen).unwrap(),
            subsets: weights
                .iter()
                .enumerate()
                .map(|(i, w)| SubsetConfig {
                    name: format!("v{}", i + 1),
                    addr: format!("127.0.0.1:{}", 9001 + i).parse().unwrap(),
                    weight: *w,
                    owner: Default::default(),
                })
                .collect(),
            take_over: false,
            fail_closed: false,
            balance: Default::default(),
            protocol: Default::default(),
        }
    }

    fn change(services: Vec<ServiceConfig>) -> Desired {
        Desired {
            services: services
                .into_iter()
                .map(|config| DesiredService {
                    config,
                    annotation: Annotation::Keep,
                })
                .collect(),
            clear_annotations: vec![],
        }
    }

    #[test]
    fn apply_replaces_named_services_and_keeps_others() {
        let base = DesiredState::new()
            .applied(&change(vec![
                svc("a", "31400", &[100, 0]),
                svc("b", "31401", &[1]),
            ]))
            .unwrap();
        let mut c = change(vec![svc("a", "31400", &[50, 50])]);
        c.services[0].annotation = Annotation::Set("route".into());
        let next = base.applied(&c).unwrap();
        assert_eq!(next.len(), 2);
        assert_eq!(next.get("a").unwrap().config.weights(), [50, 50]);
        assert_eq!(next.get("a").unwrap().annotation.as_deref(), Some("route"));
        // Keep keeps; clear_annotations clears services not named.
        let kept = next
            .applied(&change(vec![svc("a", "31400", &[1, 0])]))
            .unwrap();
        assert_eq!(kept.get("a").unwrap().annotation.as_deref(), Some("route"));
        let cleared = next
            .applied(&Desired {
                services: vec![],
                clear_annotations: vec!["a".into()],
            })
            .unwrap();
        assert_eq!(cleared.get("a").unwrap().annotation, None);
        assert_eq!(cleared.to_change().services.len(), 2);
    }

    #[test]
    fn refuses_what_a_local_apply_refuses_with_its_messages() {
        let base = DesiredState::new()
            .applied(&change(vec![svc("a", "31400", &[1])]))
            .unwrap();
        let e = base
            .applied(&change(vec![svc("b", "*:31400", &[1])]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "service \"b\" wants to listen on *:31400, which service \"a\" already uses"
        );
        let e = base
            .applied(&change(vec![svc("c", "31401", &[0, 0])]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "all weights are 0: at least one subset needs a weight above 0"
        );
        let e = base
            .applied(&change(vec![svc("d d", "31402", &[1])]))
            .unwrap_err();
        assert!(e.to_string().starts_with("service \"d d\": service name"));
        let e = base
            .applied(&change(vec![
                svc("e", "31403", &[1]),
                svc("e", "31404", &[1]),
            ]))
            .unwrap_err();
        assert_eq!(e.to_string(), "service \"e\": named twice in one change");
        // A service moved to another port frees its old one in the same change.
        let moved = base
            .applied(&change(vec![
                svc("a", "31401", &[1]),
                svc("b", "31400", &[1]),
            ]))
            .unwrap();
        moved.validate().unwrap();
    }

    #[test]
    fn set_weight_like_local() {
        let base = DesiredState::new()
            .applied(&change(vec![svc("a", "31400", &[100, 0])]))
            .unwrap();
        let r = base.with_weights(None, &[("v2".into(), 20)]).unwrap();
        assert_eq!(r.service, "a");
        assert_eq!(r.weights, [("v1".into(), 80), ("v2".into(), 20)]);
        assert_eq!(r.state.get("a").unwrap().config.weights(), [80, 20]);
        let e = base
            .with_weights(Some("b"), &[("v2".into(), 20)])
            .unwrap_err();
        assert_eq!(e.to_string(), "no service named \"b\" (services: a)");
        let e = base.with_weights(None, &[("v9".into(), 20)]).unwrap_err();
        assert!(e.to_string().starts_with("unknown subset \"v9\""));
        let e = DesiredState::new()
            .with_weights(None, &[("v2".into(), 1)])
            .unwrap_err();
        assert!(matches!(e, StateError::NoServices));
    }

    #[test]
    fn delete_and_extra() {
        let base = DesiredState::new()
            .applied(&change(vec![
                svc("a", "31400", &[1]),
                svc("b", "31401", &[1]),
            ]))
            .unwrap();
        let (next, removed) = base.without(&["b".into(), "zz".into()]);
        assert_eq!(removed, ["b"]);
        assert_eq!(next.extra_in(&base.views()), ["b"]);
    }
}
